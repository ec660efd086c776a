"""The wait/resume engine through the real daemon: timers, subjects, signals, races."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.acceptance.test_daemon import CREATE, assert_gapless, by_flow
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def running(w: Wire, n: int = 1) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for fid in ids:
        await w.publish(w.s.create(), {**CREATE, "id": fid})
        await w.publish(w.s.command(fid, "start"))
    return ids


async def kinds_of(w: Wire, fid: str) -> list[str]:
    return [e["kind"] for e in by_flow(await w.events()).get(fid, [])]


async def until_kinds(
    w: Wire, fid: str, expected: list[str], seconds: float = 20
) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        evs = by_flow(await w.events()).get(fid, [])
        return evs if [e["kind"] for e in evs] == expected else None

    return await w.wait_for(check, seconds=seconds)  # type: ignore[no-any-return]


async def test_timer_resumes_when_due(daemon: DaemonProcess, nats_wire: Wire) -> None:
    w = nats_wire
    [fid] = await running(w)
    await w.publish(w.s.command(fid, "wait"), {"wait_json": {"kind": "timer", "at": at(1)}})
    evs = await until_kinds(w, fid, ["created", "started", "waiting", "resumed"])
    wake = evs[-1]["payload"]["cause"]
    assert wake["cause"] == "timer"
    assert datetime.fromisoformat(wake["at"]) >= datetime.fromisoformat(wake["due_at"])
    assert evs[-1]["flow"]["state_json"]["wake"] == wake
    assert evs[-1]["flow"]["wait_json"] is None


async def test_subject_message_resumes_the_matching_flow(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w = nats_wire
    a, b = await running(w, 2)
    subject = f"orders{uuid.uuid4().hex[:6]}.paid"
    for fid, cid in ((a, "o-1"), (b, "o-2")):
        wait = {"kind": "subject", "subject": subject, "correlation_id": cid}
        await w.publish(w.s.command(fid, "wait"), {"wait_json": wait})
    await until_kinds(w, b, ["created", "started", "waiting"])

    async def deliver() -> bool:  # core NATS: retry until the engine has subscribed
        await w.nc.publish(
            subject, json.dumps({"amount": 5}).encode(), headers={"Flowd-Correlation-Id": "o-1"}
        )
        await w.nc.publish(subject, json.dumps({"correlation_id": "nobody"}).encode())
        await asyncio.sleep(0.3)
        return await kinds_of(w, a) == ["created", "started", "waiting", "resumed"]

    await w.wait_for(deliver, seconds=20)
    evs = by_flow(await w.events())
    wake = evs[a][-1]["payload"]["cause"]
    assert (wake["cause"], wake["subject"], wake["correlation_id"], wake["payload"]) == (
        "subject", subject, "o-1", {"amount": 5},
    )  # fmt: skip
    assert [e["kind"] for e in evs[b]] == ["created", "started", "waiting"]


async def test_signal_before_wait_and_signal_while_waiting(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w = nats_wire
    early, late = await running(w, 2)
    await w.publish(w.s.command(early, "signal"), {"name": "approve", "payload": {"by": "ops"}})
    await w.publish(
        w.s.command(early, "wait"), {"wait_json": {"kind": "signal", "name": "approve"}}
    )
    evs = await until_kinds(
        w, early, ["created", "started", "signal_received", "waiting", "resumed"]
    )
    assert evs[-1]["flow"]["state_json"]["wake"]["payload"] == {"by": "ops"}

    await w.publish(w.s.command(late, "wait"), {"wait_json": {"kind": "signal", "name": "go"}})
    await until_kinds(w, late, ["created", "started", "waiting"])
    reply = await w.request(f"cmd.{late}.signal", {"name": "go"})
    assert reply["result"]["flow"]["status"] == "running"
    await until_kinds(w, late, ["created", "started", "waiting", "resumed"])


@pytest.mark.parametrize("on_timeout", ["resume", "fail"])
async def test_any_wait_times_out(daemon: DaemonProcess, nats_wire: Wire, on_timeout: str) -> None:
    w = nats_wire
    [fid] = await running(w)
    wait = {
        "kind": "any",
        "of": [{"kind": "signal", "name": "never"}],
        "timeout_at": at(1),
        "on_timeout": on_timeout,
    }
    await w.publish(w.s.command(fid, "wait"), {"wait_json": wait})
    last = "resumed" if on_timeout == "resume" else "failed"
    evs = await until_kinds(w, fid, ["created", "started", "waiting", last])
    if on_timeout == "resume":
        assert evs[-1]["payload"]["cause"]["cause"] == "timeout"
    else:
        assert evs[-1]["payload"] == {"reason": "wait timed out"}


async def test_cancel_requested_while_waiting_is_cancelled_by_the_engine(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w = nats_wire
    [fid] = await running(w)
    await w.publish(w.s.command(fid, "wait"), {"wait_json": {"kind": "manual"}})
    await w.publish(w.s.command(fid, "request_cancel"))
    await until_kinds(w, fid, ["created", "started", "waiting", "cancel_requested", "cancelled"])


async def test_timer_due_while_daemon_down_fires_at_start(
    make_daemon: Any, nats_wire: Wire
) -> None:
    w = nats_wire
    first = make_daemon()
    [fid] = await running(w)
    await w.publish(w.s.command(fid, "wait"), {"wait_json": {"kind": "timer", "at": at(1.5)}})
    await until_kinds(w, fid, ["created", "started", "waiting"])
    assert first.stop() == 0
    await asyncio.sleep(2.5)
    assert await kinds_of(w, fid) == ["created", "started", "waiting"]
    make_daemon()
    await until_kinds(w, fid, ["created", "started", "waiting", "resumed"])


async def test_durable_subject_message_survives_daemon_downtime(
    make_daemon: Any, nats_wire: Wire
) -> None:
    w = nats_wire
    first = make_daemon()
    [fid] = await running(w)
    subject = f"{w.s.prefix}.wake.payments"
    await w.publish(
        w.s.command(fid, "wait"),
        {"wait_json": {"kind": "subject", "subject": subject, "correlation_id": "p-9"}},
    )
    await until_kinds(w, fid, ["created", "started", "waiting"])
    assert first.stop() == 0
    await w.js.publish(subject, json.dumps({"correlation_id": "p-9", "ok": True}).encode())
    make_daemon()
    evs = await until_kinds(w, fid, ["created", "started", "waiting", "resumed"])
    assert evs[-1]["payload"]["cause"]["payload"] == {"correlation_id": "p-9", "ok": True}


async def test_two_replicas_fire_each_due_timer_once(make_daemon: Any, nats_wire: Wire) -> None:
    w = nats_wire
    # Small claims (4 per tick) so both replicas take part in firing the same due set.
    first = make_daemon(FLOWD_WAIT_BATCH=4, FLOWD_WAIT_TICK=0.01)
    ids = await running(w, 60)
    due = at(5)
    for fid in ids:
        await w.publish(w.s.command(fid, "wait"), {"wait_json": {"kind": "timer", "at": due}})

    async def count(kind: str, n: int) -> list[dict[str, Any]] | None:
        evs = await w.events()
        return evs if sum(1 for e in evs if e["kind"] == kind) >= n else None

    await w.wait_for(lambda: count("waiting", len(ids)), seconds=30)
    second = make_daemon(FLOWD_WAIT_BATCH=4, FLOWD_WAIT_TICK=0.01)  # joins before they are due
    await w.wait_for(lambda: count("resumed", len(ids)), seconds=30)
    await asyncio.sleep(1)  # give a double fire the chance to show up
    evs = await w.events()
    assert Counter(e["flow_id"] for e in evs if e["kind"] == "resumed") == Counter(ids)
    assert_gapless(evs)
    fired = [
        sum(1 for e in d.log_events() if e.get("event") == "flow_woken") for d in (first, second)
    ]
    assert sum(fired) == len(ids)
    assert min(fired) > 0, f"one replica fired everything: {fired}"
