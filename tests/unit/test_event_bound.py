"""``largest_event_bytes`` bounds every event message flowd can make: states at the limit,
bodies at FLOWD_MAX_PAYLOAD, and every bounded field at its worst (JSON-escaped) size."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from flowd.bus import subjects as names
from flowd.bus.nats import wire_size
from flowd.core import apply, jsontext, waits
from flowd.core.apply import Change
from flowd.core.models import CreateManagedInput, Flow
from flowd.core.outbox import change_messages, largest_event_bytes
from flowd.core.status import SyncMode

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
ESCAPED = "\x01"  # JSON-escaped to 6 bytes
COMMAND_ID = "\u4e00" * 200  # 600 bytes in UTF-8, in a header and in the body


def ids() -> apply.NewId:
    n = iter(range(1, 10_000))
    return lambda: uuid.UUID(int=next(n))


def sized(limit: int, prefix: str = "k") -> dict[str, object]:
    """A one-key object whose compact JSON is ``limit`` bytes."""
    return {prefix: "x" * (limit - len(jsontext.dumps({prefix: ""})))}


def worst_flow(state_limit: int) -> Flow:
    data = CreateManagedInput(
        controller_id=ESCAPED * 200,
        goal=ESCAPED * 10_000,
        owner_session_key=ESCAPED * 200,
        requester_origin=ESCAPED * 200,
        current_step=ESCAPED * 200,
    )
    flow = apply.create(data, mode=SyncMode.MANAGED, now=NOW, new_id=ids()).flow
    return flow.evolve(status=apply.FlowStatus.RUNNING)


def sizes(change: Change) -> list[int]:
    out = []
    for m in change_messages(change, COMMAND_ID):
        headers = {names.MSG_ID: m.msg_id, names.COMMAND_ID: COMMAND_ID}
        out.append(wire_size(headers, len(m.text().encode())))
    return out


def big_wait(limit: int) -> dict[str, object]:
    """An ``any`` wait of signal names whose JSON is close to (not over) ``limit`` bytes."""
    of: list[dict[str, object]] = []
    while len(of) < 32:
        entry = {"kind": "signal", "name": f"{len(of)}-" + "n" * 190}
        if len(jsontext.dumps({"kind": "any", "of": [*of, entry]})) > limit:
            break
        of.append(entry)
    return {"kind": "any", "of": of}


@pytest.mark.parametrize(("state", "payload"), [(8192, 8192), (2048, 65_536), (65_536, 2048)])
def test_no_event_exceeds_the_bound(state: int, payload: int) -> None:
    bound = largest_event_bytes(state, payload)
    flow = worst_flow(state)
    room = min(state, payload) - 64  # a patch fits its body and, merged, the state limit
    seen: list[int] = []

    full = flow.evolve(state_json=sized(state - 200, "s"))
    change = apply.update_state(
        full, sized(min(room, 100), "p"), ESCAPED * 200, now=NOW, new_id=ids()
    )
    seen += sizes(change)
    change = apply.update_state(flow, sized(room), now=NOW, new_id=ids())
    seen += sizes(apply.check_state(change, flow, state))
    change = apply.finish(flow, sized(room), now=NOW, new_id=ids())
    seen += sizes(apply.check_state(change, flow, state))
    change = apply.fail(flow, "r" * (room - 64), now=NOW, new_id=ids())
    seen += sizes(apply.check_state(change, flow, state))

    wait = big_wait(payload - 64)
    seen += sizes(apply.set_waiting(full, wait, now=NOW, new_id=ids()))
    # The wait engine merges a wake into the state (and the event carries it twice more):
    # the largest the state can still take.
    waiting = apply.set_waiting(flow, wait, now=NOW, new_id=ids()).flow
    wake_room = state - 400
    wake = waits.wake("subject", NOW, subject="a.b", correlation_id="c", payload="z" * wake_room)
    resumed = apply.resume(waiting, {"wake": wake}, now=NOW, new_id=ids(), cause=wake)
    seen += sizes(apply.check_state(resumed, waiting, state))
    # A kept signal resumes it at once (two events): its payload is a body (<= payload).
    signal_room = min(wake_room, payload - 64)
    name = str(wait["of"][0]["name"])  # type: ignore[index]
    signal = waits.Signal(1, flow.id, name, "y" * signal_room, NOW)
    both = apply.set_waiting(flow, wait, now=NOW, new_id=ids(), pending=(signal,))
    seen += sizes(apply.check_state(both, flow, state))
    assert max(seen) <= bound, (max(seen), bound)
