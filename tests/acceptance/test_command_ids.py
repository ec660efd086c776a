"""Command ids that mean one thing (subjects.md, Commands): flowd's own ids live in a reserved
namespace, and an id used again for a different request is an ``idempotency_conflict``."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from flowd.client import FlowClient, FlowdError, Outcome
from tests.acceptance.test_client import flowctl
from tests.acceptance.test_daemon import CREATE, by_flow
from tests.acceptance.test_waits import at, until_kinds
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]


async def _next_seq(w: Wire) -> int:
    return int((await w.js.stream_info(w.s.cmd_stream)).state.last_seq) + 1


async def _events_of(w: Wire, fid: str, n: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        evs = by_flow(await w.events()).get(fid, [])
        return evs if len(evs) >= n else None

    return await w.wait_for(enough)  # type: ignore[no-any-return]


async def _outcomes(w: Wire, n: int) -> list[Any]:
    async def enough() -> list[Any] | None:
        msgs = await w.stream_msgs(w.s.evt_stream, w.s.out_all)
        return msgs if len(msgs) >= n else None

    return await w.wait_for(enough)  # type: ignore[no-any-return]


async def test_a_publisher_id_never_takes_a_fallback_id(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.command(fid, "create"), CREATE, cid="c-create")
    await w.publish(s.command(fid, "start"), cid="c-start")
    seq = await _next_seq(w)
    # A names the sequence B is about to land at, in the old fallback spelling and the new
    # one (reserved: rejected); B and D come without an id.
    old_style = f"{s.cmd_stream}:{seq + 1}"
    await w.publish(s.command(fid, "update"), {"patch": {"a": 1}}, cid=old_style)  # seq
    await w.js.publish(s.command(fid, "update"), json.dumps({"patch": {"b": 1}}).encode())
    await w.publish(
        s.command(fid, "update"), {"patch": {"c": 1}}, cid=f"flowd:seq:{s.cmd_stream}:{seq + 3}"
    )  # seq + 2
    await w.js.publish(s.command(fid, "update"), json.dumps({"patch": {"d": 1}}).encode())
    events = await _events_of(w, fid, 5)
    assert [(e["kind"], e["command_id"]) for e in events] == [
        ("created", "c-create"),
        ("started", "c-start"),
        ("state_updated", old_style),
        ("state_updated", f"flowd:seq:{s.cmd_stream}:{seq + 1}"),
        ("state_updated", f"flowd:seq:{s.cmd_stream}:{seq + 3}"),
    ]
    assert events[-1]["flow"]["state_json"] == {"a": 1, "b": 1, "d": 1}
    [out] = await _outcomes(w, 1)
    body = json.loads(out.data)
    assert (body["command_id"], body["status"], body["code"]) == (
        f"flowd:seq:{s.cmd_stream}:{seq + 2}",  # recorded under its fallback id
        "rejected",
        "invalid_input",
    )
    assert body["details"] == {"errors": {"Nats-Msg-Id": "must not start with 'flowd:'"}}
    assert out.headers["Flowd-Command-Id"] == body["command_id"]

    # the API refuses a reserved id too
    reply = await w.request(
        f"cmd.{fid}.update", {"patch": {"e": 1}}, headers={"Nats-Msg-Id": "flowd:wake:x"}
    )
    assert reply["error"]["code"] == "invalid_input"
    assert (await w.request("get", {"flow_id": fid}))["result"]["revision"] == 4


async def test_the_same_id_for_a_different_request_is_a_conflict(
    make_daemon: Any, nats_wire: Wire
) -> None:
    # A 1 s duplicate window, so a re-publish after it reaches flowd (its record decides).
    make_daemon(FLOWD_DUPLICATE_WINDOW=1)
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.command(fid, "create"), CREATE, cid="k0")
    await w.publish(s.command(fid, "start"), cid="k1")
    await _events_of(w, fid, 2)
    await asyncio.sleep(1.2)  # past the duplicate window
    seq = await _next_seq(w)
    await w.publish(s.command(fid, "update"), {"patch": {"x": 1}}, cid="k1")  # seq: conflict
    await w.publish(s.command(fid, "start"), cid="k1")  # the same request: a repeat, silent
    await w.publish(s.observation(fid), {"run_id": "r", "task": "t", "status": "running"}, cid="k1")
    await w.publish(s.command(fid, "update"), {"patch": {"y": 1}}, cid="k2")
    events = await _events_of(w, fid, 3)
    assert [(e["kind"], e["command_id"]) for e in events] == [
        ("created", "k0"),
        ("started", "k1"),
        ("state_updated", "k2"),
    ]
    assert events[-1]["flow"]["state_json"] == {"y": 1}
    outs = await _outcomes(w, 2)
    bodies = [json.loads(m.data) for m in outs]
    first = {"verb": "start", "flow_id": fid, "at": bodies[0]["details"]["first"]["at"]}
    for m, body in zip(outs, bodies, strict=True):
        assert m.subject == s.outcomes(fid)
        assert m.headers["Flowd-Command-Id"] == "k1"
        assert (body["command_id"], body["status"], body["code"]) == (
            "k1",
            "rejected",
            "idempotency_conflict",
        )
        assert body["details"] == {"command_id": "k1", "first": first}
    assert {m.headers["Nats-Msg-Id"] for m in outs} == {
        f"out-flowd:seq:{s.cmd_stream}:{seq}",  # the update's place in its stream
        f"out-flowd:seq:{s.obs_stream}:1",  # the observation's: the id space is shared
    }
    # the recorded outcome is still the first use's
    recorded = (await w.request("outcome", {"command_id": "k1"}))["result"]
    assert recorded["outcome"]["status"] == "applied"
    assert (recorded["first_use"]["verb"], recorded["first_use"]["flow_id"]) == ("start", fid)

    # over P.api.*: an error reply for a different request, the recorded outcome for the same
    conflict = await w.request(
        f"cmd.{fid}.update", {"patch": {"x": 1}}, headers={"Nats-Msg-Id": "k1"}
    )
    assert conflict["ok"] is False
    assert conflict["error"]["code"] == "idempotency_conflict"
    assert conflict["error"]["details"]["first"]["verb"] == "start"
    repeat = await w.request(f"cmd.{fid}.start", {}, headers={"Nats-Msg-Id": "k1"})
    assert repeat["result"]["duplicate"] is True, repeat
    assert (await w.request("get", {"flow_id": fid}))["result"]["state_json"] == {"y": 1}


async def test_client_and_flowctl_refuse_a_reused_id(daemon: DaemonProcess) -> None:
    async with await FlowClient.connect(daemon.nats_url, prefix=daemon.prefix) as fc:
        made = await fc.create("c", "g", "o", wait=True)
        assert isinstance(made, Outcome)
        fid = str(made.flow_id)
        started = await fc.start(fid, command_id="k1", wait=True)
        assert isinstance(started, Outcome)
        # the same request again: its recorded outcome
        again = await fc.start(fid, command_id="k1", wait=True)
        assert isinstance(again, Outcome)
        assert (again.status, again.revision) == ("applied", 1)
        # another request under that id (JetStream drops it as a duplicate; the client
        # compares what was asked)
        with pytest.raises(FlowdError) as info:
            await fc.update(fid, {"x": 1}, command_id="k1", wait=True)
        assert info.value.code == "idempotency_conflict"
        assert info.value.details["first"]["verb"] == "start"
        with pytest.raises(FlowdError):
            await fc.update(fid, {"x": 1}, command_id="k1")  # without waiting too
        with pytest.raises(ValueError, match="reserved"):
            await fc.update(fid, {"x": 1}, command_id="flowd:seq:X:1")

    done = flowctl(daemon, "--json", "update", fid, "--patch", '{"x":1}', "--command-id", "k1")
    assert done.returncode == 1
    assert done.stderr.startswith("idempotency_conflict: ")
    assert '"applied"' not in done.stdout
    reserved = flowctl(daemon, "update", fid, "--patch", "{}", "--command-id", "flowd:x")
    assert reserved.returncode == 2
    async with await FlowClient.connect(daemon.nats_url, prefix=daemon.prefix) as fc:
        flow = await fc.get(fid)
    assert (flow["revision"], flow["state_json"]) == (1, {})


async def test_engine_made_events_carry_their_derived_id(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.command(fid, "create"), CREATE)
    await w.publish(s.command(fid, "start"))
    await w.publish(s.command(fid, "wait"), {"wait_json": {"kind": "timer", "at": at(0.5)}})
    evs = await until_kinds(w, fid, ["created", "started", "waiting", "resumed"])
    due = evs[-1]["payload"]["cause"]["due_at"]
    assert evs[-1]["command_id"] == f"flowd:wake:{fid}:2:timer:{due}"
    [msg] = [
        m
        for m in await w.stream_msgs(s.evt_stream, s.evt_all)
        if json.loads(m.data)["event_id"] == evs[-1]["event_id"]
    ]
    assert msg.headers["Flowd-Command-Id"] == evs[-1]["command_id"]
    recorded = (await w.request("outcome", {"command_id": evs[-1]["command_id"]}))["result"]
    assert recorded["outcome"]["status"] == "applied"
