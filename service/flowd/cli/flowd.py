"""The ``flowd`` command: ``flowd migrate`` and ``flowd check``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from flowd.core.errors import FlowError
from flowd.store.migrate import MigrationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowd",
        description="flowd: durable multi-step flows in PostgreSQL, driven over NATS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("migrate", "apply pending schema migrations (safe to run concurrently and repeatedly)"),
        ("check", "exit 0 if the schema is up to date, 1 if migrations are pending"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--database-url",
            default=os.environ.get("DATABASE_URL"),
            help="PostgreSQL DSN (env DATABASE_URL); required",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowd`` console script."""
    args = _parser().parse_args(argv)
    if not args.database_url:
        print("flowd: error: --database-url or DATABASE_URL is required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_migrate(args.database_url, apply=args.command == "migrate"))
    except (FlowError, MigrationError) as exc:
        code = getattr(exc, "code", "migration_error")
        print(f"flowd: {code}: {exc}", file=sys.stderr)
        return 1
