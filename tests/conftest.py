"""Session servers, a migrated template database, and one fresh database per test."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flowd.store.postgres import PostgresFlowStore
from tests.support import servers


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    # Not under pytest's numbered temp root: another pytest run of the same user (any
    # project) rotates old roots away, the data directory of a running server with them.
    with (
        tempfile.TemporaryDirectory(prefix="flowd-tests-pg-") as tmp,
        servers.postgres_server(Path(tmp)) as dsn,
    ):
        yield dsn


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """A database with every migration applied, copied for each test."""
    name = servers.create_database(pg_server)

    async def migrate() -> None:
        store = await PostgresFlowStore.connect(servers.with_database(pg_server, name))
        try:
            await store.migrate()
        finally:
            await store.close()

    servers.run_sync(migrate())
    yield name
    servers.drop_database(pg_server, name)


@pytest.fixture
def database_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = servers.create_database(pg_server, template=pg_template)
    yield servers.with_database(pg_server, name)
    servers.drop_database(pg_server, name)


@pytest.fixture
def empty_database_url(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = servers.create_database(pg_server)
    yield servers.with_database(pg_server, name)
    servers.drop_database(pg_server, name)


@pytest.fixture
async def pg_store(database_url: str) -> AsyncIterator[PostgresFlowStore]:
    store = await PostgresFlowStore.connect(database_url, max_size=20)
    yield store
    await store.close()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    with (
        tempfile.TemporaryDirectory(prefix="flowd-tests-nats-") as tmp,
        servers.nats_server(Path(tmp)) as url,
    ):
        yield url


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and so stream names) of this test's own."""
    return f"t{uuid.uuid4().hex[:12]}"
