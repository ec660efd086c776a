"""CPU and memory of processes, read from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    ppid: int
    cpu: float  # user + system seconds of the process itself
    children_cpu: float  # user + system seconds of its reaped (exited) children


def stat(pid: int) -> Stat | None:
    """The process's CPU times; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # fields from 'state' on (field 3)
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return Stat(int(fields[1]), (utime + stime) / TICKS, (cutime + cstime) / TICKS)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 if it is gone)."""
    s = stat(pid)
    return 0.0 if s is None else s.cpu


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid``, its live children and its reaped children (PostgreSQL backends)."""
    root = stat(pid)
    if root is None:
        return 0.0
    total = root.cpu + root.children_cpu
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (s := stat(int(entry.name))) is not None and s.ppid == pid:
            total += s.cpu
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS in kB."""
    out: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (busy time from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
