"""py-spy on the daemon during an extra (unmeasured) saturation pass, and a summary of it.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;… count``), which
flamegraph.pl, speedscope or inferno render; the summary here ranks functions and packages.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def pyspy_binary() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    binary = pyspy_binary()
    if binary is None:
        return None
    cmd = [binary, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
    # Blocking sampling (py-spy's default) pauses the daemon ~100 times a second: it slows it
    # down, but --nonblocking tears stacks (frames without their callers) on this workload.
    return subprocess.Popen(
        [*cmd, "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop(proc: subprocess.Popen[bytes]) -> str:
    """Stop recording (SIGINT makes py-spy write its file); returns its stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")[-2000:]


@functools.cache
def _package(path: str) -> str:
    """Who a frame's file belongs to: ``flowd.<module>``, a third-party distribution's import
    name, or ``stdlib.<module>``. py-spy writes paths relative to their sys.path entry."""
    if path.startswith("<frozen "):
        return "stdlib." + path.removeprefix("<frozen ").rstrip(">").split(".")[0]
    parts = Path(path).parts
    if not parts:
        return "?"
    if parts[0] == "flowd":
        return ".".join((*parts[:-1], parts[-1].removesuffix(".py")))
    top = parts[0].removesuffix(".py")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    origin = (spec.origin or "") if spec else ""
    return top if "site-packages" in origin else f"stdlib.{top}"


def summarize(raw: Path, seconds: float, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample counts per function and per package."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl_pkg: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        names, pkgs = [], []
        for frame in frames:
            m = _FRAME.match(frame)
            func, file = (m["func"], m["file"]) if m else (frame, "?")
            pkg = _package(file)
            names.append(f"{func} ({pkg})")
            pkgs.append(pkg)
        if frames:
            self_fn[names[-1]] += count
            self_pkg[pkgs[-1]] += count
            # the nearest flowd frame above the leaf: which of flowd's code paid for it
            owner = next(
                (
                    n
                    for n, p in zip(names[-2::-1], pkgs[-2::-1], strict=True)
                    if p.startswith("flowd.")
                ),
                "?",
            )
            callers.setdefault(names[-1], Counter())[owner] += count
        for name in set(names):
            incl_fn[name] += count
        for pkg in set(pkgs):
            incl_pkg[pkg] += count

    def share(counter: Counter[str], roots: bool = True) -> list[dict[str, Any]]:
        rows = [
            {"name": name, "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in counter.most_common()
            if roots or n < 0.99 * total  # skip the frames every sample passes through
        ]
        return rows[:top]

    def with_callers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            row["flowd_callers"] = [
                {"name": name, "pct": round(100 * n / total, 1)}
                for name, n in callers.get(row["name"], Counter()).most_common(3)
            ]
        return rows

    return {
        "samples": total,
        "seconds": round(seconds, 2),
        "rate_hz": RATE,
        # samples while the thread was not idle / samples possible: how busy the loop was
        "busy_fraction": round(total / (RATE * seconds), 3) if seconds > 0 else None,
        "self_by_package": share(self_pkg),
        "inclusive_by_package": share(incl_pkg, roots=False),
        "self_by_function": with_callers(share(self_fn)),
        "inclusive_by_function": share(incl_fn, roots=False),
    }
