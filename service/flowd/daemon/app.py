"""The composition root: builds every object, runs the loops, shuts down cleanly.

Start-up: (embedded servers) -> PostgreSQL pool -> migrate or check -> NATS, streams and
consumers -> manager, dispatcher, outbox relay, API, HTTP endpoints. SIGTERM/SIGINT: stop
fetching, finish the command each flow is applying (hand the rest back to JetStream, in
order), flush the outbox, drain NATS, exit 0. In every state, waiting for a dependency
included, the process ends within ``STOP_GRACE`` seconds of the signal; past it, it exits 1
without finishing (nothing is lost: unacked messages are redelivered, outbox rows stay).
A configuration that cannot work (``errors.Misconfigured``: credentials or TLS refused, names
owned by another prefix) is one log line and exit 1 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from flowd import embedded
from flowd.bus import codec
from flowd.bus.nats import BusUnavailable, NatsBus, StreamLimits, connect
from flowd.bus.subjects import Subjects
from flowd.config import Settings
from flowd.core import errors, owner
from flowd.core.apply import Change
from flowd.core.outbox import EVENT_OVERHEAD, largest_event_bytes
from flowd.daemon.api import Api
from flowd.daemon.dispatch import Dispatcher, Kind
from flowd.daemon.health import Metrics, Readiness, serve_http
from flowd.daemon.partitions import PartitionOwner
from flowd.daemon.relay import OutboxRelay
from flowd.daemon.waits import WaitEngine
from flowd.manager import FlowManager
from flowd.store.migrate import MigrationError
from flowd.store.postgres import PostgresFlowStore

log = structlog.get_logger("flowd")
T = TypeVar("T")

#: Seconds from SIGTERM/SIGINT to the end of the process, whatever it is doing.
STOP_GRACE = 15.0
#: Longest gap between two log lines about a dependency that stays unreachable.
LOG_EVERY = 30.0


class Daemon:
    """One ``flowd run`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.prefix, settings.partitions)
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self._servers: list[embedded.EmbeddedPostgres | embedded.EmbeddedNats] = []
        self._database_url = ""
        self._ready: Readiness | None = None
        self._exit = 0  # the exit code once stopped
        self._overdue: threading.Timer | None = None
        self._closing = False  # the daemon closes its NATS client itself
        self._owner_keys: codec.Owners | None = None

    async def run(self, *, drain: bool = False) -> int:
        """Serve until a signal (or, with ``drain``, until no message is pending)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._serve(drain)
        except MigrationError as exc:
            log.error("schema_mismatch", error=str(exc))
            return 1
        except errors.Misconfigured as exc:
            log.error("refused_to_start", error=str(exc))
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for server in reversed(self._servers):
                await asyncio.to_thread(server.stop)
            if self._overdue is not None:
                self._overdue.cancel()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stopping", signal=sig.name, grace=STOP_GRACE)
        self.stop.set()
        if self._overdue is None:  # a thread: it fires even if the event loop is stuck
            self._overdue = threading.Timer(STOP_GRACE, self._stop_overdue)
            self._overdue.daemon = True
            self._overdue.start()

    def _stop_overdue(self) -> None:
        """STOP_GRACE passed since the signal: end the process now (and embedded servers)."""
        log.error("stop_overdue", grace=STOP_GRACE)
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.kill()
        sys.stdout.flush()
        os._exit(1)

    async def _serve(self, drain: bool) -> int:
        """HTTP endpoints first (liveness answers while dependencies are awaited), then
        the daemon proper."""
        s = self.settings
        http = None
        if s.http_port:
            http = await serve_http(s.http_host, s.http_port, self.metrics, self._readiness)
        try:
            return await self._serve_daemon(drain)
        finally:
            if http is not None:
                http.close()
                await http.wait_closed()

    async def _nats_closed(self) -> None:
        """The NATS client closed for good while serving: stop, exit 1 (to be restarted)
        rather than stay up unready forever."""
        if not self.stop.is_set() and not self._closing:
            log.error("nats_connection_closed", error="the NATS client will not reconnect")
            self._exit = 1
            self.stop.set()

    async def _readiness(self) -> tuple[str | None, str]:
        return await self._ready() if self._ready is not None else ("starting", "")

    async def _serve_daemon(self, drain: bool) -> int:
        s = self.settings
        self._owner_keys = self._owners()  # (a bad keys file: refused before connecting)
        database_url, nats_url = await self._urls()
        self._database_url = database_url
        if drain and self.subjects.partitioned:
            log.error("drain_needs_one_partition", partitions=s.partitions)
            return 2
        store = await self._retry(
            "postgres",
            lambda: PostgresFlowStore.connect(database_url, max_size=s.pool_size, outbox=True),
        )
        if store is None:
            return 0
        try:
            # A database that cannot take the migrations now (read-only, going down) is
            # waited for like an unreachable one.
            if s.migrate:
                applied = await self._retry("migrations", store.migrate)
                if applied is None:
                    return 0
                log.info("schema_migrated", applied=applied)
            else:
                pending = await self._retry("migrations", store.pending_migrations)
                if pending is None:
                    return 0
                if pending:
                    raise MigrationError(f"pending migrations: {', '.join(pending)}")
            if await self._retry("postgres", lambda: store.bind_prefix(s.prefix)) is None:
                return 0
            nc = await self._retry(
                "nats",
                lambda: connect(
                    nats_url,
                    creds=str(s.nats_creds) if s.nats_creds else None,
                    nkey=str(s.nats_nkey) if s.nats_nkey else None,
                    tls_ca=str(s.nats_tls_ca) if s.nats_tls_ca else None,
                    tls_cert=str(s.nats_tls_cert) if s.nats_tls_cert else None,
                    tls_key=str(s.nats_tls_key) if s.nats_tls_key else None,
                    closed_cb=self._nats_closed,
                ),
            )
            if nc is None:
                return 0
            bus = NatsBus(nc, self.subjects, self._limits())
            try:
                if await self._retry("streams", bus.ensure) is None:
                    return 0
                if (too_big := self._too_big(bus)) is not None:
                    log.error("payload_limits_do_not_fit", error=too_big)
                    self.stop.set()  # (closing the client below is no further failure)
                    return 1
                await self._run_loops(store, bus, drain)
            finally:
                self._closing = True  # (its close callback is no failure then)
                await bus.close()
        finally:
            await store.close()
        log.info("stopped")
        return self._exit

    async def _run_loops(self, store: PostgresFlowStore, bus: NatsBus, drain: bool) -> None:
        s, m = self.settings, self.metrics
        relay = OutboxRelay(store, bus, m, interval=s.relay_interval)
        engine: WaitEngine | None = None

        def committed(change: Change | None) -> None:
            relay.wake()  # its messages leave now, not at the relay's next poll
            if engine is not None and change is not None and change.conditions is not None:
                engine.waits_changed()

        manager = FlowManager(
            store,
            cache_size=s.flow_cache,
            on_commit=committed,
            reserved_subjects=bus.subjects.reserved,
            max_state_bytes=s.max_state_bytes,
        )
        engine = WaitEngine(manager, bus, m, tick=s.wait_tick, batch=s.wait_batch)
        owners = self._owner_keys
        dispatcher = Dispatcher(
            manager,
            bus,
            m,
            concurrency=s.concurrency,
            max_payload=s.max_payload,
            max_deliver=s.max_deliver,
            stopping=self.stop,
            owners=owners,
        )
        api = Api(
            manager,
            bus,
            m,
            max_payload=s.max_payload,
            concurrency=s.api_concurrency,
            owners=owners,
        )
        await api.start()
        await relay.start()

        async def ready() -> tuple[str | None, str]:
            # Parked rows hold back their flows' events only: the daemon serves every other
            # flow, so it stays ready, and says how many (also a gauge and a log line).
            try:
                parked = await store.outbox_parked_count()  # (also: PostgreSQL answers)
            except errors.StoreUnavailable as exc:
                return f"postgres: {exc}", ""
            return None if bus.connected else "nats: disconnected", f"outbox_parked: {parked}"

        m.gauges["outbox_backlog"] = lambda: _float(store.outbox_backlog())
        m.gauges["outbox_parked"] = lambda: _float(store.outbox_parked_count())
        m.gauges["commands_pending"] = lambda: self._lag(bus, "cmd")
        m.gauges["observations_pending"] = lambda: self._lag(bus, "obs")
        self._ready = ready
        log.info(
            "serving",
            prefix=s.prefix,
            http=f"http://{s.http_host}:{s.http_port}" if s.http_port else None,
            concurrency=s.concurrency,
        )
        relay_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tasks:
                relay_task = tasks.create_task(relay.run(relay_stop))
                tasks.create_task(engine.run(self.stop))
                if self.subjects.partitioned:
                    consumers = [
                        tasks.create_task(self._consume(bus, dispatcher, "cmd", drain=False)),
                        tasks.create_task(self._partitions(store, bus, dispatcher)),
                    ]
                else:
                    consumers = [
                        tasks.create_task(self._consume(bus, dispatcher, "cmd", drain)),
                        tasks.create_task(self._consume(bus, dispatcher, "obs", drain)),
                    ]
                await asyncio.gather(*consumers)
                self.stop.set()  # --drain ends here too: stop the wait engine
                relay_stop.set()
                await relay_task
        finally:
            self._ready = None
            await api.close()

    async def _lag(self, bus: NatsBus, kind: str) -> float:
        """Messages not yet delivered, over every consumer of ``kind``."""
        s = self.subjects
        total = 0
        for p in range(s.partitions):
            total += (await bus.pending(s.consumer(kind, p)))[0]
        return float(total)

    async def _partitions(self, store: PostgresFlowStore, bus: NatsBus, d: Dispatcher) -> None:
        async def run(partition: int, release: asyncio.Event) -> None:
            async with asyncio.TaskGroup() as tasks:
                for kind in ("cmd", "obs"):
                    tasks.create_task(
                        self._consume(bus, d, kind, False, partition=partition, release=release)
                    )

        await PartitionOwner(self._database_url, self.settings.partitions, run, self.stop).run()

    async def _consume(
        self,
        bus: NatsBus,
        dispatcher: Dispatcher,
        kind: Kind,
        drain: bool,
        *,
        partition: int | None = None,
        release: asyncio.Event | None = None,
    ) -> None:
        """Apply one consumer's messages until stopped (or released, or idle with drain).
        Without ``partition``: the unpartitioned consumer of ``kind`` (with partitions, the
        consumer of creates that name no flow id)."""
        s = self.subjects
        if partition is not None:
            durable = s.consumer(kind, partition)
        elif s.partitioned:
            durable = s.create_consumer
        else:
            durable = s.consumer(kind, 0)
        bus.resync(durable)  # what another process had comes first, in order
        await dispatcher.consume(
            kind,
            durable,
            batch=self.settings.batch,
            partitioned=partition is not None,
            release=release,
            drain=drain,
        )

    async def _urls(self) -> tuple[str, str]:
        s = self.settings
        database_url, nats_url = s.database_url, s.nats_url
        if database_url is None:
            pg = embedded.EmbeddedPostgres(s.data_dir / "postgres")
            self._servers.append(pg)  # first: a stop while it starts must end it too
            database_url = await asyncio.to_thread(pg.start)
            log.info("embedded_postgres_started", url=database_url)
        if nats_url is None:
            server = embedded.EmbeddedNats(s.data_dir / "nats")
            self._servers.append(server)
            nats_url = await asyncio.to_thread(server.start)
            log.info("embedded_nats_started", url=nats_url)
        if self._servers:
            _write_env(s.data_dir / "urls.env", nats_url, database_url)
        return database_url, nats_url

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()`` until it works, backing off (up to 5 s); None if stopped first, also
        in the middle of a call. Failures are logged with growing gaps, at most one line per
        ``LOG_EVERY`` seconds."""
        delay, failures, gap, log_at = 0.2, 0, 1.0, 0.0
        while not self.stop.is_set():
            try:
                return await self._unless_stopped(call())
            except (errors.StoreUnavailable, BusUnavailable) as exc:
                failures += 1
                if (now := time.monotonic()) >= log_at:
                    log.warning("waiting_for", dependency=what, error=str(exc), failures=failures)
                    log_at, gap = now + gap, min(gap * 2, LOG_EVERY)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
        return None

    def _too_big(self, bus: NatsBus) -> str | None:
        """Why the largest event flowd can make would not fit what NATS takes, or None.
        (Dead letters need no check: they are cut to fit, NatsBus.publish_letter.)"""
        s = self.settings
        largest = largest_event_bytes(s.max_state_bytes, s.max_payload)
        limit = bus.publish_limit()
        if largest <= limit:
            return None
        return (
            f"the largest event flowd can publish is {largest} bytes (FLOWD_MAX_STATE_BYTES "
            f"{s.max_state_bytes} + 2 x max(FLOWD_MAX_PAYLOAD {s.max_payload}, "
            f"FLOWD_MAX_STATE_BYTES) + {EVENT_OVERHEAD} for other fields and headers), over "
            f"the {limit} bytes NATS takes (the server's max_payload {bus.nc.max_payload}, or "
            "the events stream's max_msg_size): lower FLOWD_MAX_STATE_BYTES or "
            "FLOWD_MAX_PAYLOAD, or raise the server's max_payload"
        )

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        """The result of ``work``, or None once a signal came first (``work`` is then
        cancelled: a connect or a lock wait must not hold the process)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure while being cancelled is of no interest
        return None

    def _owners(self) -> codec.Owners | None:
        """With ``FLOWD_ENFORCE_OWNER``: the master keys owner claims are checked against."""
        s = self.settings
        if not s.enforce_owner or s.owner_keys_file is None:
            return None
        try:
            masters = owner.parse_keys(s.owner_keys_file.read_text())
        except (OSError, UnicodeError, ValueError) as exc:
            raise errors.Misconfigured(
                f"FLOWD_OWNER_KEYS_FILE {s.owner_keys_file}: {exc}"
            ) from None
        return codec.Owners(masters, s.prefix)

    def _limits(self) -> StreamLimits:
        s = self.settings
        return StreamLimits(
            replicas=s.stream_replicas,
            commands_max_age=s.commands_max_age,
            events_max_age=s.events_max_age,
            events_max_bytes=s.events_max_bytes,
            duplicate_window=s.duplicate_window,
            ack_wait=s.ack_wait,
            max_deliver=s.max_deliver,
            # At most `batch` unacked messages per consumer: after a crash they are all
            # applied, in stream order, before anything newer (NatsBus.resync),
            # so per-flow order survives.
            max_ack_pending=s.batch,
        )


def _write_env(path: Path, nats_url: str, database_url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"NATS_URL={nats_url}\nDATABASE_URL={database_url}\n")


async def _float(value: Awaitable[Any]) -> float:
    return float(await value)
