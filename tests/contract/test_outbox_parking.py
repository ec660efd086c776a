"""Parked outbox rows, on both stores: a row the relay parks stays (listed, never handed out
again), its flow's later rows wait behind it, every other flow's rows go on; un-parking
hands it out again, removing it lets its flow's rows go."""

from __future__ import annotations

import uuid

from flowd import FlowManager, FlowStore
from flowd.core.outbox import Drained, OutboxMessage
from tests.support.factories import create_input


class Relay:
    """A publish callback that parks the messages of ``refuse`` (by msg id)."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.sent: list[OutboxMessage] = []

    async def __call__(self, batch: list[OutboxMessage]) -> Drained:
        parked: dict[int, str] = {}
        kept: set[int] = set()
        blocked: set[str] = set()
        for i, m in enumerate(batch):
            if m.flow_key in blocked:
                kept.add(i)
            elif m.msg_id in self.refuse:
                parked[i] = "too big"
                blocked.add(m.flow_key)
            else:
                self.sent.append(m)
        return Drained(parked, frozenset(kept))

    async def drain(self, store: FlowStore, limit: int = 2) -> None:
        while await store.drain_outbox(self, limit=limit):
            pass


async def test_a_parked_row_holds_back_its_flow_only(outbox_store: FlowStore) -> None:
    m = FlowManager(outbox_store)
    a = await m.create_managed(create_input())
    b = await m.create_managed(create_input())
    relay = Relay()
    await relay.drain(outbox_store)
    relay.sent.clear()
    started = await m.start_running(a.id)
    [event] = await m.list_events(a.id, after_revision=0)
    relay.refuse.add(str(event.id))
    await m.update_state(a.id, {"x": 1})
    await m.start_running(b.id)
    await relay.drain(outbox_store)
    assert [msg.topic for msg in relay.sent] == [f"evt.{b.id}.started"]
    [row] = await outbox_store.outbox_parked()
    assert (row.topic, row.msg_id, row.reason) == (f"evt.{a.id}.started", str(event.id), "too big")
    assert row.size > 0
    assert row.body is None
    assert await outbox_store.outbox_parked_count() == 1
    assert await outbox_store.outbox_backlog() == 0  # a's later row waits for an operator
    assert started.revision == 1

    # Still held after more writes and drains; a later outcome of that flow waits too.
    await m.update_state(a.id, {"x": 2})
    await relay.drain(outbox_store)
    assert [msg.topic for msg in relay.sent] == [f"evt.{b.id}.started"]

    # Retry: handed out again (now it goes), then the flow's later rows, in order.
    relay.refuse.clear()
    assert await outbox_store.outbox_unpark(row.row_id)
    assert not await outbox_store.outbox_unpark(row.row_id)
    await relay.drain(outbox_store)
    assert [msg.topic.split(".")[2] for msg in relay.sent[1:]] == [
        "started",
        "state_updated",
        "state_updated",
    ]
    assert await outbox_store.outbox_parked() == []


async def test_a_removed_parked_row_releases_its_flow(outbox_store: FlowStore) -> None:
    m = FlowManager(outbox_store)
    a = await m.create_managed(create_input())
    [created] = await m.list_events(a.id)
    relay = Relay()
    relay.refuse.add(str(created.id))
    await m.start_running(a.id)
    await relay.drain(outbox_store, limit=1)
    [row] = await outbox_store.outbox_parked()
    full = await outbox_store.outbox_parked_row(row.row_id)
    assert full is not None
    assert full.body is not None
    assert f'"flow_id":"{a.id}"' in full.body.replace(" ", "")
    assert await outbox_store.outbox_parked_row(row.row_id + 1000) is None
    assert relay.sent == []
    assert await outbox_store.outbox_remove_parked(row.row_id)
    assert not await outbox_store.outbox_remove_parked(row.row_id)
    await relay.drain(outbox_store)
    assert [msg.topic for msg in relay.sent] == [f"evt.{a.id}.started"]


async def test_an_upper_case_outcome_token_is_the_same_flow(outbox_store: FlowStore) -> None:
    m = FlowManager(outbox_store)
    flow_id = uuid.uuid4()
    await m.create_managed(create_input(id=flow_id))
    [created] = await m.list_events(flow_id)
    relay = Relay()
    relay.refuse.add(str(created.id))
    await outbox_store.record_outcome("c-up", flow_id, str(flow_id).upper(), {"status": "x"})
    await relay.drain(outbox_store)
    assert relay.sent == []  # the outcome on the upper-case token waits behind the event


async def test_holding_names_the_message_ids_still_in_the_outbox(
    outbox_store: FlowStore,
) -> None:
    m = FlowManager(outbox_store)
    a = await m.create_managed(create_input())
    [created] = await m.list_events(a.id)
    assert await outbox_store.outbox_holding([str(created.id), "nope"]) == {str(created.id)}
    await Relay().drain(outbox_store)
    assert await outbox_store.outbox_holding([str(created.id)]) == set()
    assert outbox_store.outbox_turns() >= 1
