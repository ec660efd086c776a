"""The ``store`` fixture: every contract test runs once per adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flowd import FlowManager, FlowStore, InMemoryFlowStore
from flowd.store.postgres import PostgresFlowStore


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[FlowStore]:
    if request.param == "memory":
        yield InMemoryFlowStore()
        return
    url = request.getfixturevalue("database_url")
    pg = await PostgresFlowStore.connect(url, max_size=20)
    yield pg
    await pg.close()


@pytest.fixture
def manager(store: FlowStore) -> FlowManager:
    return FlowManager(store)


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def outbox_store(request: pytest.FixtureRequest) -> AsyncIterator[FlowStore]:
    """A store in the daemon's mode: every change also queues its outbox messages."""
    if request.param == "memory":
        yield InMemoryFlowStore(outbox=True)
        return
    url = request.getfixturevalue("database_url")
    pg = await PostgresFlowStore.connect(url, max_size=20, outbox=True)
    yield pg
    await pg.close()
