"""The state machine as pure functions: (flow, operation, now) -> Change, or an error.

Nothing here does I/O, reads a clock or makes ids: ``now`` and ``new_id`` are arguments, so
the same inputs always give the same ``Change``. ``FlowManager`` feeds these functions and
commits what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from pydantic import JsonValue

from flowd.core import errors, jsontext, waits
from flowd.core.models import (
    CreateManagedInput,
    Flow,
    FlowEvent,
    FlowStep,
    JsonObject,
    StepObservation,
)
from flowd.core.status import FlowStatus, SyncMode, is_legal

NewId = Callable[[], UUID]

#: The default limit of a flow's ``state_json``, serialized (``FLOWD_MAX_STATE_BYTES``). An
#: event carries the flow's state next to at most two more copies of a command body or of
#: the state (a wait and its snapshot; a wake's patch and cause): 256 KiB leaves every event
#: within NATS's default max_payload of 1 MiB with the default FLOWD_MAX_PAYLOAD of 256 KiB
#: (core.outbox.largest_event_bytes).
MAX_STATE_BYTES: Final = 262_144


@dataclass(frozen=True, slots=True)
class Change:
    """What one operation writes, atomically: the flow row, its events, maybe a step.

    ``expected_revision`` is None for an insert (a new flow) and otherwise the revision the
    row must still have for the write to land.
    """

    flow: Flow
    events: tuple[FlowEvent, ...]
    expected_revision: int | None
    step: FlowStep | None = None
    #: Wait conditions to index: None leaves them as they are, () clears, else replaces.
    conditions: tuple[waits.Condition, ...] | None = None
    #: A signal to keep for a later wait, or the id of a kept signal this change consumed.
    signal: waits.Signal | None = None
    consumed_signal: int | None = None
    #: Fields that differ in the flow as it was after each event but the last (only a
    #: mirrored create has two events: ``created`` at revision 0, then ``started``).
    before_last: Mapping[str, Any] = field(default_factory=dict)


def _event(flow: Flow, kind: str, payload: JsonObject, now: datetime, new_id: NewId) -> FlowEvent:
    return FlowEvent(
        id=new_id(), flow_id=flow.id, revision=flow.revision, kind=kind, payload=payload, at=now
    )


def require_object(value: object, field: str) -> JsonObject:
    """``value`` as a JSON object, or InvalidInput: patches and waits must be objects."""
    if not isinstance(value, dict):
        raise errors.InvalidInput(
            f"{field} must be a JSON object, got {type(value).__name__}",
            {field: "must be a JSON object"},
        )
    for key in value:
        if not isinstance(key, str):
            raise errors.InvalidInput(f"{field} keys must be strings", {field: "non-string key"})
    return value


def state_size(state: Mapping[str, JsonValue]) -> int:
    """The bytes of ``state`` as the stores write it (compact JSON, UTF-8)."""
    return jsontext.size(state)


def check_state(change: Change, before: Flow | None, limit: int | None) -> Change:
    """``change``, unless it writes a state other than ``before``'s (or a new flow's) that is
    larger than ``limit`` bytes: then ``StateTooLarge``. A write that leaves the state as it
    was passes, whatever its size (a flow stored before the limit was lowered can still
    start, wait, be cancelled)."""
    state = change.flow.state_json
    if limit is None or (before is not None and state is before.state_json):
        return change
    size = state_size(state)
    if size > limit and (before is None or state != before.state_json):
        raise errors.StateTooLarge(size, limit)
    return change


def merge(state: Mapping[str, JsonValue], patch: Mapping[str, JsonValue] | None) -> JsonObject:
    """Shallow merge: top-level keys of ``patch`` replace those of ``state``."""
    merged = dict(state)
    if patch:
        merged.update(patch)
    return merged


def create(
    data: CreateManagedInput,
    *,
    mode: SyncMode,
    now: datetime,
    new_id: NewId,
) -> Change:
    """A new flow. Managed flows are born ``created`` (one event); mirrored ones are created and
    started in the same change, so they are ``running`` at revision 1 with two events."""
    flow = Flow(
        id=data.id or new_id(),
        controller_id=data.controller_id,
        goal=data.goal,
        owner_session_key=data.owner_session_key,
        requester_origin=data.requester_origin,
        sync_mode=mode,
        status=FlowStatus.CREATED,
        current_step=data.current_step,
        state_json=dict(data.state_json),
        revision=0,
        created_at=now,
        updated_at=now,
    )
    created = _event(
        flow,
        "created",
        {
            "goal": flow.goal,
            "controller_id": flow.controller_id,
            "owner_session_key": flow.owner_session_key,
            "current_step": flow.current_step,
            "sync_mode": mode.value,
        },
        now,
        new_id,
    )
    if mode is SyncMode.MANAGED:
        return Change(flow, (created,), None)
    running = flow.evolve(status=FlowStatus.RUNNING, revision=1)
    return Change(
        running,
        (created, _event(running, "started", {}, now, new_id)),
        None,
        before_last={"status": FlowStatus.CREATED, "revision": 0},
    )


def check_move(flow: Flow, to: FlowStatus) -> None:
    """The seed's checks, in the seed's order: terminal, cancel pending, table."""
    if flow.status.terminal:
        raise errors.AlreadyTerminal(flow.id, flow.status, to)
    if flow.cancel_requested_at is not None and to is not FlowStatus.CANCELLED:
        raise errors.CancelPending(flow.id, flow.status, to)
    if not is_legal(flow.status, to):
        raise errors.InvalidTransition(flow.id, flow.status, to)


def _move(
    flow: Flow,
    to: FlowStatus,
    kind: str,
    payload: JsonObject,
    now: datetime,
    new_id: NewId,
    *,
    only_from: FlowStatus | None = None,
    **changes: Any,
) -> Change:
    check_move(flow, to)
    if only_from is not None and flow.status is not only_from:
        # The table allows created -> running, but only `start` takes that edge and only
        # `resume` takes waiting -> running.
        raise errors.InvalidTransition(flow.id, flow.status, to)
    after = flow.evolve(status=to, revision=flow.revision + 1, updated_at=now, **changes)
    cleared = () if flow.status is FlowStatus.WAITING else None
    return Change(
        after, (_event(after, kind, payload, now, new_id),), flow.revision, conditions=cleared
    )


def start(flow: Flow, *, now: datetime, new_id: NewId) -> Change:
    """created -> running."""
    return _move(flow, FlowStatus.RUNNING, "started", {}, now, new_id, only_from=FlowStatus.CREATED)


def set_waiting(
    flow: Flow,
    wait: object,
    *,
    now: datetime,
    new_id: NewId,
    pending: tuple[waits.Signal, ...] = (),
) -> Change:
    """running -> waiting, recording what the flow waits for.

    If a kept signal (``pending``, oldest first) already matches the wait, the flow is
    resumed in the same change: events ``waiting`` then ``resumed``, the signal consumed.
    """
    wait_json = require_object(wait, "wait_json")
    typed = waits.parse(wait_json)
    change = _move(
        flow, FlowStatus.WAITING, "waiting", {"wait": wait_json}, now, new_id, wait_json=wait_json
    )
    names = waits.signal_names(typed)
    match = next((sig for sig in pending if sig.name in names), None)
    if match is None:
        return replace(change, conditions=waits.conditions(typed))
    woken = _resume_change(
        change.flow,
        waits.wake("signal", now, name=match.name, payload=match.payload),
        now,
        new_id,
    )
    return Change(
        woken.flow,
        (*change.events, *woken.events),
        flow.revision,
        conditions=(),
        consumed_signal=match.id,
        before_last={
            "status": FlowStatus.WAITING,
            "revision": change.flow.revision,
            "wait_json": wait_json,
            "state_json": flow.state_json,
        },
    )


def _resume_change(flow: Flow, wake: JsonObject, now: datetime, new_id: NewId) -> Change:
    return resume(flow, {"wake": wake}, now=now, new_id=new_id, cause=wake)


def signal(
    flow: Flow, name: str, payload: JsonValue = None, *, now: datetime, new_id: NewId
) -> Change:
    """Deliver signal ``name``: resume the flow if it waits for it, else keep the signal for
    a later wait (event ``signal_received``). Either way the revision moves, so a signal and
    a concurrent ``set_waiting`` are serialised and no wake-up is lost."""
    _require_mutable(flow)
    if (
        flow.status is FlowStatus.WAITING
        and flow.cancel_requested_at is None
        and flow.wait_json is not None
        and name in waits.stored_signal_names(flow.wait_json)
    ):
        return _resume_change(
            flow, waits.wake("signal", now, name=name, payload=payload), now, new_id
        )
    after = flow.evolve(revision=flow.revision + 1, updated_at=now)
    event = _event(after, "signal_received", {"name": name}, now, new_id)
    kept = waits.Signal(None, flow.id, name, payload, now)
    return Change(after, (event,), flow.revision, signal=kept)


def resume(
    flow: Flow,
    patch: object = None,
    *,
    now: datetime,
    new_id: NewId,
    cause: JsonObject | None = None,
) -> Change:
    """waiting -> running; clears the wait and shallow-merges ``patch`` into the state."""
    state_patch = None if patch is None else require_object(patch, "state_patch")
    payload: JsonObject = {"patch": state_patch}
    if cause is not None:
        payload["cause"] = cause
    return _move(
        flow,
        FlowStatus.RUNNING,
        "resumed",
        payload,
        now,
        new_id,
        only_from=FlowStatus.WAITING,
        wait_json=None,
        state_json=merge(flow.state_json, state_patch),
    )


def finish(flow: Flow, final_state: object = None, *, now: datetime, new_id: NewId) -> Change:
    """running -> finished, after merging the optional final patch."""
    patch = None if final_state is None else require_object(final_state, "final_state")
    return _move(
        flow,
        FlowStatus.FINISHED,
        "finished",
        {"final_state": patch},
        now,
        new_id,
        state_json=merge(flow.state_json, patch),
    )


def fail(flow: Flow, reason: str, *, now: datetime, new_id: NewId) -> Change:
    """running | waiting -> failed; the reason goes to the event and ``state_json.failure``."""
    if not isinstance(reason, str):
        raise errors.InvalidInput("reason must be a string", {"reason": "must be a string"})
    failure: JsonObject = {"reason": reason, "at": now.isoformat()}
    return _move(
        flow,
        FlowStatus.FAILED,
        "failed",
        {"reason": reason},
        now,
        new_id,
        state_json=merge(flow.state_json, {"failure": failure}),
        wait_json=None,
    )


def cancel(flow: Flow, *, now: datetime, new_id: NewId) -> Change:
    """Any non-terminal status -> cancelled."""
    return _move(flow, FlowStatus.CANCELLED, "cancelled", {}, now, new_id, wait_json=None)


def _require_mutable(flow: Flow) -> None:
    if flow.status.terminal:
        raise errors.AlreadyTerminal(flow.id, flow.status, flow.status)


def request_cancel(flow: Flow, *, now: datetime, new_id: NewId) -> Change | None:
    """Set the sticky cancel intent; status unchanged. None (nothing to do) when it is
    already set or the flow is terminal, as in the original FlowManager."""
    if flow.status.terminal or flow.cancel_requested_at is not None:
        return None
    after = flow.evolve(cancel_requested_at=now, revision=flow.revision + 1, updated_at=now)
    # A waiting flow with a cancel request is the engine's to cancel: index it as due now.
    due = (waits.Condition("cancel", due_at=now),) if flow.status is FlowStatus.WAITING else None
    event = _event(after, "cancel_requested", {}, now, new_id)
    return Change(after, (event,), flow.revision, conditions=due)


def update_state(
    flow: Flow,
    patch: object,
    next_step: str | None = None,
    *,
    now: datetime,
    new_id: NewId,
) -> Change:
    """Merge ``patch`` into the state and maybe move ``current_step``; status unchanged."""
    state_patch = require_object(patch, "patch")
    if next_step is not None and not isinstance(next_step, str):
        raise errors.InvalidInput("next_step must be a string", {"next_step": "must be a string"})
    _require_mutable(flow)
    if flow.cancel_requested_at is not None:
        raise errors.CancelPending(flow.id, flow.status, flow.status)
    after = flow.evolve(
        state_json=merge(flow.state_json, state_patch),
        current_step=next_step if next_step is not None else flow.current_step,
        revision=flow.revision + 1,
        updated_at=now,
    )
    payload: JsonObject = {"patch": state_patch, "next_step": next_step}
    return Change(after, (_event(after, "state_updated", payload, now, new_id),), flow.revision)


def observe_step(
    flow: Flow,
    existing: FlowStep | None,
    obs: StepObservation,
    *,
    now: datetime,
    new_id: NewId,
) -> Change | None:
    """Upsert the step ``(flow, run_id)``. Allowed on terminal flows (late reports count).

    A late non-terminal report never overwrites a terminal step: when that is all the
    observation says, nothing changes and None is returned.
    """
    if existing is None:
        step = FlowStep(
            id=new_id(),
            flow_id=flow.id,
            run_id=obs.run_id,
            task=obs.task,
            status=obs.status,
            child_session_key=obs.child_session_key,
            result_json=obs.result_json,
            created_at=now,
            updated_at=now,
        )
    else:
        status = obs.status
        if existing.status.terminal and not status.terminal:
            status = existing.status
        step = existing.model_copy(
            update={
                "task": obs.task,
                "status": status,
                "child_session_key": obs.child_session_key or existing.child_session_key,
                "result_json": (
                    existing.result_json if status is not obs.status else obs.result_json
                ),
            }
        )
        if step == existing:
            return None
        step = step.model_copy(update={"updated_at": now})
    after = flow.evolve(revision=flow.revision + 1, updated_at=now)
    payload: JsonObject = {
        "run_id": step.run_id,
        "task": step.task,
        "status": step.status.value,
        "runtime": "mirrored",
    }
    event = _event(after, "step_observed", payload, now, new_id)
    return Change(after, (event,), flow.revision, step)
