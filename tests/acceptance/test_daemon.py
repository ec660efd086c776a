"""The real daemon, driven over raw NATS exactly as subjects.md describes."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

CREATE = {"controller_id": "ctl", "goal": "test", "owner_session_key": "owner"}


def by_flow(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        out[e["flow_id"]].append(e)
    return out


def assert_gapless(events: list[dict[str, Any]]) -> None:
    """Per flow: revisions 0..n in order, each exactly once; event ids unique."""
    assert len({e["event_id"] for e in events}) == len(events)
    for flow_id, evs in by_flow(events).items():
        revs = [e["revision"] for e in evs]
        assert revs == list(range(len(revs))), (flow_id, revs)


async def test_every_verb_end_to_end(daemon: DaemonProcess, nats_wire: Wire) -> None:
    s, w = nats_wire.s, nats_wire
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    script: list[tuple[str, dict[str, Any]]] = [
        (s.create(), {**CREATE, "id": a, "state_json": {"n": 0}}),
        (s.command(a, "start"), {}),
        (s.command(a, "update"), {"patch": {"n": 1}, "next_step": "build"}),
        (s.command(a, "wait"), {"wait_json": {"kind": "manual"}}),
        (s.command(a, "resume"), {"state_patch": {"approved": True}}),
        (s.command(a, "request_cancel"), {}),
        (s.command(a, "cancel"), {}),
        (s.create(), {**CREATE, "id": b}),
        (s.command(b, "start"), {"expected_revision": 0}),
        (s.command(b, "finish"), {"final_state": {"done": True}}),
        (s.create(), {**CREATE, "id": c}),
        (s.command(c, "start"), {}),
        (s.command(c, "fail"), {"reason": "broken"}),
    ]
    cids = [await w.publish(subject, body) for subject, body in script]
    events = await w.wait_for(lambda: _n_events(w, 13))
    flows = by_flow(events)
    assert [e["kind"] for e in flows[a]] == [
        "created", "started", "state_updated", "waiting", "resumed", "cancel_requested",
        "cancelled",
    ]  # fmt: skip
    assert [e["kind"] for e in flows[b]] == ["created", "started", "finished"]
    assert [e["kind"] for e in flows[c]] == ["created", "started", "failed"]
    assert [e["command_id"] for e in events if e["flow_id"] == a] == cids[:7]
    assert_gapless(events)
    last_a = flows[a][-1]["flow"]
    assert (last_a["status"], last_a["state_json"], last_a["current_step"]) == (
        "cancelled",
        {"n": 1, "approved": True},
        "build",
    )
    assert flows[b][-1]["flow"]["state_json"] == {"done": True}
    assert flows[c][-1]["payload"] == {"reason": "broken"}
    got = await w.request("get", {"flow_id": c})
    assert got["ok"]
    assert got["result"]["state_json"]["failure"]["reason"] == "broken"
    assert await w.outcomes() == []


async def _n_events(w: Wire, n: int) -> list[dict[str, Any]] | None:
    events = await w.events()
    return events if len(events) >= n else None


async def test_mirrored_flow_fed_by_observations(daemon: DaemonProcess, nats_wire: Wire) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.create(), {**CREATE, "id": fid, "sync_mode": "mirrored"})
    # Observations have their own stream: they may overtake the create, so wait for it.
    await w.wait_for(lambda: _n_events(w, 2))
    await w.publish(s.observation(fid), {"run_id": "r1", "task": "backup", "status": "running"})
    await w.publish(
        s.observation(fid),
        {"run_id": "r1", "task": "backup", "status": "succeeded", "result_json": {"bytes": 9}},
    )
    late = await w.publish(
        s.observation(fid), {"run_id": "r1", "task": "backup", "status": "running"}
    )
    await w.publish(s.observation(fid), {"run_id": "r2", "task": "prune", "status": "pending"})
    events = await w.wait_for(lambda: _n_events(w, 5))
    assert [e["kind"] for e in events] == ["created", "started", *["step_observed"] * 3]
    assert events[1]["final"]
    assert not events[0]["final"]
    outcomes = await w.wait_for(w.outcomes)
    assert outcomes == [{"command_id": late, "status": "unchanged", "flow_id": fid, "revision": 3}]
    steps = (await w.request("steps", {"flow_id": fid}))["result"]["steps"]
    assert [(st["run_id"], st["status"], st["result_json"]) for st in steps] == [
        ("r1", "succeeded", {"bytes": 9}),
        ("r2", "pending", None),
    ]


async def test_same_command_id_has_one_effect_and_one_outcome(
    make_daemon: Any, nats_wire: Wire
) -> None:
    # A 1 s duplicate window, so the third publish reaches flowd: Postgres must dedup it.
    d = make_daemon(FLOWD_DUPLICATE_WINDOW=1)
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.create(), {**CREATE, "id": fid}, cid="create-1")
    await w.publish(s.command(fid, "start"), cid="start-1")
    await w.publish(s.command(fid, "update"), {"patch": {"n": 1}}, cid="upd-1")
    await w.publish(s.command(fid, "update"), {"patch": {"n": 1}}, cid="upd-1")  # JetStream dedup
    await w.wait_for(lambda: _n_events(w, 3))
    await asyncio.sleep(1.5)  # past the duplicate window
    await w.publish(s.command(fid, "update"), {"patch": {"n": 2}}, cid="upd-1")  # conflict
    await w.publish(s.command(fid, "finish"), cid="fin-1")
    await w.publish(s.create(), {**CREATE, "id": fid}, cid="create-1")  # replayed create
    events = await w.wait_for(lambda: _n_events(w, 4))
    await w.wait_for(lambda: _metric(d, 'flowd_commands_duplicate_total{kind="cmd"} 1'))
    assert [(e["kind"], e["command_id"]) for e in events] == [
        ("created", "create-1"),
        ("started", "start-1"),
        ("state_updated", "upd-1"),
        ("finished", "fin-1"),
    ]
    assert events[-1]["flow"]["state_json"] == {"n": 1}
    # the same id for another request: refused, the first use named (subjects.md)
    [conflict] = await w.wait_for(w.outcomes)
    assert (conflict["command_id"], conflict["code"]) == ("upd-1", "idempotency_conflict")
    assert conflict["details"]["first"]["verb"] == "update"
    cmd_msgs = await w.stream_msgs(s.cmd_stream)
    assert len(cmd_msgs) == 6  # 7 published, one dropped by JetStream's dedup


async def _metric(d: DaemonProcess, line: str) -> bool:
    return line in d.metrics().splitlines()


async def test_api_queries_and_typed_mutations(daemon: DaemonProcess, nats_wire: Wire) -> None:
    w = nats_wire
    fid = str(uuid.uuid4())
    created = await w.request(
        "cmd.create", {**CREATE, "id": fid, "owner_session_key": "alice"}, {"Nats-Msg-Id": "a1"}
    )
    assert created["ok"], created
    assert created["result"]["outcome"]["status"] == "applied"
    assert created["result"]["flow"]["status"] == "created"
    body = {**CREATE, "id": fid, "owner_session_key": "alice"}
    again = await w.request("cmd.create", body, {"Nats-Msg-Id": "a1"})
    assert again["result"]["duplicate"] is True
    other = await w.request("cmd.create", {**CREATE, "id": fid}, {"Nats-Msg-Id": "a1"})
    assert other["error"]["code"] == "idempotency_conflict"  # the id, for another request
    started = await w.request(f"cmd.{fid}.start", {}, {"Nats-Msg-Id": "a2"})
    assert started["result"]["flow"]["revision"] == 1
    bad = await w.request(f"cmd.{fid}.start", {}, {"Nats-Msg-Id": "a3"})
    assert bad["error"]["code"] == "invalid_transition"
    bad_again = await w.request(f"cmd.{fid}.start", {}, {"Nats-Msg-Id": "a3"})
    assert bad_again["error"] == bad["error"]  # the recorded rejection, replayed
    stale = await w.request(f"cmd.{fid}.update", {"patch": {}, "expected_revision": 0})
    assert stale["error"]["code"] == "revision_mismatch"
    assert stale["error"]["details"] == {"flow_id": fid, "expected": 0, "actual": 1}

    listed = await w.request("list", {"owner": "alice"})
    assert [f["id"] for f in listed["result"]["flows"]] == [fid]
    assert (await w.request("list", {"status": "running", "limit": 1}))["result"]["next"] == fid
    events = (await w.request("events", {"flow_id": fid}))["result"]["events"]
    assert [e["kind"] for e in events] == ["created", "started"]
    outcome = (await w.request("outcome", {"command_id": "a3"}))["result"]["outcome"]
    assert outcome["code"] == "invalid_transition"
    missing = await w.request("get", {"flow_id": str(uuid.uuid4())})
    assert missing["error"]["code"] == "not_found"
    assert (await w.request("get", {"flow_id": "nope"}))["error"]["code"] == "invalid_input"
    assert (await w.request("frobnicate"))["error"]["code"] == "invalid_input"
    # API mutations publish their events like any command
    evs = await w.wait_for(lambda: _n_events(w, 2))
    assert [e["command_id"] for e in evs] == ["a1", "a2"]


async def test_bad_input_matrix(daemon: DaemonProcess, nats_wire: Wire) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.create(), {**CREATE, "id": fid}, cid="ok-create")
    await w.publish(s.command(fid, "start"), cid="ok-start")
    await w.wait_for(lambda: _n_events(w, 2))
    before = (await w.request("get", {"flow_id": fid}))["result"]

    nested: Any = {}
    for _ in range(40):
        nested = {"x": nested}
    dead = {
        "invalid-json": (s.command(fid, "update"), b"{not json"),
        "oversized": (
            s.command(fid, "update"),
            json.dumps({"patch": {"x": "y" * 300_000}}).encode(),
        ),
        "nested": (s.command(fid, "update"), json.dumps({"patch": nested}).encode()),
        "short-subject": (f"{s.prefix}.cmd.{fid}", b"{}"),
        "long-subject": (f"{s.prefix}.cmd.{fid}.update.more", b"{}"),
        "not-utf8": (s.command(fid, "update"), b"\xff\xfe"),
    }
    rejected = {
        "wrong-type": (s.command(fid, "update"), {"patch": {"x": 1}, "next_step": 5}),
        "non-object-patch": (s.command(fid, "update"), {"patch": [1, 2]}),
        "unknown-field": (s.command(fid, "start"), {"bogus": 1}),
        "unknown-verb": (s.command(fid, "explode"), {}),
        "bad-uuid": (s.command("not-a-uuid", "start"), {}),
        "not-an-object": (s.command(fid, "update"), [1]),
        "missing-field": (s.create(), {"goal": "g"}),
        "negative-revision": (s.command(fid, "cancel"), {"expected_revision": -1}),
        "string-revision": (s.command(fid, "cancel"), {"expected_revision": "1"}),
    }
    for cid, (subject, raw) in dead.items():
        await w.publish(subject, raw=raw, cid=cid)
    for cid, (subject, body) in rejected.items():
        await w.publish(subject, raw=json.dumps(body).encode(), cid=cid)
    outcomes = await w.wait_for(lambda: _n(w.outcomes, len(rejected)))
    assert {o["command_id"]: (o["status"], o["code"]) for o in outcomes} == {
        cid: ("rejected", "invalid_input") for cid in rejected
    }
    letters = await w.wait_for(lambda: _n(lambda: w.stream_msgs(s.dlq_stream), len(dead)))
    reasons = {m.headers["Nats-Msg-Id"][4:]: m.headers["Flowd-Dlq-Reason"] for m in letters}
    assert set(reasons) == set(dead)
    assert "exceeds" in reasons["oversized"]
    assert "deeper" in reasons["nested"]
    assert "not UTF-8 JSON" in reasons["invalid-json"]
    assert all(m.headers["Flowd-Dlq-Subject"] for m in letters)
    # nothing changed, and the daemon is alive and well
    assert (await w.request("get", {"flow_id": fid}))["result"] == before
    assert len(await w.events()) == 2
    await w.publish(s.command(fid, "finish"), cid="ok-finish")
    await w.wait_for(lambda: _n_events(w, 3))


async def _n(fetch: Any, n: int) -> Any:
    items = await fetch()
    return items if len(items) >= n else None


async def test_sigterm_finishes_work_and_exits_zero(daemon: DaemonProcess, nats_wire: Wire) -> None:
    s, w = nats_wire.s, nats_wire
    ids = [str(uuid.uuid4()) for _ in range(20)]
    for fid in ids:
        await w.publish(s.create(), {**CREATE, "id": fid})
        await w.publish(s.command(fid, "start"))
    await w.wait_for(lambda: _n_events(w, 1))
    assert daemon.stop() == 0
    assert any(e.get("event") == "stopped" for e in daemon.log_events())
    # whatever was applied was also published: restart and compare with the database
    events = await w.events()
    assert_gapless(events)
    applied = len(events)
    restarted = DaemonProcess(
        daemon.nats_url, daemon.database_url, daemon.prefix, daemon.log_path.parent
    )
    restarted.start("--drain")
    assert restarted.proc is not None
    assert restarted.proc.wait(60) == 0
    events = await w.events()
    assert len(events) == 40 >= applied
    assert_gapless(events)


async def test_drain_mode_exits_when_idle(
    make_daemon: Any, nats_wire: Wire, tmp_path: Path
) -> None:
    d = make_daemon("--drain")
    assert d.proc is not None
    assert d.proc.wait(30) == 0


def test_status_endpoints(daemon: DaemonProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(daemon.url("/healthz")) as r:
        assert r.status == 200
    metrics = daemon.metrics()
    assert "flowd_outbox_backlog 0" in metrics
    assert "flowd_commands_pending 0" in metrics


def test_counter_names_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in ("commands_applied_total", "commands_rejected_total", "outbox_backlog"):
        assert name in text, name


def test_flowd_nice_sets_the_daemons_priority(make_daemon: Any) -> None:
    """FLOWD_NICE: the running daemon has that nice value (raising it needs no privilege)."""
    wanted = os.getpriority(os.PRIO_PROCESS, 0) + 3
    d = make_daemon(FLOWD_NICE=wanted)
    assert d.proc is not None
    assert os.getpriority(os.PRIO_PROCESS, d.proc.pid) == wanted
