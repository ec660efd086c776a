"""Two replicas' relays on one database: the one without the drain lock nudges the holder over
NATS, so its events leave at once, not at the holder's next poll."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flowd import FlowManager
from flowd.bus.nats import NatsBus, StreamLimits, connect
from flowd.bus.subjects import Subjects
from flowd.daemon.health import Metrics
from flowd.daemon.relay import OutboxRelay
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import create_input

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

POLL = 3600.0  # no poll within the test: only a wake or a nudge can publish


class Replica:
    def __init__(self, store: PostgresFlowStore, bus: NatsBus, interval: float = POLL) -> None:
        self.store, self.bus = store, bus
        self.relay = OutboxRelay(store, bus, Metrics(), interval=interval)
        self.manager = FlowManager(store, on_commit=lambda _: self.relay.wake())
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.relay.start()
        self.task = asyncio.create_task(self.relay.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=15)
        await self.bus.close()
        await self.store.close()


async def replica(database_url: str, nats_url: str, prefix: str, interval: float) -> Replica:
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    bus = await NatsBus(await connect(nats_url), Subjects(prefix), StreamLimits()).ensure()
    return Replica(store, bus, interval)


@pytest.fixture
async def replicas(
    database_url: str, nats_url: str, prefix: str
) -> AsyncIterator[tuple[Replica, Replica]]:
    made = [await replica(database_url, nats_url, prefix, POLL) for _ in range(2)]
    yield made[0], made[1]
    for r in made:
        await r.close()


async def events_of(bus: NatsBus, prefix: str, count: int) -> list[str]:
    """The first ``count`` subjects stored in the events stream (waits up to 10 s)."""
    sub = await bus.js.subscribe(f"{prefix}.evt.>", ordered_consumer=True)
    try:
        return [(await sub.next_msg(timeout=10)).subject for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def start_with_lock_held(holder: Replica, other: Replica, prefix: str) -> None:
    """Start both; ``holder`` drains first and keeps the drain lock, ``other`` finds it held."""
    await holder.start()
    await holder.manager.create_managed(create_input(goal="first"))
    assert await events_of(holder.bus, prefix, 1)  # the holder drained: it has the lock
    await other.start()
    for _ in range(100):  # the other's first drain finds the lock taken; then it nudges
        if other.store.outbox_drained_elsewhere():
            break
        await asyncio.sleep(0.05)
    assert other.store.outbox_drained_elsewhere()


async def test_the_replica_without_the_lock_nudges_the_holder(
    replicas: tuple[Replica, Replica], prefix: str
) -> None:
    holder, other = replicas
    await start_with_lock_held(holder, other, prefix)
    flow = await other.manager.create_managed(create_input(goal="second"))
    subjects = await events_of(holder.bus, prefix, 2)
    assert subjects[1] == f"{prefix}.evt.{flow.id}.created"
    assert holder.relay.metrics.value("outbox_published_total") == 2
    assert other.relay.metrics.value("outbox_published_total") == 0


async def test_a_nudge_without_a_holder_elsewhere_drains_here(
    replicas: tuple[Replica, Replica], prefix: str
) -> None:
    only, _ = replicas
    await only.start()
    await asyncio.sleep(0.2)  # its first drain took the lock
    await FlowManager(only.store).create_managed(create_input())  # committed, no local wake
    only.relay.nudged()  # as another replica's nudge would: it drains
    assert await events_of(only.bus, prefix, 1)
    assert not only.store.outbox_drained_elsewhere()


async def test_a_busy_replica_takes_over_when_the_holder_goes(
    database_url: str, nats_url: str, prefix: str
) -> None:
    holder = await replica(database_url, nats_url, prefix, POLL)
    busy = await replica(database_url, nats_url, prefix, 0.3)
    try:
        await start_with_lock_held(holder, busy, prefix)
        await holder.close()  # its session, and the drain lock with it, is gone
        done = asyncio.Event()

        async def commit_often() -> int:  # woken every 50 ms: its poll never times out
            n = 0
            while not done.is_set() and n < 600:
                await busy.manager.create_managed(create_input(goal=f"g{n}"))
                n += 1
                await asyncio.sleep(0.05)
            return n

        committing = asyncio.create_task(commit_often())
        await events_of(busy.bus, prefix, 11)  # its own events, published while still busy
        assert not committing.done()
        done.set()
        await committing
        assert not busy.store.outbox_drained_elsewhere()
        assert busy.relay.metrics.value("outbox_published_total") >= 10
    finally:
        await busy.close()
