"""Property test: FlowManager on each store against a tiny reference model of the seed's
state machine (hypothesis stateful testing). Every rule either fails with the error the model
predicts and changes nothing, or changes exactly what the model predicts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from flowd import (
    AlreadyTerminal,
    CancelPending,
    FlowError,
    FlowManager,
    FlowStore,
    InMemoryFlowStore,
    InvalidInput,
    InvalidTransition,
)
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import create_input

LEGAL = {
    ("created", "running"),
    ("running", "waiting"),
    ("running", "finished"),
    ("running", "failed"),
    ("waiting", "running"),
    ("waiting", "failed"),
    ("created", "cancelled"),
    ("running", "cancelled"),
    ("waiting", "cancelled"),
}
TERMINAL = {"finished", "failed", "cancelled"}
STEP_TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Model:
    status: str
    state: dict[str, Any]
    revision: int
    mirrored: bool
    cancel: bool = False
    wait: dict[str, Any] | None = None
    step: str | None = "plan"
    steps: dict[str, str] = field(default_factory=dict)


def predicted(m: Model, to: str, only_from: str | None = None) -> type[FlowError] | None:
    if m.status in TERMINAL:
        return AlreadyTerminal
    if m.cancel and to != "cancelled":
        return CancelPending
    if (m.status, to) not in LEGAL or (only_from is not None and m.status != only_from):
        return InvalidTransition
    return None


keys = st.sampled_from(["a", "b", "c"])
patches = st.dictionaries(keys, st.integers(0, 3) | st.none() | st.just({"n": 1}), max_size=2)
bad_patches = st.sampled_from([[1], "x", 7])
valid_waits = st.sampled_from(
    [
        {"kind": "manual"},
        {"kind": "signal", "name": "go"},
        {"kind": "timer", "at": "2999-01-01T00:00:00+00:00"},
        {"kind": "subject", "subject": "orders.paid", "correlation_id": "o-1"},
    ]
)


class FlowMachine(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    store: FlowStore

    flows = Bundle("flows")

    def __init__(self) -> None:
        super().__init__()
        self.manager = FlowManager(self.store)
        self.models: dict[uuid.UUID, Model] = {}

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def attempt(
        self, flow_id: uuid.UUID, expected: type[FlowError] | None, call: Callable[[], Any]
    ) -> bool:
        """Run ``call``; assert it raised ``expected`` (changing nothing) or succeeded."""
        before = self.run(self.manager.get(flow_id))
        if expected is None:
            self.run(call())
            return True
        with pytest.raises(expected):
            self.run(call())
        assert self.run(self.manager.get(flow_id)) == before
        return False

    @rule(target=flows, mirrored=st.booleans(), state=patches)
    def create(self, mirrored: bool, state: dict[str, Any]) -> uuid.UUID:
        create = self.manager.create_mirrored if mirrored else self.manager.create_managed
        flow = self.run(create(create_input(state_json=state)))
        self.models[flow.id] = Model(
            status="running" if mirrored else "created",
            state=dict(state),
            revision=1 if mirrored else 0,
            mirrored=mirrored,
        )
        return flow.id

    def _move(
        self,
        flow_id: uuid.UUID,
        to: str,
        call: Callable[[], Any],
        only_from: str | None = None,
        patch: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        m = self.models[flow_id]
        if self.attempt(flow_id, predicted(m, to, only_from), call):
            m.status, m.revision = to, m.revision + 1
            m.state.update(patch or {})
            for key, value in changes.items():
                setattr(m, key, value)

    @rule(flow_id=flows)
    def start(self, flow_id: uuid.UUID) -> None:
        self._move(flow_id, "running", lambda: self.manager.start_running(flow_id), "created")

    @rule(flow_id=flows, wait=valid_waits)
    def wait(self, flow_id: uuid.UUID, wait: dict[str, Any]) -> None:
        call = lambda: self.manager.set_waiting(flow_id, wait)  # noqa: E731
        self._move(flow_id, "waiting", call, wait=wait)

    @rule(flow_id=flows, patch=st.none() | patches)
    def resume(self, flow_id: uuid.UUID, patch: dict[str, Any] | None) -> None:
        call = lambda: self.manager.resume(flow_id, patch)  # noqa: E731
        self._move(flow_id, "running", call, "waiting", patch, wait=None)

    @rule(flow_id=flows, patch=st.none() | patches)
    def finish(self, flow_id: uuid.UUID, patch: dict[str, Any] | None) -> None:
        self._move(flow_id, "finished", lambda: self.manager.finish(flow_id, patch), None, patch)

    @rule(flow_id=flows, reason=st.sampled_from(["x", ""]))
    def fail(self, flow_id: uuid.UUID, reason: str) -> None:
        m = self.models[flow_id]
        if self.attempt(
            flow_id, predicted(m, "failed"), lambda: self.manager.fail(flow_id, reason)
        ):
            failure = self.run(self.manager.get(flow_id)).state_json["failure"]
            assert failure["reason"] == reason
            m.status, m.revision, m.wait = "failed", m.revision + 1, None
            m.state["failure"] = failure

    @rule(flow_id=flows)
    def cancel(self, flow_id: uuid.UUID) -> None:
        self._move(flow_id, "cancelled", lambda: self.manager.cancel(flow_id), wait=None)

    @rule(flow_id=flows)
    def request_cancel(self, flow_id: uuid.UUID) -> None:
        m = self.models[flow_id]
        # never refused: on a terminal flow, or a repeat, it changes nothing (the original)
        self.attempt(flow_id, None, lambda: self.manager.request_cancel(flow_id))
        if m.status not in TERMINAL and not m.cancel:
            m.cancel, m.revision = True, m.revision + 1

    @rule(flow_id=flows, patch=patches, step=st.none() | st.sampled_from(["s1", "s2"]))
    def update(self, flow_id: uuid.UUID, patch: dict[str, Any], step: str | None) -> None:
        m = self.models[flow_id]
        expected = AlreadyTerminal if m.status in TERMINAL else CancelPending if m.cancel else None
        call = lambda: self.manager.update_state(flow_id, patch, step)  # noqa: E731
        if self.attempt(flow_id, expected, call):
            m.state.update(patch)
            m.revision += 1
            m.step = step or m.step

    @rule(flow_id=flows, bad=bad_patches)
    def bad_patch(self, flow_id: uuid.UUID, bad: Any) -> None:
        self.attempt(flow_id, InvalidInput, lambda: self.manager.update_state(flow_id, bad))

    @rule(
        flow_id=flows,
        run_id=st.sampled_from(["r1", "r2"]),
        status=st.sampled_from(["pending", "running", "succeeded", "failed", "cancelled"]),
    )
    def observe(self, flow_id: uuid.UUID, run_id: str, status: str) -> None:
        m = self.models[flow_id]
        obs = {"flow_id": flow_id, "run_id": run_id, "task": "t", "status": status}
        step = self.run(self.manager.record_step_observation(obs))
        old = m.steps.get(run_id)
        new = old if old in STEP_TERMINAL and status not in STEP_TERMINAL else status
        assert step.status.value == new
        if old != new:
            m.revision += 1
        m.steps[run_id] = new

    @invariant()
    def matches_model(self) -> None:
        for flow_id, m in self.models.items():
            flow = self.run(self.manager.get(flow_id))
            assert flow.status.value == m.status
            assert flow.revision == m.revision
            assert (flow.cancel_requested_at is not None) == m.cancel
            assert flow.wait_json == m.wait
            assert flow.current_step == m.step
            assert flow.state_json == m.state
            events = self.run(self.manager.list_events(flow_id))
            assert [e.revision for e in events] == list(range(m.revision + 1))
            steps = self.run(self.manager.list_steps(flow_id))
            assert {s.run_id: s.status.value for s in steps} == m.steps


def _run_machine(store: FlowStore, loop: asyncio.AbstractEventLoop, examples: int) -> None:
    machine = type("Machine", (FlowMachine,), {"loop": loop, "store": store})
    case = machine.TestCase
    case.settings = settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    case().runTest()


def test_manager_matches_model_on_memory_store() -> None:
    loop = asyncio.new_event_loop()
    try:
        _run_machine(InMemoryFlowStore(), loop, examples=150)
    finally:
        loop.close()


@pytest.mark.postgres
def test_manager_matches_model_on_postgres_store(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        store = loop.run_until_complete(PostgresFlowStore.connect(database_url))
        try:
            _run_machine(store, loop, examples=40)
        finally:
            loop.run_until_complete(store.close())
    finally:
        loop.close()
