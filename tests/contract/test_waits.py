"""Waits and signals on both stores: validation, durable signals, indexed due conditions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flowd import AlreadyTerminal, FlowManager, FlowStatus, FlowStore, InvalidInput
from tests.support.factories import running_flow

PAST = "2000-01-01T00:00:00+00:00"
FUTURE = "2999-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    "wait",
    [
        {"kind": "timer", "at": PAST},
        {"kind": "subject", "subject": "orders.paid", "correlation_id": "o-1"},
        {"kind": "signal", "name": "approve"},
        {"kind": "manual"},
        {"kind": "external_event", "topic": "orders.paid", "correlation_id": "o-1"},
        {
            "kind": "any",
            "of": [{"kind": "signal", "name": "a"}, {"kind": "timer", "at": FUTURE}],
            "timeout_at": FUTURE,
            "on_timeout": "fail",
        },
    ],
)
async def test_valid_waits_are_accepted(manager: FlowManager, wait: dict[str, object]) -> None:
    flow = await running_flow(manager)
    assert (await manager.set_waiting(flow.id, wait)).wait_json == wait


@pytest.mark.parametrize(
    "wait",
    [
        {},
        {"kind": "sleep"},
        {"kind": "timer"},
        {"kind": "timer", "at": "tomorrow"},
        {"kind": "timer", "at": "2030-01-01T00:00:00"},  # no offset: ambiguous
        {"kind": "subject", "subject": "a.*", "correlation_id": "x"},
        {"kind": "subject", "subject": "a.b"},
        {"kind": "signal", "name": ""},
        {"kind": "any", "of": []},
        {"kind": "any", "of": [{"kind": "any", "of": [{"kind": "manual"}]}]},
        {"kind": "any", "of": [{"kind": "manual"}], "on_timeout": "explode"},
        {"kind": "manual", "extra": 1},
        {"kind": "timer", "at": "0001-01-01T00:00:00+00:00"},
        {"kind": "any", "of": [{"kind": "manual"}], "timeout_at": "9999-06-01T00:00:00Z"},
        {"kind": "subject", "subject": "..", "correlation_id": "x"},
        {"kind": "subject", "subject": "a.b", "correlation_id": "x\u0000"},
        {"kind": "signal", "name": "\ud800"},
    ],
)
async def test_invalid_waits_are_invalid_input(
    manager: FlowManager, wait: dict[str, object]
) -> None:
    flow = await running_flow(manager)
    with pytest.raises(InvalidInput):
        await manager.set_waiting(flow.id, wait)
    assert (await manager.get(flow.id)) == flow


async def test_waits_on_reserved_subjects_are_invalid_input(store: FlowStore) -> None:
    manager = FlowManager(store, reserved_subjects=("flows.cmd", "flows.relay"))
    flow = await running_flow(manager)
    for name in ("flows.cmd.x.start", "flows.relay"):
        with pytest.raises(InvalidInput) as info:
            await manager.set_waiting(
                flow.id, {"kind": "subject", "subject": name, "correlation_id": "c"}
            )
        assert list(info.value.errors) == ["wait_json.subject"]
    ok = {"kind": "subject", "subject": "flows.wake.x", "correlation_id": "c"}
    assert (await manager.set_waiting(flow.id, ok)).wait_json == ok


async def test_signal_before_wait_is_kept_and_consumed_once(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.signal(flow.id, "approve", {"by": "ops"})
    assert (flow.status, flow.revision) == (FlowStatus.RUNNING, 2)
    flow = await manager.set_waiting(flow.id, {"kind": "signal", "name": "approve"})
    assert flow.status is FlowStatus.RUNNING  # resumed at once by the kept signal
    assert flow.revision == 4
    assert flow.wait_json is None
    assert flow.state_json["wake"]["cause"] == "signal"  # type: ignore[index]
    assert flow.state_json["wake"]["payload"] == {"by": "ops"}  # type: ignore[index]
    events = await manager.list_events(flow.id)
    assert [e.kind for e in events] == [
        "created",
        "started",
        "signal_received",
        "waiting",
        "resumed",
    ]
    assert events[-1].payload["cause"]["name"] == "approve"  # type: ignore[index]
    # consumed: a second wait for the same name really waits
    flow = await manager.set_waiting(flow.id, {"kind": "signal", "name": "approve"})
    assert flow.status is FlowStatus.WAITING


async def test_signal_while_waiting_resumes(manager: FlowManager, store: FlowStore) -> None:
    flow = await running_flow(manager)
    wait = {
        "kind": "any",
        "of": [{"kind": "signal", "name": "go"}, {"kind": "timer", "at": FUTURE}],
    }
    await manager.set_waiting(flow.id, wait)
    other = await manager.signal(flow.id, "unrelated")
    assert other.status is FlowStatus.WAITING
    flow = await manager.signal(flow.id, "go", 7)
    assert flow.status is FlowStatus.RUNNING
    assert flow.state_json["wake"]["payload"] == 7  # type: ignore[index]
    assert [s.name for s in await store.pending_signals(flow.id)] == ["unrelated"]
    now = datetime(3000, 1, 1, tzinfo=UTC)
    assert await store.claim_due(now, now, 10) == []  # the timer left with the wait


async def test_signal_on_terminal_flow_is_refused(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    await manager.cancel(flow.id)
    with pytest.raises(AlreadyTerminal):
        await manager.signal(flow.id, "go")


async def test_due_conditions_are_claimed_once_per_lease(
    manager: FlowManager, store: FlowStore
) -> None:
    due = await running_flow(manager)
    later = await running_flow(manager)
    await manager.set_waiting(due.id, {"kind": "timer", "at": PAST})
    await manager.set_waiting(later.id, {"kind": "timer", "at": FUTURE})
    now = datetime.now(UTC)
    claimed = await store.claim_due(now, now + timedelta(seconds=30), 10)
    assert [(d.flow_id, d.condition.kind, d.revision) for d in claimed] == [(due.id, "timer", 2)]
    assert await store.claim_due(now, now + timedelta(seconds=30), 10) == []  # leased
    after_lease = now + timedelta(seconds=31)
    again = await store.claim_due(after_lease, after_lease + timedelta(seconds=30), 10)
    assert [d.flow_id for d in again] == [due.id]
    await manager.resume(due.id)
    far = now + timedelta(days=365 * 2000)
    assert [d.flow_id for d in await store.claim_due(far, far, 10)] == [later.id]


async def test_any_timeout_and_cancel_while_waiting_are_due_conditions(
    manager: FlowManager, store: FlowStore
) -> None:
    a = await running_flow(manager)
    await manager.set_waiting(
        a.id, {"kind": "any", "of": [{"kind": "manual"}], "timeout_at": PAST, "on_timeout": "fail"}
    )
    b = await running_flow(manager)
    await manager.set_waiting(b.id, {"kind": "signal", "name": "never"})
    await manager.request_cancel(b.id)
    now = datetime.now(UTC)
    claimed = {d.flow_id: d.condition for d in await store.claim_due(now, now, 10)}
    assert (claimed[a.id].kind, claimed[a.id].on_timeout) == ("timeout", "fail")
    assert claimed[b.id].kind == "cancel"


async def test_subject_waits_are_indexed(manager: FlowManager, store: FlowStore) -> None:
    a = await running_flow(manager)
    b = await running_flow(manager)
    await manager.set_waiting(
        a.id, {"kind": "subject", "subject": "orders.paid", "correlation_id": "o-1"}
    )
    await manager.set_waiting(
        b.id, {"kind": "external_event", "topic": "orders.paid", "correlation_id": "o-2"}
    )
    assert await store.flows_waiting_on("orders.paid", "o-1") == [a.id]
    assert await store.flows_waiting_on("orders.paid", "o-3") == []
    assert await store.wait_subjects() == ["orders.paid"]
    await manager.cancel(a.id)
    await manager.cancel(b.id)
    assert await store.wait_subjects() == []


async def test_unknown_flow_signal_is_not_found(manager: FlowManager) -> None:
    from flowd import FlowNotFound

    with pytest.raises(FlowNotFound):
        await manager.signal(uuid.uuid4(), "go")
