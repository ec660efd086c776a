"""FLOWD_MAX_STATE_BYTES, on both stores: every write that would grow ``state_json`` past
the limit is refused with ``invalid_input`` / ``state_too_large`` and writes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flowd import FlowManager, FlowStore, InvalidInput, SyncMode
from flowd.core.apply import MAX_STATE_BYTES, state_size
from flowd.core.errors import StateTooLarge
from flowd.core.models import Flow
from tests.support.factories import create_input

LIMIT = 2048


@pytest.fixture
def limited(store: FlowStore) -> FlowManager:
    return FlowManager(store, max_state_bytes=LIMIT, cache_size=0)


def big(n: int = LIMIT) -> str:
    return "x" * n


async def waiting(m: FlowManager, **wait: Any) -> Flow:
    flow = await m.create_managed(create_input())
    await m.start_running(flow.id)
    return await m.set_waiting(flow.id, wait or {"kind": "manual"})


def assert_too_large(exc: StateTooLarge) -> None:
    assert isinstance(exc, InvalidInput)
    assert exc.code == "invalid_input"
    details = exc.details()
    assert details["reason"] == "state_too_large"
    assert details["limit"] == LIMIT
    assert details["size"] > LIMIT
    assert set(details["errors"]) == {"state_json"}


async def assert_nothing_written(m: FlowManager, before: Flow) -> None:
    assert await m.get(before.id) == before
    events = await m.list_events(before.id)
    assert [e.revision for e in events] == list(range(before.revision + 1))


@pytest.mark.parametrize("mode", [SyncMode.MANAGED, SyncMode.MIRRORED])
async def test_create_with_a_state_over_the_limit_is_refused(
    limited: FlowManager, mode: SyncMode
) -> None:
    create = limited.create_managed if mode is SyncMode.MANAGED else limited.create_mirrored
    with pytest.raises(StateTooLarge) as info:
        await create(create_input(state_json={"a": big()}))
    assert_too_large(info.value)
    assert await limited.store.list_flows() == []


Verb = Callable[[FlowManager, Flow], Awaitable[Any]]
VERBS: dict[str, tuple[str, Verb]] = {
    "update": ("running", lambda m, f: m.update_state(f.id, {"a": big()})),
    "finish": ("running", lambda m, f: m.finish(f.id, {"a": big()})),
    "fail": ("running", lambda m, f: m.fail(f.id, big())),
    "resume_patch": ("waiting", lambda m, f: m.resume(f.id, {"a": big()})),
    "engine_wake": (
        "waiting",
        lambda m, f: m.resume(f.id, {"wake": {"payload": big()}}, cause={"payload": big()}),
    ),
    "signal_wake": (
        "signal_waiting",
        lambda m, f: m.signal(f.id, "go", {"payload": big()}),
    ),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
async def test_every_write_that_grows_the_state_past_the_limit_is_refused(
    limited: FlowManager, verb: str
) -> None:
    status, call = VERBS[verb]
    if status == "running":
        flow = await limited.create_managed(create_input())
        flow = await limited.start_running(flow.id)
    elif status == "waiting":
        flow = await waiting(limited)
    else:
        flow = await waiting(limited, kind="signal", name="go")
    with pytest.raises(StateTooLarge) as info:
        await call(limited, flow)
    assert_too_large(info.value)
    await assert_nothing_written(limited, flow)


async def test_a_kept_signal_that_would_overflow_the_state_refuses_the_wait(
    limited: FlowManager,
) -> None:
    flow = await limited.create_managed(create_input())
    flow = await limited.start_running(flow.id)
    flow = await limited.signal(flow.id, "go", {"payload": big()})  # kept: no state change
    with pytest.raises(StateTooLarge):
        await limited.set_waiting(flow.id, {"kind": "signal", "name": "go"})
    await assert_nothing_written(limited, flow)


async def test_the_limit_is_the_serialized_size_and_is_inclusive(store: FlowStore) -> None:
    state = {"a": "é" * 10}
    size = state_size(state)
    assert size == len('{"a":""}') + 20  # UTF-8, compact
    exact = FlowManager(store, max_state_bytes=size)
    flow = await exact.create_managed(create_input(state_json=state))
    assert flow.state_json == state
    with pytest.raises(StateTooLarge):
        await FlowManager(store, max_state_bytes=size - 1).create_managed(
            create_input(state_json=state)
        )


async def test_a_flow_already_over_the_limit_can_still_move_without_growing(
    store: FlowStore,
) -> None:
    unlimited = FlowManager(store, max_state_bytes=None)
    flow = await unlimited.create_managed(create_input(state_json={"a": big(3 * LIMIT)}))
    m = FlowManager(store, max_state_bytes=LIMIT)
    await m.start_running(flow.id)
    await m.set_waiting(flow.id, {"kind": "manual"})
    await m.resume(flow.id)
    await m.update_state(flow.id, {"a": big(3 * LIMIT)}, next_step="same state")
    with pytest.raises(StateTooLarge):
        await m.update_state(flow.id, {"b": 1})
    done = await m.cancel(flow.id)
    assert done.status.value == "cancelled"


def test_the_default_limit_is_256_kib() -> None:
    assert MAX_STATE_BYTES == 256 * 1024
