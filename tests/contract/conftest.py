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
