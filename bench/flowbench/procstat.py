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
    """CPU of ``pid``, its live children and its reaped children (PostgreSQL backends).

    A child that exits while the children are read is in neither sum if the parent's count
    of reaped children was read before it was reaped: pgbench's ten backends exit together
    when it ends, and lost most of their time that way. So the parent is read before and
    after the children, and the whole is read again until no child was reaped in between
    (a zombie still shows its times in /proc, so it is counted once either way)."""
    for _ in range(20):
        first = stat(pid)
        if first is None:
            return 0.0
        children = 0.0
        for entry in Path("/proc").iterdir():
            s = stat(int(entry.name)) if entry.name.isdigit() else None
            if s is not None and s.ppid == pid:
                children += s.cpu
        last = stat(pid)
        if last is None:
            return 0.0
        if last.children_cpu == first.children_cpu:
            break
    return last.cpu + last.children_cpu + children


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


def _cpu_fields() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (busy time from /proc/stat)."""
    fields = _cpu_fields()
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave this machine's vCPUs to someone else (/proc/stat
    'steal'; 0 on bare metal): time the benchmark wanted a core and had none."""
    fields = _cpu_fields()
    return fields[7] / TICKS if len(fields) > 7 else 0.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
