"""The pure core: deterministic, no I/O, errors in the seed's order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from flowd.core import apply, errors
from flowd.core.models import StepObservation
from flowd.core.status import FlowStatus, FlowStepStatus, SyncMode
from tests.support.factories import create_input

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def ids() -> apply.NewId:
    n = iter(range(1, 1000))
    return lambda: uuid.UUID(int=next(n))


def test_create_is_deterministic() -> None:
    a = apply.create(create_input(), mode=SyncMode.MANAGED, now=NOW, new_id=ids())
    b = apply.create(create_input(), mode=SyncMode.MANAGED, now=NOW, new_id=ids())
    assert a == b
    assert a.expected_revision is None
    assert (a.flow.revision, a.flow.status) == (0, FlowStatus.CREATED)


def test_mirrored_create_has_two_events_and_is_running() -> None:
    change = apply.create(create_input(), mode=SyncMode.MIRRORED, now=NOW, new_id=ids())
    assert [(e.kind, e.revision) for e in change.events] == [("created", 0), ("started", 1)]
    assert (change.flow.status, change.flow.revision) == (FlowStatus.RUNNING, 1)


def test_checks_run_in_seed_order() -> None:
    flow = apply.create(create_input(), mode=SyncMode.MIRRORED, now=NOW, new_id=ids()).flow
    pending = flow.evolve(cancel_requested_at=NOW)
    # cancel pending beats "not in table" (running -> running via start)
    with pytest.raises(errors.CancelPending):
        apply.start(pending, now=NOW, new_id=ids())
    # terminal beats cancel pending
    done = pending.evolve(status=FlowStatus.FINISHED)
    with pytest.raises(errors.AlreadyTerminal):
        apply.start(done, now=NOW, new_id=ids())
    # cancel is allowed while pending
    assert apply.cancel(pending, now=NOW, new_id=ids()).flow.status is FlowStatus.CANCELLED


def test_fail_stamps_failure_with_rfc3339_time() -> None:
    flow = apply.create(create_input(), mode=SyncMode.MIRRORED, now=NOW, new_id=ids()).flow
    change = apply.fail(flow, "boom", now=NOW, new_id=ids())
    assert change.flow.state_json["failure"] == {"reason": "boom", "at": NOW.isoformat()}


def test_merge_is_shallow() -> None:
    assert apply.merge({"a": {"x": 1}, "b": 2}, {"a": {"y": 2}}) == {"a": {"y": 2}, "b": 2}
    assert apply.merge({"a": 1}, None) == {"a": 1}


def test_error_codes_are_stable() -> None:
    flow_id = uuid.UUID(int=1)
    assert errors.FlowNotFound(flow_id).code == "not_found"
    assert errors.InvalidTransition(flow_id, FlowStatus.CREATED, FlowStatus.WAITING).code == (
        "invalid_transition"
    )
    assert errors.AlreadyTerminal(flow_id, FlowStatus.FAILED, FlowStatus.RUNNING).code == (
        "invalid_transition"
    )
    assert errors.RevisionMismatch(flow_id, 1, 2).code == "revision_mismatch"
    assert errors.InvalidInput("x").code == "invalid_input"
    assert errors.StoreUnavailable().transient
    assert errors.RevisionMismatch(flow_id, 1, 2).details() == {
        "flow_id": str(flow_id),
        "expected": 1,
        "actual": 2,
    }


def test_observation_keeps_terminal_status_but_takes_newer_terminal() -> None:
    flow = apply.create(create_input(), mode=SyncMode.MIRRORED, now=NOW, new_id=ids()).flow
    obs = StepObservation(flow_id=flow.id, run_id="r", task="t", status=FlowStepStatus.SUCCEEDED)
    first = apply.observe_step(flow, None, obs, now=NOW, new_id=ids())
    assert first is not None
    assert first.step is not None
    late = obs.model_copy(update={"status": FlowStepStatus.RUNNING})
    assert apply.observe_step(first.flow, first.step, late, now=NOW, new_id=ids()) is None
    corrected = obs.model_copy(update={"status": FlowStepStatus.FAILED})
    change = apply.observe_step(first.flow, first.step, corrected, now=NOW, new_id=ids())
    assert change is not None
    assert change.step is not None
    assert change.step.status is FlowStepStatus.FAILED
