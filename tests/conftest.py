"""Session servers, a migrated template database, and one fresh database per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flowd.store.postgres import PostgresFlowStore
from tests.support import servers


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.postgres_server(Path(tmp_path_factory.mktemp("servers"))) as dsn:
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
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.nats_server(Path(tmp_path_factory.mktemp("nats"))) as url:
        yield url


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and so stream names) of this test's own."""
    return f"t{uuid.uuid4().hex[:12]}"
