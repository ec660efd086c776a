"""What every scenario gets: the servers, the sizes, where to write, and a daemon factory."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from flowbench import env, natsutil, procstat
from flowbench.config import Sizes
from flowbench.flowd import Flowd
from flowd.bus.subjects import Subjects


@dataclass
class Context:
    servers: env.Servers
    sizes: Sizes
    out: Path
    smoke: bool
    profile: bool
    keep: bool
    #: Numbers one scenario hands to a later one (message sizes, the saturation rate).
    shared: dict[str, Any] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def daemon(
        self, label: str, dsn: str | None = None, **env_vars: str
    ) -> AsyncIterator[tuple[Flowd, str]]:
        """``flowd run`` on ``dsn`` (default: a fresh database) with a subject prefix of its
        own; yields (daemon, dsn). Stops the daemon and deletes its streams afterwards."""
        dsn = dsn or await env.fresh_database(self.servers, label)
        prefix = env.unique_prefix(label)
        daemon = Flowd(
            self.servers.nats_url,
            dsn,
            prefix,
            self.out / "logs" / f"flowd-{label}.log",
            **env_vars,
        )
        daemon.start()
        try:
            await asyncio.to_thread(daemon.wait_ready)
            yield daemon, dsn
        finally:
            code = await asyncio.to_thread(daemon.stop)
            if code not in (0, None):
                print(f"  ! flowd ({label}) exited {code}; log: {daemon.log_path}")
            nc = await natsutil.connect(self.servers.nats_url)
            try:
                await natsutil.delete_streams(nc, prefix)
            finally:
                await nc.close()

    async def stalled(self, daemon: Flowd, nc: Client, what: str) -> RuntimeError:
        """An error carrying what the daemon was doing when ``what`` stopped progressing."""
        s = Subjects(daemon.prefix)
        consumers = []
        for stream, durable in ((s.cmd_stream, s.cmd_consumer), (s.obs_stream, s.obs_consumer)):
            with contextlib.suppress(Exception):
                info = await nc.jetstream().consumer_info(stream, durable)
                consumers.append(
                    f"{durable}: pending {info.num_pending}, ack pending {info.num_ack_pending}, "
                    f"redelivered {info.num_redelivered}"
                )
        stacks = await asyncio.to_thread(daemon.dump_stacks)
        return RuntimeError(
            f"{what}\n" + "\n".join(consumers) + f"\n--- py-spy dump\n{stacks}"
            f"\n--- daemon log tail\n{daemon.logs(3000)}"
        )

    @contextlib.asynccontextmanager
    async def nats(self) -> AsyncIterator[Client]:
        nc = await natsutil.connect(self.servers.nats_url)
        try:
            yield nc
        finally:
            await nc.close()


class CpuMeter:
    """CPU seconds spent by each party between ``start()`` and ``stop()``."""

    def __init__(self, daemon_pid: int, servers: env.Servers) -> None:
        self.pids = {"flowd": (daemon_pid, False)}
        if servers.pg_pid is not None:
            self.pids["postgres"] = (servers.pg_pid, True)
        if servers.nats_pid is not None:
            self.pids["nats_server"] = (servers.nats_pid, False)
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = {
            name: procstat.tree_cpu_seconds(pid) if tree else procstat.cpu_seconds(pid)
            for name, (pid, tree) in self.pids.items()
        }
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["harness"] = usage.ru_utime + usage.ru_stime
        out["machine_total"] = procstat.machine_busy_seconds()
        return out

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> None:
        self._end = self._read()

    def used(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """CPU seconds per party from start() to stop(); ``extra`` adds parties measured
        elsewhere (producers). ``other``: what the machine spent beyond every party named,
        i.e. processes that are not part of the benchmark."""
        used = {k: round(self._end[k] - self._start[k], 2) for k in self._end}
        used.update(extra or {})
        named = sum(v for k, v in used.items() if k != "machine_total")
        used["other"] = round(max(0.0, used["machine_total"] - named), 2)
        return used
