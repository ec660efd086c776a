"""PostgreSQL group commit: changes that wait while a commit is in flight share the next
transaction; a stalled transaction does not hold the others up; one failing statement
fails only its own change."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from flowd import FlowManager
from flowd.core.models import Flow
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import create_input

pytestmark = pytest.mark.postgres


@asynccontextmanager
async def row_locked(dsn: str, flow_id: UUID) -> AsyncIterator[None]:
    """Another session holds ``flow_id``'s row lock until the block ends."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM flows WHERE id = $1 FOR UPDATE", flow_id)
            yield
    finally:
        await conn.close()


async def created(manager: FlowManager, count: int) -> list[Flow]:
    return [await manager.create_managed(create_input(goal=f"g{n}")) for n in range(count)]


async def test_waiting_changes_share_a_transaction_beside_a_stalled_one(
    pg_store: PostgresFlowStore, database_url: str
) -> None:
    manager = FlowManager(pg_store, cache_size=0)
    blocked, *others = await created(manager, 6)
    async with row_locked(database_url, blocked.id):
        first = asyncio.create_task(manager.start_running(blocked.id))
        await asyncio.sleep(0.02)  # it is in flight, waiting for the row lock
        assert not first.done()
        # These wait behind it; once it has stalled they go together, without it.
        started = await asyncio.wait_for(
            asyncio.gather(*(manager.start_running(f.id) for f in others)), timeout=5
        )
        assert [f.revision for f in started] == [1] * len(others)
        # Shared transactions: one when all arrive within the stall threshold (50 ms), more
        # when a slow machine spreads their reads across it; never one per change.
        assert pg_store._updates.batches < len(others)
        assert not first.done()
    assert (await asyncio.wait_for(first, timeout=5)).revision == 1


async def test_a_failing_statement_fails_only_its_own_change(
    pg_store: PostgresFlowStore, database_url: str
) -> None:
    manager = FlowManager(pg_store, cache_size=0)
    blocked, *others, victim = await created(manager, 5)
    taken = (await manager.list_events(blocked.id))[0].id

    def reuse_an_event_id() -> Iterator[uuid.UUID]:
        yield taken  # the victim's event gets an id that exists: a unique violation
        while True:
            yield uuid.uuid4()

    ids = reuse_an_event_id()
    clumsy = FlowManager(pg_store, cache_size=0, new_id=lambda: next(ids))
    async with row_locked(database_url, blocked.id):
        first = asyncio.create_task(manager.start_running(blocked.id))
        await asyncio.sleep(0.02)
        results: list[Any] = await asyncio.gather(
            *(manager.start_running(f.id) for f in others),
            clumsy.start_running(victim.id),
            return_exceptions=True,
        )
    await first
    assert isinstance(results[-1], asyncpg.UniqueViolationError)
    assert [r.revision for r in results[:-1]] == [1] * len(others)
    assert (await manager.get(victim.id)).revision == 0
    assert [e.kind for e in await manager.list_events(victim.id)] == ["created"]
    assert pg_store._updates.batches == 0  # the shared transaction rolled back, each went alone


async def test_every_commit_gives_its_connection_back_to_the_pool(database_url: str) -> None:
    # One connection: a commit that kept it, on success or on error, blocks the next forever.
    store = await PostgresFlowStore.connect(database_url, min_size=1, max_size=1)
    try:
        manager = FlowManager(store, cache_size=0)
        first, *others, victim = await created(manager, 8)
        taken = (await manager.list_events(first.id))[0].id
        clumsy = FlowManager(store, cache_size=0, new_id=lambda: taken)  # a unique violation
        for flow in others[:3]:  # one after another: each commit goes alone
            await asyncio.wait_for(manager.start_running(flow.id), timeout=5)
        # Concurrent ones share transactions; the failing one fails alone, then again alone.
        results: list[Any] = await asyncio.wait_for(
            asyncio.gather(
                *(manager.start_running(f.id) for f in others[3:]),
                clumsy.start_running(victim.id),
                return_exceptions=True,
            ),
            timeout=5,
        )
        assert [r.revision for r in results[:-1]] == [1] * len(others[3:])
        assert isinstance(results[-1], asyncpg.UniqueViolationError)
        assert (await asyncio.wait_for(manager.start_running(first.id), timeout=5)).revision == 1
        await asyncio.sleep(0.05)  # the last release runs in the background
        assert store._pool.get_idle_size() == 1
    finally:
        await asyncio.wait_for(store.close(), timeout=5)
