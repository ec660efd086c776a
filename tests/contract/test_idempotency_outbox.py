"""Exactly-once building blocks, on both stores: processed command ids and the outbox."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from flowd import FlowManager, FlowStore, InvalidTransition, RevisionMismatch
from flowd.core.errors import DuplicateCommand, IdempotencyConflict, InvalidInput
from flowd.core.outbox import OutboxMessage
from flowd.core.requests import Claim, Request
from tests.support.factories import create_input


def body(message: OutboxMessage) -> Any:
    """The message body as an object (a store may hand it over as stored JSON text)."""
    return json.loads(message.body) if isinstance(message.body, str) else message.body


async def drain_all(store: FlowStore) -> list[OutboxMessage]:
    sent: list[OutboxMessage] = []

    async def publish(batch: list[OutboxMessage]) -> None:
        sent.extend(batch)

    while await store.drain_outbox(publish, limit=3):
        pass
    return sent


async def test_a_command_id_applies_once(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_managed(create_input(), command_id="c-create")
    await manager.start_running(flow.id, command_id="c-start")
    with pytest.raises(DuplicateCommand) as info:
        await manager.update_state(flow.id, {"x": 1}, command_id="c-start")
    assert info.value.outcome["status"] == "applied"
    assert info.value.outcome["revision"] == 1
    with pytest.raises(DuplicateCommand):
        await manager.create_managed(create_input(), command_id="c-create")
    assert (await manager.get(flow.id)).revision == 1
    assert await outbox_store.list_flows() == [await manager.get(flow.id)]
    assert await outbox_store.get_outcome("c-start") == info.value.outcome
    assert await outbox_store.get_outcome("unknown") is None


async def test_rejection_and_unchanged_outcomes_are_recorded_once(
    outbox_store: FlowStore,
) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_managed(create_input())
    with pytest.raises(InvalidTransition) as info:
        await manager.finish(flow.id, command_id="c-bad")
    await manager.record_rejection("c-bad", flow.id, str(flow.id), info.value)
    with pytest.raises(DuplicateCommand) as dup:
        await manager.record_rejection("c-bad", flow.id, str(flow.id), info.value)
    assert dup.value.outcome["code"] == "invalid_transition"

    await manager.request_cancel(flow.id, command_id="c-rc1")
    await manager.request_cancel(flow.id, command_id="c-rc2")  # no-op, still one outcome
    assert await outbox_store.get_outcome("c-rc2") == {
        "status": "unchanged",
        "flow_id": str(flow.id),
        "revision": 1,
    }
    sent = await drain_all(outbox_store)
    assert [(m.topic, m.command_id) for m in sent] == [
        (f"evt.{flow.id}.created", None),
        (f"out.{flow.id}", "c-bad"),
        (f"evt.{flow.id}.cancel_requested", "c-rc1"),
        (f"out.{flow.id}", "c-rc2"),
    ]
    assert body(sent[1])["status"] == "rejected"
    assert body(sent[1])["details"]["reason"] == "illegal_transition"


async def test_outbox_has_one_message_per_event_in_order(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_mirrored(create_input(), command_id="c1")
    await manager.update_state(flow.id, {"a": 1}, command_id="c2")
    await manager.finish(flow.id, command_id="c3")
    assert await outbox_store.outbox_backlog() == 4
    sent = await drain_all(outbox_store)
    events = await manager.list_events(flow.id)
    assert [m.msg_id for m in sent] == [str(e.id) for e in events]
    assert [body(m)["revision"] for m in sent] == [0, 1, 2, 3]
    assert [body(m)["final"] for m in sent] == [False, True, True, True]
    first = body(sent[0])["flow"]
    assert (first["status"], first["revision"]) == ("created", 0)  # snapshot after *that* event
    last = body(sent[-1])
    assert last["flow"]["status"] == "finished"
    assert last["command_id"] == "c3"
    assert last["kind"] == "finished"
    assert await outbox_store.outbox_backlog() == 0


async def test_a_store_without_an_outbox_queues_nothing(store: FlowStore) -> None:
    """The library's mode: changes are written with their events, and no message."""
    manager = FlowManager(store)
    flow = await manager.create_managed(create_input(), command_id="c-1")
    await manager.start_running(flow.id, command_id="c-2")
    mirrored = await manager.create_mirrored(create_input(), command_id="c-3")  # two events
    assert [e.kind for e in await manager.list_events(flow.id)] == ["created", "started"]
    assert [e.kind for e in await manager.list_events(mirrored.id)] == ["created", "started"]
    assert await store.outbox_backlog() == 0
    assert await drain_all(store) == []


async def test_failed_publish_deletes_nothing(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    await manager.create_managed(create_input())

    async def broken(batch: list[OutboxMessage]) -> None:
        raise ConnectionError("nats down")

    with pytest.raises(ConnectionError):
        await outbox_store.drain_outbox(broken)
    assert await outbox_store.outbox_backlog() == 1
    assert len(await drain_all(outbox_store)) == 1


async def test_rolled_back_change_queues_nothing(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_managed(create_input())
    await drain_all(outbox_store)
    with pytest.raises(RevisionMismatch):
        await manager.start_running(flow.id, expected_revision=5, command_id="stale")
    assert await outbox_store.outbox_backlog() == 0
    assert await outbox_store.get_outcome("stale") is None


async def test_only_one_drainer_at_a_time(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    for _ in range(3):
        await manager.create_managed(create_input())
    gate, started = asyncio.Event(), asyncio.Event()

    async def slow(batch: list[OutboxMessage]) -> None:
        started.set()
        await gate.wait()

    first = asyncio.create_task(outbox_store.drain_outbox(slow))
    await started.wait()
    assert await outbox_store.drain_outbox(slow) == 0  # the first holds the lock
    gate.set()
    assert await first == 3


async def test_concurrent_duplicates_apply_once(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_managed(create_input(id=uuid.uuid4()))
    await manager.start_running(flow.id)
    results = await asyncio.gather(
        *(manager.update_state(flow.id, {"n": 1}, command_id="same") for _ in range(5)),
        return_exceptions=True,
    )
    applied = [r for r in results if not isinstance(r, BaseException)]
    assert len(applied) == 1
    assert all(
        isinstance(r, DuplicateCommand | RevisionMismatch) for r in results if r not in applied
    )
    assert (await manager.get(flow.id)).revision == 2


async def test_the_same_id_for_another_request_is_a_conflict(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    flow = await manager.create_managed(create_input(), command_id=Claim("c0", Request("x", "0")))
    start = Request("start", "d-start")
    await manager.start_running(flow.id, command_id=Claim("c1", start))
    sent = len(await drain_all(outbox_store))
    first = await outbox_store.get_first_use("c1")
    assert first is not None
    assert (first.verb, first.digest, first.flow_id) == ("start", "d-start", flow.id)
    expected = {"command_id": "c1", "first": first.as_json()}
    assert first.as_json()["verb"] == "start"

    other = Claim("c1", Request("update", "d-update"))
    with pytest.raises(IdempotencyConflict) as conflict:
        await manager.update_state(flow.id, {"x": 1}, command_id=other)
    assert conflict.value.details() == expected
    with pytest.raises(IdempotencyConflict):
        await manager.record_rejection(other, flow.id, str(flow.id), InvalidInput("bad"))
    # the same request, a plain id, or a record without a request: a repeat, as before
    with pytest.raises(DuplicateCommand):
        await manager.update_state(flow.id, {"x": 1}, command_id=Claim("c1", start))
    with pytest.raises(DuplicateCommand):
        await manager.update_state(flow.id, {"x": 1}, command_id="c1")
    await manager.update_state(flow.id, {"y": 1}, command_id="c-plain")
    assert (await outbox_store.get_first_use("c-plain")).digest is None  # type: ignore[union-attr]
    with pytest.raises(DuplicateCommand):
        await manager.update_state(flow.id, {"z": 1}, command_id=Claim("c-plain", start))
    # nothing of the refused ones was written or announced
    now = await manager.get(flow.id)
    assert (now.revision, now.state_json) == (2, {**flow.state_json, "y": 1})
    assert len(await drain_all(outbox_store)) == 1  # the c-plain update's event
    assert sent == 2
    assert (await outbox_store.get_outcome("c1"))["status"] == "applied"  # type: ignore[index]
    assert await outbox_store.get_first_use("unknown") is None
