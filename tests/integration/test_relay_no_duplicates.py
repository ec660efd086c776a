"""An event is never published twice (issue 16, defect 5b): rows JetStream already stored but
whose delete was lost (the process died first, the database turned read-only, PostgreSQL
crashed before flushing the relay's asynchronous commit) are found and deleted unsent by the
next relay, however long after, also past the duplicate window."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from flowd import FlowManager
from flowd.bus.nats import NatsBus, StreamLimits, connect
from flowd.bus.subjects import MSG_ID, Subjects
from flowd.core.outbox import OutboxMessage
from flowd.daemon.health import Metrics
from flowd.daemon.relay import OutboxRelay
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import create_input

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

WINDOW = 1.0  # the events stream's duplicate window, seconds
ROWS = "SELECT topic, msg_id, command_id, body FROM outbox ORDER BY id"
RESTORE = """
INSERT INTO outbox (topic, msg_id, command_id, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::json[])"""


@pytest.fixture
async def bus(nats_url: str, prefix: str) -> AsyncIterator[NatsBus]:
    limits = StreamLimits(duplicate_window=WINDOW)
    b = await NatsBus(await connect(nats_url), Subjects(prefix), limits).ensure()
    yield b
    for name in (b.subjects.cmd_stream, b.subjects.obs_stream, b.subjects.evt_stream):
        await b.js.delete_stream(name)
    for name in (b.subjects.wake_stream, b.subjects.dlq_stream):
        await b.js.delete_stream(name)
    await b.close()


async def stored_ids(bus: NatsBus) -> list[str]:
    info = await bus.js.stream_info(bus.subjects.evt_stream)
    ids = []
    for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
        msg = await bus.js.get_msg(bus.subjects.evt_stream, seq)
        ids.append((msg.headers or {})[MSG_ID])
    return ids


async def relay_round(database_url: str, bus: NatsBus, batch: int) -> Metrics:
    """A relay of a freshly started process: drain everything, then stop."""
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    metrics = Metrics()
    try:
        await OutboxRelay(store, bus, metrics, batch=batch).drain_once()
    finally:
        await store.close()
    return metrics


async def lose_deletes(database_url: str, rows: list[Any]) -> None:
    """Put published rows back, as a delete that never reached the disk would leave them."""
    conn = await asyncpg.connect(database_url)
    try:
        columns = list(zip(*[tuple(r) for r in rows], strict=True))
        await conn.execute(RESTORE, *[list(c) for c in columns])
    finally:
        await conn.close()


async def outbox_rows(database_url: str) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(ROWS))
    finally:
        await conn.close()


@pytest.mark.parametrize("batch", [256, 2])
async def test_rows_already_stored_are_not_sent_again_past_the_duplicate_window(
    database_url: str, bus: NatsBus, batch: int
) -> None:
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    manager = FlowManager(store)
    flows = [await manager.create_managed(create_input()) for _ in range(2)]
    await manager.start_running(flows[0].id)
    for n in range(3):  # several rows on one subject (evt.<id>.state_updated)
        await manager.update_state(flows[0].id, {"n": n})
    await store.close()
    published = await outbox_rows(database_url)
    assert len(published) == 6

    await relay_round(database_url, bus, batch)
    assert await outbox_rows(database_url) == []
    await lose_deletes(database_url, published)
    await asyncio.sleep(WINDOW + 1.5)  # JetStream no longer drops a re-send by its id

    # Meanwhile one more event was written that was never published.
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    await FlowManager(store).start_running(flows[1].id)
    await store.close()

    metrics = await relay_round(database_url, bus, batch)
    assert await outbox_rows(database_url) == []
    ids = await stored_ids(bus)
    assert Counter(ids).most_common(1)[0][1] == 1, ids  # each event once
    assert len(ids) == 7
    assert metrics.value("outbox_already_stored_total") == 6
    assert metrics.value("outbox_published_total") == 1


async def test_a_certain_relay_asks_jetstream_nothing(database_url: str, bus: NatsBus) -> None:
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    manager = FlowManager(store)
    relay = OutboxRelay(store, bus, Metrics())
    asked: list[int] = []
    real = bus.stored_ids

    async def counting(subjects: Any) -> dict[str, str]:
        asked.append(len(subjects))
        return await real(subjects)

    bus.stored_ids = counting  # type: ignore[method-assign]
    try:
        flow = await manager.create_managed(create_input())
        await relay.drain_once()  # just took the drain lock: asks once
        await manager.start_running(flow.id)
        await relay.drain_once()
        await manager.update_state(flow.id, {"a": 1})
        await relay.drain_once()
    finally:
        await store.close()
    assert asked == [1]
    assert len(await stored_ids(bus)) == 3


async def test_an_outcome_subject_shared_by_commands_loses_nothing(
    database_url: str, bus: NatsBus
) -> None:
    """``out.create`` carries the outcomes of many commands applied at once, so its rows may
    commit out of id order: the later row stored does not mean the earlier one was."""
    store = await PostgresFlowStore.connect(database_url, outbox=True)
    rejected = {"status": "rejected", "code": "invalid_input"}
    await store.record_outcome("c-early", None, "create", rejected)  # committed late...
    await store.record_outcome("c-late", None, "create", rejected)
    await store.close()
    [_early, late] = await outbox_rows(database_url)
    assert late["msg_id"] == "out-c-late"
    # ...so the relay published the later one first, and its delete was lost.
    await bus.publish_outbox([OutboxMessage(late["topic"], late["msg_id"], None, late["body"])])
    await asyncio.sleep(WINDOW + 1.5)

    metrics = await relay_round(database_url, bus, 256)
    assert await outbox_rows(database_url) == []
    assert sorted(await stored_ids(bus)) == ["out-c-early", "out-c-late"]
    assert metrics.value("outbox_already_stored_total") == 1
    assert metrics.value("outbox_published_total") == 1
