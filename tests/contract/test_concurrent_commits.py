"""Many flows changed at once, on both stores: each change gets its own result.

On PostgreSQL concurrent one-statement commits share transactions (group commit); a lost
compare-and-set or a known command id must still be reported to its own caller only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowd import FlowManager, FlowStore, RevisionMismatch
from flowd.core.errors import DuplicateCommand
from flowd.core.models import StepObservation
from flowd.core.status import FlowStepStatus
from tests.support.factories import create_input


async def test_concurrent_changes_each_get_their_own_result(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store, cache_size=0)
    flows = await asyncio.gather(
        *(manager.create_managed(create_input(goal=f"g{n}"), command_id=f"c{n}") for n in range(30))
    )
    # All at once: one start with a stale expected revision, one reusing another's command id
    # (concurrent, so either of those two may be the one applied; exactly one is).
    results = await asyncio.gather(
        *(
            manager.start_running(
                f.id,
                command_id="s0" if n == 7 else f"s{n}",
                expected_revision=5 if n == 3 else None,
            )
            for n, f in enumerate(flows)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[3], RevisionMismatch)
    dup = [n for n in (0, 7) if isinstance(results[n], DuplicateCommand)]
    assert len(dup) == 1
    winner = 7 - dup[0]
    failed = {3, dup[0]}
    for n, (flow, result) in enumerate(zip(flows, results, strict=True)):
        stored = await manager.get(flow.id)
        if n in failed:
            assert stored.revision == 0
            assert stored.status == "created"
            assert [e.kind for e in await manager.list_events(flow.id)] == ["created"]
        else:
            assert not isinstance(result, BaseException)
            assert result.revision == stored.revision == 1
            assert stored.status == "running"
            assert [e.kind for e in await manager.list_events(flow.id)] == ["created", "started"]
    assert (await outbox_store.get_outcome("s7")) is None
    outcome = await outbox_store.get_outcome("s0")
    assert outcome is not None
    assert outcome["flow_id"] == str(flows[winner].id)


async def test_concurrent_creates_of_one_id_make_one_flow(outbox_store: FlowStore) -> None:
    manager = FlowManager(outbox_store)
    first = await manager.create_managed(create_input())
    again = [create_input(id=first.id) for _ in range(3)]
    fresh = [create_input(goal=f"g{n}") for n in range(5)]
    results = await asyncio.gather(
        *(manager.create_managed(data) for data in [*again, *fresh]), return_exceptions=True
    )
    assert all(type(r).__name__ == "FlowExists" for r in results[:3])
    assert not any(isinstance(r, BaseException) for r in results[3:])
    assert len(await outbox_store.list_flows()) == 6


@pytest.mark.parametrize("count", [1, 2, 65])
async def test_any_number_of_concurrent_changes_lands(outbox_store: FlowStore, count: int) -> None:
    manager = FlowManager(outbox_store)
    flows = await asyncio.gather(*(manager.create_managed(create_input()) for _ in range(count)))
    await asyncio.gather(*(manager.start_running(f.id) for f in flows))
    await asyncio.gather(*(manager.update_state(f.id, {"n": 1}) for f in flows))
    stored = await outbox_store.list_flows(limit=1000)
    assert len(stored) == count
    assert all(f.revision == 2 and f.state_json == {"n": 1} for f in stored)


async def test_concurrent_observations_each_land_on_their_own_flow(
    outbox_store: FlowStore,
) -> None:
    manager = FlowManager(outbox_store, cache_size=0)
    flows = await asyncio.gather(
        *(manager.create_mirrored(create_input(goal=f"m{n}")) for n in range(20))
    )

    def observe(n: int, command_id: str) -> Any:
        report = StepObservation(
            flow_id=flows[n].id, run_id=f"r{n}", task="build", status=FlowStepStatus.RUNNING
        )
        return manager.record_step_observation(report, command_id=command_id)

    results = await asyncio.gather(
        *(observe(n, "o0" if n == 5 else f"o{n}") for n in range(20)), return_exceptions=True
    )
    dup = [n for n in (0, 5) if isinstance(results[n], DuplicateCommand)]
    assert len(dup) == 1  # concurrent: either may be the one applied
    for n, flow in enumerate(flows):
        steps = await manager.list_steps(flow.id)
        kinds = [e.kind for e in await manager.list_events(flow.id)]
        if n == dup[0]:
            assert steps == []
            assert kinds == ["created", "started"]
            continue
        assert [(s.run_id, s.status) for s in steps] == [(f"r{n}", "running")]
        assert steps[0] == results[n]
        assert kinds == ["created", "started", "step_observed"]
    # and a later report on each (an update of the row, not a second step)
    done = await asyncio.gather(
        *(
            manager.record_step_observation(
                StepObservation(
                    flow_id=f.id, run_id=f"r{n}", task="build", status=FlowStepStatus.SUCCEEDED
                )
            )
            for n, f in enumerate(flows)
            if n != dup[0]
        )
    )
    assert all(s.status == "succeeded" for s in done)
    for n, f in enumerate(flows):
        assert len(await manager.list_steps(f.id)) == (0 if n == dup[0] else 1)
