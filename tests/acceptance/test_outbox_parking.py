"""One flow whose events NATS will not take never holds up the others (issue 16, defect 2):
its event is parked with its later events behind it, 1,000 other flows each get their one
outcome meanwhile, and ``flowctl outbox skip`` releases it, its later events in order."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import pytest

from flowd.bus.subjects import DLQ_REASON, DLQ_SUBJECT, MSG_ID
from tests.acceptance.test_client import flowctl
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

OTHERS = 1000
LIMIT = 4096  # the events stream's max_msg_size, lowered while flowd runs


#: A wait whose event (the wait twice: in the payload and in the snapshot) exceeds LIMIT;
#: resumed, the flow's later events are small again.
BIG_WAIT = {
    "kind": "any",
    "of": [{"kind": "signal", "name": f"{n}-" + "s" * 150} for n in range(20)],
}


def create(flow_id: uuid.UUID) -> dict[str, Any]:
    return {"id": str(flow_id), "controller_id": "c", "goal": "g", "owner_session_key": "o"}


async def events_of(w: Wire, flow_id: uuid.UUID) -> list[dict[str, Any]]:
    return [e for e in await w.events() if e["flow_id"] == str(flow_id)]


async def test_a_flow_nats_refuses_is_parked_while_1000_others_go_on(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w, s = nats_wire, nats_wire.s
    stuck = uuid.uuid4()
    await w.publish(s.create(), create(stuck))
    await w.publish(s.command(stuck, "start"))
    await w.wait_for(lambda: _count(events_of(w, stuck), 2))
    info = await w.js.stream_info(s.evt_stream)
    info.config.max_msg_size = LIMIT  # an operator lowers the limit while flowd runs
    await w.js.update_stream(info.config)

    big = await w.publish(s.command(stuck, "wait"), {"wait_json": BIG_WAIT})
    parked = await w.wait_for(lambda: _parked(daemon))
    [row] = parked
    assert row["topic"] == f"evt.{stuck}.waiting"
    assert row["size"] > LIMIT
    assert "10054" in row["reason"]
    # Its flow's later events (and outcomes) wait behind it...
    later = [await w.publish(s.command(stuck, "resume"), {})]
    later += [await w.publish(s.command(stuck, "update"), {"patch": {"n": n}}) for n in (1, 2)]
    # ...while 1,000 other flows each get exactly one outcome.
    others = {uuid.uuid4(): uuid.uuid4().hex for _ in range(OTHERS)}
    await asyncio.gather(*(w.publish(s.create(), create(f), cid=c) for f, c in others.items()))
    created = await w.wait_for(lambda: _created(w, set(others.values())), seconds=120)
    assert Counter(created) == Counter(others.values())  # one each, no more
    assert [e["revision"] for e in await events_of(w, stuck)] == [0, 1]
    assert "outbox_parked: 1" in await asyncio.to_thread(_get, daemon.url("/readyz"))
    assert "flowd_outbox_parked 1" in await asyncio.to_thread(daemon.metrics)
    logged = [e for e in daemon.log_events() if e.get("event") == "outbox_row_parked"]
    assert [e["msg_id"] for e in logged] == [row["msg_id"]]
    assert logged[0]["flow"] == str(stuck)

    # Skip it: a copy goes to P.dlq.evt, and the flow's later events follow, in order.
    done = await asyncio.to_thread(
        flowctl, daemon, "--json", "outbox", "skip", str(row["id"]), "--reason", "too big"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dead_letter"] == s.dead_letter("evt")
    events = await w.wait_for(lambda: _count(events_of(w, stuck), 5))
    assert [e["revision"] for e in events] == [0, 1, 3, 4, 5]
    assert [e["command_id"] for e in events[2:]] == later
    [letter] = await w.stream_msgs(s.dlq_stream, s.dead_letter("evt"))
    headers = letter.headers or {}
    assert headers[MSG_ID] == f"dlq-evt-{row['msg_id']}"
    assert headers[DLQ_SUBJECT] == f"{s.prefix}.{row['topic']}"
    assert headers[DLQ_REASON].startswith("too big")
    assert json.loads(letter.data)["command_id"] == big
    listed = await asyncio.to_thread(flowctl, daemon, "--json", "outbox")
    assert json.loads(listed.stdout) == {"parked": []}


async def test_flowctl_outbox_retry_and_unknown_rows(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w, s = nats_wire, nats_wire.s
    stuck = uuid.uuid4()
    await w.publish(s.create(), create(stuck))
    await w.wait_for(lambda: _count(events_of(w, stuck), 1))
    info = await w.js.stream_info(s.evt_stream)
    info.config.max_msg_size = LIMIT
    await w.js.update_stream(info.config)
    await w.publish(s.command(stuck, "start"), {})
    await w.publish(s.command(stuck, "wait"), {"wait_json": BIG_WAIT})
    [row] = await w.wait_for(lambda: _parked(daemon))
    assert row["topic"] == f"evt.{stuck}.waiting"
    # Raise the limit again, retry: it goes, in order after the others.
    info.config.max_msg_size = -1
    await w.js.update_stream(info.config)
    retried = await asyncio.to_thread(flowctl, daemon, "outbox", "retry", str(row["id"]))
    assert retried.returncode == 0, retried.stderr
    events = await w.wait_for(lambda: _count(events_of(w, stuck), 3))
    assert [e["kind"] for e in events] == ["created", "started", "waiting"]
    missing = await asyncio.to_thread(flowctl, daemon, "outbox", "skip", "999999", "--reason", "x")
    assert missing.returncode == 1
    assert missing.stderr.startswith("not_found")
    usage = await asyncio.to_thread(flowctl, daemon, "outbox", "skip", "1")
    assert usage.returncode == 2


async def _count(events: Any, n: int) -> list[dict[str, Any]] | None:
    got: list[dict[str, Any]] = await events
    return got if len(got) >= n else None


async def _parked(daemon: DaemonProcess) -> list[dict[str, Any]]:
    listed = await asyncio.to_thread(flowctl, daemon, "--json", "outbox")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)["parked"]
    return rows


async def _created(w: Wire, cids: set[str]) -> list[str] | None:
    seen = [e["command_id"] for e in await w.events() if e["command_id"] in cids]
    return seen if len(set(seen)) == len(cids) else None


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.parametrize(
    ("op", "body", "code"),
    [
        ("outbox.skip", {"id": 2**64, "reason": "r"}, "invalid_input"),
        ("outbox.skip", {"id": "1", "reason": "r"}, "invalid_input"),
        ("outbox.skip", {"id": 0, "reason": "r"}, "invalid_input"),
        ("outbox.skip", {"id": 1}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": ""}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "a\u0000b"}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "a\nb"}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "a\ud800b"}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "x" * 1001}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "r", "extra": 1}, "invalid_input"),
        ("outbox.skip", {"id": 1, "reason": "r"}, "not_found"),
        ("outbox.retry", {"id": 1.5}, "invalid_input"),
        ("outbox.retry", {"id": 9_223_372_036_854_775_807}, "not_found"),
        ("outbox.list", {"limit": 0}, "invalid_input"),
        ("outbox.list", [1], "invalid_input"),
        ("outbox.nope", {}, "invalid_input"),
    ],
)
async def test_outbox_api_refuses_bad_requests_precisely(
    daemon: DaemonProcess, nats_wire: Wire, op: str, body: Any, code: str
) -> None:
    reply = await nats_wire.request(op, body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code, reply
    assert (await nats_wire.request("outbox.list"))["result"] == {"parked": []}
