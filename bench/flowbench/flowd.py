"""``flowd run`` as a child process, started the way tests/support/daemon.py does it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any

from flowbench import procstat

# Settings the daemon runs with in every scenario (besides URLs, prefix and port).
DAEMON_ENV = {
    "FLOWD_LOG_FORMAT": "json",
    "FLOWD_LOG_LEVEL": "warning",  # one log line per command would be part of the measurement
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flowd:
    """One ``flowd run`` subprocess with its own prefix and HTTP port."""

    def __init__(
        self, nats_url: str, database_url: str, prefix: str, log_path: Path, **env: str
    ) -> None:
        self.nats_url = nats_url
        self.database_url = database_url
        self.prefix = prefix
        self.http_port = free_port()
        self.log_path = log_path
        self.env = {**DAEMON_ENV, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def settings(self) -> dict[str, str]:
        """The FLOWD_* settings it runs with (explicit ones and any inherited)."""
        inherited = {k: v for k, v in os.environ.items() if k.startswith("FLOWD_")}
        inherited = {k: v for k, v in inherited.items() if not k.startswith("FLOWD_BENCH")}
        return {**inherited, **self.env, "FLOWD_PREFIX": self.prefix}

    def start(self) -> Flowd:
        env = {
            **os.environ,
            "NATS_URL": self.nats_url,
            "DATABASE_URL": self.database_url,
            "FLOWD_PREFIX": self.prefix,
            "FLOWD_HTTP_PORT": str(self.http_port),
            **self.env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowd", "run"], env=env, stdout=log, stderr=log
            )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"flowd exited {self.proc.returncode}:\n{self.logs()}")
            with suppress(OSError), urllib.request.urlopen(self.url("/readyz"), timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"flowd not ready in {timeout}s:\n{self.logs()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with suppress(ValueError):
                    out[key] = float(value)
        return out

    def usage(self) -> dict[str, Any]:
        """CPU seconds so far and memory now (kB)."""
        return {"cpu_s": procstat.cpu_seconds(self.pid), **procstat.memory_kb(self.pid)}

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not stop. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def dump_stacks(self) -> str:
        """py-spy dump of the daemon's Python stacks right now (when py-spy is installed)."""
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.proc is None or not Path(binary).exists():
            return "<no py-spy>"
        res = subprocess.run(
            [binary, "dump", "--pid", str(self.pid)], capture_output=True, text=True, timeout=30
        )
        return (res.stdout or res.stderr)[-6000:]

    def logs(self, limit: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no log>"

    def warnings(self) -> list[str]:
        """Log lines at warning level or above (the daemon logs nothing else here)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-20:]


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over label sets that contain ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
