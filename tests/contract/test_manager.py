"""The one suite both stores must pass, driven through FlowManager as a user would."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flowd import (
    AlreadyTerminal,
    CancelPending,
    FlowExists,
    FlowManager,
    FlowNotFound,
    FlowStatus,
    FlowStepStatus,
    FlowStore,
    InvalidInput,
    InvalidTransition,
    RevisionMismatch,
    StepObservation,
    SyncMode,
)
from tests.support.factories import YieldingStore, create_input, running_flow


async def kinds(manager: FlowManager, flow_id: uuid.UUID) -> list[str]:
    return [e.kind for e in await manager.list_events(flow_id)]


async def assert_unchanged(manager: FlowManager, before: object) -> None:
    assert await manager.get(before.id) == before  # type: ignore[attr-defined]
    events = await manager.list_events(before.id)  # type: ignore[attr-defined]
    assert [e.revision for e in events] == list(range(before.revision + 1))  # type: ignore[attr-defined]


async def test_happy_path_create_run_wait_resume_finish(manager: FlowManager) -> None:
    flow = await manager.create_managed(create_input())
    assert (flow.status, flow.revision, flow.sync_mode) == (FlowStatus.CREATED, 0, SyncMode.MANAGED)
    flow = await manager.start_running(flow.id)
    flow = await manager.set_waiting(flow.id, {"kind": "manual"})
    assert (flow.status, flow.wait_json) == (FlowStatus.WAITING, {"kind": "manual"})
    flow = await manager.resume(flow.id, {"approved": True})
    assert (flow.status, flow.wait_json) == (FlowStatus.RUNNING, None)
    flow = await manager.finish(flow.id, {"result": "ok"})
    assert flow.status is FlowStatus.FINISHED
    assert flow.state_json == {"n": 0, "approved": True, "result": "ok"}
    assert flow.revision == 4
    assert await kinds(manager, flow.id) == ["created", "started", "waiting", "resumed", "finished"]
    assert await manager.get(flow.id) == flow


async def test_create_appends_an_audit_event(manager: FlowManager) -> None:
    flow = await manager.create_managed(create_input(goal="g", controller_id="c"))
    [event] = await manager.list_events(flow.id)
    assert (event.kind, event.revision, event.flow_id) == ("created", 0, flow.id)
    assert event.payload["goal"] == "g"
    assert event.payload["controller_id"] == "c"
    assert event.payload["current_step"] == "plan"


async def test_client_supplied_id_is_kept_and_unique(manager: FlowManager) -> None:
    flow_id = uuid.uuid4()
    flow = await manager.create_managed(create_input(id=flow_id))
    assert flow.id == flow_id
    with pytest.raises(FlowExists):
        await manager.create_managed(create_input(id=flow_id))
    assert await kinds(manager, flow_id) == ["created"]


async def test_fail_records_reason_in_state_and_event(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.fail(flow.id, "disk full")
    assert flow.status is FlowStatus.FAILED
    assert flow.state_json["failure"]["reason"] == "disk full"  # type: ignore[index]
    datetime.fromisoformat(flow.state_json["failure"]["at"])  # type: ignore[index, arg-type]
    events = await manager.list_events(flow.id)
    assert (events[-1].kind, events[-1].payload) == ("failed", {"reason": "disk full"})


async def test_fail_from_waiting(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    await manager.set_waiting(flow.id, {"kind": "manual"})
    flow = await manager.fail(flow.id, "timeout")
    assert (flow.status, flow.wait_json) == (FlowStatus.FAILED, None)


@pytest.mark.parametrize("status", ["created", "running", "waiting"])
async def test_cancel_from_any_non_terminal_status(manager: FlowManager, status: str) -> None:
    flow = await manager.create_managed(create_input())
    if status != "created":
        await manager.start_running(flow.id)
    if status == "waiting":
        await manager.set_waiting(flow.id, {"kind": "manual"})
    flow = await manager.cancel(flow.id)
    assert flow.status is FlowStatus.CANCELLED
    assert (await kinds(manager, flow.id))[-1] == "cancelled"


async def test_request_cancel_blocks_finish_then_cancel_works(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.request_cancel(flow.id)
    assert flow.status is FlowStatus.RUNNING
    assert flow.cancel_requested_at is not None
    with pytest.raises(CancelPending) as info:
        await manager.finish(flow.id)
    assert info.value.code == "invalid_transition"
    await assert_unchanged(manager, flow)
    flow = await manager.cancel(flow.id)
    assert flow.status is FlowStatus.CANCELLED


async def test_request_cancel_repeat_writes_nothing(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    first = await manager.request_cancel(flow.id)
    again = await manager.request_cancel(flow.id)
    assert again == first
    assert await kinds(manager, flow.id) == ["created", "started", "cancel_requested"]


async def test_update_state_merges_shallow_and_keeps_status(manager: FlowManager) -> None:
    flow = await running_flow(manager, state_json={"a": {"x": 1, "y": 2}, "b": 1})
    flow = await manager.update_state(flow.id, {"a": {"x": 9}, "c": 3}, next_step="build")
    assert flow.state_json == {"a": {"x": 9}, "b": 1, "c": 3}
    assert (flow.status, flow.current_step) == (FlowStatus.RUNNING, "build")
    flow = await manager.update_state(flow.id, {"d": None})
    assert flow.current_step == "build"
    events = await manager.list_events(flow.id)
    assert events[-2].payload == {"patch": {"a": {"x": 9}, "c": 3}, "next_step": "build"}


async def test_update_state_refused_while_cancel_pending(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.request_cancel(flow.id)
    with pytest.raises(CancelPending):
        await manager.update_state(flow.id, {"x": 1})
    await assert_unchanged(manager, flow)


async def test_double_finish_is_already_terminal(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.finish(flow.id)
    with pytest.raises(AlreadyTerminal) as info:
        await manager.finish(flow.id)
    assert isinstance(info.value, InvalidTransition)
    assert info.value.details()["reason"] == "already_terminal"
    await assert_unchanged(manager, flow)


@pytest.mark.parametrize(
    ("setup", "op"),
    [
        ([], "finish"),  # created -> finished
        ([], "wait"),  # created -> waiting
        ([], "resume"),  # created -> running via resume
        (["start"], "start"),  # running -> running
        (["start"], "resume"),  # running -> running via resume
        (["start", "wait"], "wait"),  # waiting -> waiting
        (["start", "wait"], "finish"),  # waiting -> finished
        ([], "fail"),  # created -> failed
    ],
)
async def test_illegal_transitions_raise_and_write_nothing(
    manager: FlowManager, setup: list[str], op: str
) -> None:
    flow = await manager.create_managed(create_input())
    calls = {
        "start": lambda: manager.start_running(flow.id),
        "wait": lambda: manager.set_waiting(flow.id, {"kind": "manual"}),
        "resume": lambda: manager.resume(flow.id),
        "finish": lambda: manager.finish(flow.id),
        "fail": lambda: manager.fail(flow.id, "x"),
    }
    for name in setup:
        await calls[name]()
    before = await manager.get(flow.id)
    with pytest.raises(InvalidTransition) as info:
        await calls[op]()
    assert info.value.code == "invalid_transition"
    await assert_unchanged(manager, before)


@pytest.mark.parametrize("op", ["start", "wait", "resume", "finish", "fail", "cancel", "update"])
async def test_terminal_flows_accept_no_mutation(manager: FlowManager, op: str) -> None:
    flow = await running_flow(manager)
    flow = await manager.cancel(flow.id)
    calls = {
        "start": lambda: manager.start_running(flow.id),
        "wait": lambda: manager.set_waiting(flow.id, {"kind": "manual"}),
        "resume": lambda: manager.resume(flow.id),
        "finish": lambda: manager.finish(flow.id),
        "fail": lambda: manager.fail(flow.id, "x"),
        "cancel": lambda: manager.cancel(flow.id),
        "update": lambda: manager.update_state(flow.id, {"x": 1}),
    }
    with pytest.raises(AlreadyTerminal):
        await calls[op]()
    await assert_unchanged(manager, flow)


async def test_request_cancel_on_a_terminal_flow_changes_nothing(
    manager: FlowManager, store: FlowStore
) -> None:
    """As in the original: no error, no write; with a command id the outcome is
    ``unchanged``."""
    flow = await manager.finish((await running_flow(manager)).id)
    assert await manager.request_cancel(flow.id) == flow
    assert await manager.request_cancel(flow.id, command_id="rc-late") == flow
    await assert_unchanged(manager, flow)
    assert await store.get_outcome("rc-late") == {
        "status": "unchanged",
        "flow_id": str(flow.id),
        "revision": flow.revision,
    }


@pytest.mark.parametrize("bad", [[1, 2], "text", 3, None, True])
async def test_non_object_patches_are_invalid_input(manager: FlowManager, bad: object) -> None:
    flow = await running_flow(manager)
    for call in (
        lambda: manager.update_state(flow.id, bad),  # type: ignore[arg-type]
        lambda: manager.set_waiting(flow.id, bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput) as info:
            await call()
        assert info.value.code == "invalid_input"
    if bad is not None:  # None means "no patch" for these two
        with pytest.raises(InvalidInput):
            await manager.finish(flow.id, bad)  # type: ignore[arg-type]
        await manager.set_waiting(flow.id, {"kind": "manual"})
        flow = await manager.get(flow.id)
        with pytest.raises(InvalidInput):
            await manager.resume(flow.id, bad)  # type: ignore[arg-type]
    await assert_unchanged(manager, await manager.get(flow.id))


async def test_invalid_create_input_writes_nothing(manager: FlowManager, store: FlowStore) -> None:
    with pytest.raises(InvalidInput) as info:
        await manager.create_managed({"controller_id": "c", "goal": 5})  # type: ignore[dict-item]
    assert "goal" in info.value.errors
    assert "owner_session_key" in info.value.errors
    with pytest.raises(InvalidInput):
        await manager.create_managed({**create_input().model_dump(), "state_json": [1]})
    assert await store.list_flows() == []


async def test_unknown_flow_is_not_found(manager: FlowManager) -> None:
    missing = uuid.uuid4()
    assert await manager.get(missing) is None  # as the original's Option<Flow>
    for call in (
        lambda: manager.require(missing),
        lambda: manager.start_running(missing),
        lambda: manager.cancel(missing),
        lambda: manager.update_state(missing, {}),
        lambda: manager.list_events(missing),
        lambda: manager.list_steps(missing),
    ):
        with pytest.raises(FlowNotFound) as info:
            await call()
        assert info.value.code == "not_found"


async def test_mirrored_flow_is_born_running(manager: FlowManager) -> None:
    flow = await manager.create_mirrored(create_input())
    assert (flow.status, flow.sync_mode, flow.revision) == (
        FlowStatus.RUNNING,
        SyncMode.MIRRORED,
        1,
    )
    assert await kinds(manager, flow.id) == ["created", "started"]
    assert await manager.get(flow.id) == flow


async def test_observation_inserts_then_updates(manager: FlowManager) -> None:
    flow = await manager.create_mirrored(create_input())
    obs = {"flow_id": flow.id, "run_id": "r1", "task": "backup", "status": "running"}
    step = await manager.record_step_observation(
        StepObservation.model_validate({**obs, "child_session_key": "child-1"})
    )
    assert (step.status, step.child_session_key) == (FlowStepStatus.RUNNING, "child-1")
    step2 = await manager.record_step_observation(
        StepObservation.model_validate({**obs, "status": "succeeded", "result_json": {"ok": 1}})
    )
    assert step2.id == step.id
    assert (step2.status, step2.result_json) == (FlowStepStatus.SUCCEEDED, {"ok": 1})
    assert step2.child_session_key == "child-1"  # kept when the new report has none
    assert await manager.list_steps(flow.id) == [step2]
    events = await manager.list_events(flow.id)
    assert [e.kind for e in events][-2:] == ["step_observed", "step_observed"]
    assert events[-1].payload == {
        "run_id": "r1",
        "task": "backup",
        "status": "succeeded",
        "runtime": "mirrored",
    }
    assert (await manager.get(flow.id)).revision == 3


async def test_late_running_observation_never_overwrites_terminal_step(
    manager: FlowManager,
) -> None:
    flow = await manager.create_mirrored(create_input())
    base = {"flow_id": flow.id, "run_id": "r1", "task": "t"}
    done = await manager.record_step_observation({**base, "status": "failed", "result_json": "x"})
    before = await manager.get(flow.id)
    for late in ("running", "pending"):
        step = await manager.record_step_observation({**base, "status": late})
        assert step == done
    await assert_unchanged(manager, before)


async def test_observation_on_unknown_flow_is_not_found(manager: FlowManager) -> None:
    with pytest.raises(FlowNotFound):
        await manager.record_step_observation(
            {"flow_id": uuid.uuid4(), "run_id": "r", "task": "t", "status": "running"}
        )


async def test_observation_on_terminal_flow_is_still_recorded(manager: FlowManager) -> None:
    flow = await manager.create_mirrored(create_input())
    await manager.finish(flow.id)
    step = await manager.record_step_observation(
        {"flow_id": flow.id, "run_id": "late", "task": "t", "status": "succeeded"}
    )
    assert [s.run_id for s in await manager.list_steps(flow.id)] == ["late"]
    assert (await manager.get(flow.id)).status is FlowStatus.FINISHED
    assert step.status is FlowStepStatus.SUCCEEDED


async def test_invalid_observation_is_invalid_input(manager: FlowManager) -> None:
    flow = await manager.create_mirrored(create_input())
    with pytest.raises(InvalidInput) as info:
        await manager.record_step_observation(
            {"flow_id": flow.id, "run_id": "", "task": "t", "status": "exploded"}
        )
    assert set(info.value.errors) == {"run_id", "status"}
    assert await manager.list_steps(flow.id) == []


async def test_steps_are_listed_per_flow_oldest_first(manager: FlowManager) -> None:
    a = await manager.create_mirrored(create_input())
    b = await manager.create_mirrored(create_input())
    for run in ("r3", "r1", "r2"):
        await manager.record_step_observation(
            {"flow_id": a.id, "run_id": run, "task": "t", "status": "running"}
        )
    await manager.record_step_observation(
        {"flow_id": b.id, "run_id": "other", "task": "t", "status": "running"}
    )
    assert [s.run_id for s in await manager.list_steps(a.id)] == ["r3", "r1", "r2"]
    assert [s.run_id for s in await manager.list_steps(b.id)] == ["other"]


# -- revisions and concurrency ----------------------------------------------------------------


async def test_every_mutation_bumps_revision_by_one_with_one_event(manager: FlowManager) -> None:
    flow = await manager.create_managed(create_input())
    steps = [
        lambda: manager.start_running(flow.id),
        lambda: manager.update_state(flow.id, {"a": 1}),
        lambda: manager.set_waiting(flow.id, {"kind": "manual"}),
        lambda: manager.resume(flow.id),
        lambda: manager.request_cancel(flow.id),
        lambda: manager.cancel(flow.id),
    ]
    for expected, call in enumerate(steps, start=1):
        flow = await call()
        assert flow.revision == expected
        events = await manager.list_events(flow.id)
        assert [e.revision for e in events] == list(range(expected + 1))


async def test_expected_revision_is_compare_and_set(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    with pytest.raises(RevisionMismatch) as info:
        await manager.update_state(flow.id, {"x": 1}, expected_revision=0)
    assert (info.value.expected, info.value.actual, info.value.code) == (0, 1, "revision_mismatch")
    await assert_unchanged(manager, flow)
    flow = await manager.update_state(flow.id, {"x": 1}, expected_revision=1)
    assert flow.revision == 2


async def test_conflict_is_retried_once_after_refetch(store: FlowStore) -> None:
    manager = FlowManager(store)
    flow = await running_flow(manager)

    class RacingStore(YieldingStore):
        raced = False

        async def get(self, flow_id: uuid.UUID):  # type: ignore[no-untyped-def]
            seen = await self._inner.get(flow_id)
            if not self.raced:  # another writer lands between our read and our write
                self.raced = True
                await manager.update_state(flow_id, {"other": True})
            return seen

    racing = FlowManager(RacingStore(store))  # type: ignore[arg-type]
    flow = await racing.update_state(flow.id, {"mine": True})
    assert flow.revision == 3
    assert flow.state_json == {"n": 0, "other": True, "mine": True}
    assert [e.revision for e in await manager.list_events(flow.id)] == [0, 1, 2, 3]


async def test_conflict_with_expected_revision_is_not_retried(store: FlowStore) -> None:
    manager = FlowManager(store)
    flow = await running_flow(manager)

    class RacingStore(YieldingStore):
        async def get(self, flow_id: uuid.UUID):  # type: ignore[no-untyped-def]
            seen = await self._inner.get(flow_id)
            await manager.update_state(flow_id, {"other": seen.revision})
            return seen

    with pytest.raises(RevisionMismatch) as info:
        await FlowManager(RacingStore(store)).update_state(  # type: ignore[arg-type]
            flow.id, {"mine": True}, expected_revision=1
        )
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert "mine" not in (await manager.get(flow.id)).state_json


async def test_retry_revalidates_the_transition(store: FlowStore) -> None:
    manager = FlowManager(store)
    flow = await running_flow(manager)

    class RacingStore(YieldingStore):
        raced = False

        async def get(self, flow_id: uuid.UUID):  # type: ignore[no-untyped-def]
            seen = await self._inner.get(flow_id)
            if not self.raced:
                self.raced = True
                await manager.cancel(flow_id)
            return seen

    with pytest.raises(AlreadyTerminal):
        await FlowManager(RacingStore(store)).finish(flow.id)  # type: ignore[arg-type]
    assert (await manager.get(flow.id)).status is FlowStatus.CANCELLED


async def test_two_concurrent_compatible_writers_both_succeed(store: FlowStore) -> None:
    manager = FlowManager(YieldingStore(store), cache_size=0)  # type: ignore[arg-type]
    flow = await running_flow(manager)
    a, b = await asyncio.gather(
        manager.update_state(flow.id, {"a": 1}), manager.update_state(flow.id, {"b": 2})
    )
    final = await manager.get(flow.id)
    assert final.revision == 3
    assert final.state_json == {"n": 0, "a": 1, "b": 2}
    assert sorted([a.revision, b.revision]) == [2, 3]


async def test_heavy_contention_surfaces_mismatch_and_loses_nothing(store: FlowStore) -> None:
    manager = FlowManager(YieldingStore(store), cache_size=0)  # type: ignore[arg-type]
    flow = await running_flow(manager)
    writers = 20
    results = await asyncio.gather(
        *(manager.update_state(flow.id, {f"w{i}": i}) for i in range(writers)),
        return_exceptions=True,
    )
    won = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert lost, "20 writers on one flow must surface at least one mismatch"
    assert all(isinstance(r, RevisionMismatch) for r in lost)
    final = await manager.get(flow.id)
    assert final.revision == 1 + len(won)
    assert {k for k in final.state_json if k.startswith("w")} == {f"w{i}" for i in won}
    assert [e.revision for e in await manager.list_events(flow.id)] == list(range(2 + len(won)))


# -- lists and retention ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


async def test_list_by_owner_and_status_paginate_in_creation_order(store: FlowStore) -> None:
    manager = FlowManager(store, clock=Clock())
    mine = [await manager.create_managed(create_input(owner_session_key="me")) for _ in range(5)]
    await manager.create_managed(create_input(owner_session_key="someone-else"))
    await manager.start_running(mine[1].id)

    page1 = await manager.list_by_owner("me", limit=2)
    page2 = await manager.list_by_owner("me", limit=2, after=page1[-1].id)
    page3 = await manager.list_by_owner("me", limit=2, after=page2[-1].id)
    assert [f.id for f in page1 + page2 + page3] == [f.id for f in mine]
    assert await manager.list_by_owner("me", after=page3[-1].id) == []

    created = await manager.list_by_status(FlowStatus.CREATED, limit=10)
    assert [f.id for f in created] == [mine[0].id, *[f.id for f in mine[2:]], created[-1].id]
    running = await manager.list_by_status(FlowStatus.RUNNING)
    assert [f.id for f in running] == [mine[1].id]


async def test_list_rejects_bad_limits_and_status(manager: FlowManager) -> None:
    for limit in (0, -1, 1001):
        with pytest.raises(InvalidInput):
            await manager.list_by_owner("me", limit=limit)
    with pytest.raises(InvalidInput):
        await manager.list_by_status("nope")  # type: ignore[arg-type]


async def test_prune_drops_only_old_terminal_flows(store: FlowStore) -> None:
    clock = Clock()
    manager = FlowManager(store, clock=clock)
    old_done = await manager.finish((await running_flow(manager)).id)
    old_running = await running_flow(manager)
    await manager.record_step_observation(
        {"flow_id": old_done.id, "run_id": "r", "task": "t", "status": "succeeded"}
    )
    cutoff = clock.now + timedelta(milliseconds=1)
    clock.now += timedelta(days=1)
    new_done = await manager.finish((await running_flow(manager)).id)
    assert await store.prune(cutoff) == 1
    assert await manager.get(old_done.id) is None
    assert await store.list_steps(old_done.id) == []
    assert await store.list_events(old_done.id) == []
    assert (await manager.get(old_running.id)).status is FlowStatus.RUNNING
    assert (await manager.get(new_done.id)).status is FlowStatus.FINISHED


async def test_list_events_pages_by_revision(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    for i in range(5):
        await manager.update_state(flow.id, {"i": i})
    page = await manager.list_events(flow.id, after_revision=2, limit=2)
    assert [e.revision for e in page] == [3, 4]


async def test_start_does_not_resume_a_waiting_flow(manager: FlowManager) -> None:
    flow = await running_flow(manager)
    flow = await manager.set_waiting(flow.id, {"kind": "manual"})
    with pytest.raises(InvalidTransition):
        await manager.start_running(flow.id)
    await assert_unchanged(manager, flow)


# -- the flow cache: two managers on one store are two replicas, each with its own copies --


async def test_a_stale_cached_copy_costs_a_reread_not_a_lost_write(store: FlowStore) -> None:
    mine, other = FlowManager(store), FlowManager(store)
    flow = await running_flow(mine)  # cached by `mine` at revision 1
    await other.update_state(flow.id, {"other": True})
    flow = await mine.update_state(flow.id, {"mine": True})
    assert (flow.revision, flow.state_json) == (3, {"n": 0, "other": True, "mine": True})
    assert [e.revision for e in await mine.list_events(flow.id)] == [0, 1, 2, 3]


async def test_a_refusal_decided_on_a_cached_copy_is_decided_again(store: FlowStore) -> None:
    mine, other = FlowManager(store), FlowManager(store)
    created = await mine.create_managed(create_input())  # cached: status created
    await other.start_running(created.id)
    flow = await mine.finish(created.id)  # the copy says "not running"; the row says it is
    assert (flow.status, flow.revision) == (FlowStatus.FINISHED, 2)


async def test_expected_revision_is_checked_against_the_row_not_the_copy(
    store: FlowStore,
) -> None:
    mine, other = FlowManager(store), FlowManager(store)
    flow = await running_flow(mine)  # cached at revision 1
    await other.update_state(flow.id, {"other": True})
    with pytest.raises(RevisionMismatch) as info:
        await mine.update_state(flow.id, {"mine": 1}, expected_revision=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    flow = await mine.update_state(flow.id, {"mine": 2}, expected_revision=2)
    assert flow.revision == 3
    assert flow.state_json == {"n": 0, "other": True, "mine": 2}


async def test_a_pruned_flow_in_the_cache_is_not_found(store: FlowStore) -> None:
    mine, other = FlowManager(store), FlowManager(store)
    flow = await running_flow(mine)  # cached by `mine` as running
    await other.fail(flow.id, "x")
    await store.prune(datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(FlowNotFound):
        await mine.update_state(flow.id, {"late": True})


async def test_on_commit_sees_every_write(store: FlowStore) -> None:
    seen: list[object] = []
    manager = FlowManager(store, on_commit=seen.append)
    flow = await running_flow(manager)
    await manager.request_cancel(flow.id, command_id="c1")
    await manager.request_cancel(flow.id, command_id="c2")  # a no-op: its outcome is recorded
    with pytest.raises(InvalidTransition):
        await manager.start_running(flow.id)
    assert [getattr(c, "flow", None) and c.flow.revision for c in seen] == [0, 1, 2, None]
