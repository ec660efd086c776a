"""What NATS cannot carry never takes the daemon down: a dead letter of a body near the
server's max_payload is cut to fit (issue 16, defect 1), and flowd refuses to start when the
largest event its settings allow would not fit the server's max_payload."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowd.bus.subjects import DLQ_REASON, DLQ_SUBJECT, DLQ_TRUNCATED
from flowd.core.outbox import EVENT_OVERHEAD
from flowd.embedded import EmbeddedNats
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.nats, pytest.mark.postgres]


async def test_a_dead_letter_near_max_payload_is_cut_to_fit(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w, s = nats_wire, nats_wire.s
    size = int(w.nc.max_payload) - 200  # fits alone; with the dead letter's headers it would not
    subject = s.command(uuid.uuid4(), "create")
    await w.js.publish(subject, b"x" * size)  # no headers at all
    letters = await w.wait_for(lambda: w.stream_msgs(s.dlq_stream))
    [letter] = letters
    headers = letter.headers or {}
    assert headers[DLQ_SUBJECT] == subject
    assert headers[DLQ_TRUNCATED] == str(size)
    assert "exceeds" in headers[DLQ_REASON]
    assert 0 < len(letter.data) < size
    assert set(letter.data) == {ord("x")}
    # The daemon kept its NATS connection: still ready, and it still applies commands.
    assert await asyncio.to_thread(_status, daemon.url("/readyz")) == 200
    flow_id = uuid.uuid4()
    body = {"id": str(flow_id), "controller_id": "c", "goal": "g", "owner_session_key": "o"}
    await w.publish(s.create(), body)
    events = await w.wait_for(lambda: _events_of(w, flow_id))
    assert [e["kind"] for e in events] == ["created"]


async def _events_of(w: Wire, flow_id: uuid.UUID) -> list[dict[str, Any]]:
    return [e for e in await w.events() if e["flow_id"] == str(flow_id)]


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server of its own whose max_payload is 256 KiB (a quarter of the default)."""
    config = tmp_path / "small.conf"
    config.write_text(f"max_payload: {SMALL}\n")
    server = EmbeddedNats(tmp_path / "small-nats", cluster=["-c", str(config)])
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


SMALL = 262_144


def test_flowd_refuses_to_start_when_its_largest_event_would_not_fit(
    small_nats: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    d = DaemonProcess(small_nats, database_url, prefix, tmp_path).start()
    assert d.proc is not None
    assert d.proc.wait(60) == 1
    [line] = [e for e in d.log_events() if e.get("event") == "payload_limits_do_not_fit"]
    largest = 262_144 + 2 * 262_144 + EVENT_OVERHEAD
    assert line["level"] == "error"
    assert f"largest event flowd can publish is {largest} bytes" in line["error"]
    assert f"the server's max_payload {SMALL}" in line["error"]
    for setting in ("FLOWD_MAX_STATE_BYTES", "FLOWD_MAX_PAYLOAD"):
        assert setting in line["error"]
    assert [e["event"] for e in d.log_events() if e.get("level") == "error"] == [
        "payload_limits_do_not_fit"
    ]


def test_flowd_starts_when_its_limits_fit_the_server(
    small_nats: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    env = {"FLOWD_MAX_STATE_BYTES": "32768", "FLOWD_MAX_PAYLOAD": "32768"}
    d = DaemonProcess(small_nats, database_url, prefix, tmp_path, **env).start()
    try:
        d.wait_ready()
        assert 32_768 * 3 + EVENT_OVERHEAD <= SMALL
    finally:
        assert d.stop() == 0


async def test_a_state_growing_past_the_limit_is_refused_and_stalls_nothing(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    """Issue 16, defect 2 as reported: five updates of 250,000 bytes each, every body under
    FLOWD_MAX_PAYLOAD. The state would outgrow FLOWD_MAX_STATE_BYTES from the second on:
    those are rejected (invalid_input, state_too_large), and other flows' events still go."""
    w, s = nats_wire, nats_wire.s
    flow_id = uuid.uuid4()
    body = {"id": str(flow_id), "controller_id": "c", "goal": "g", "owner_session_key": "o"}
    await w.publish(s.create(), body)
    await w.publish(s.command(flow_id, "start"))
    cids = [
        await w.publish(s.command(flow_id, "update"), {"patch": {f"k{i}": "x" * 250_000}})
        for i in range(5)
    ]
    rejected = await w.wait_for(lambda: _outcomes_of(w, set(cids[1:])))
    for outcome in rejected:
        assert outcome["code"] == "invalid_input"
        assert outcome["details"]["reason"] == "state_too_large"
        assert outcome["details"]["limit"] == 262_144
        assert outcome["details"]["size"] > 262_144
        assert "state_json" in outcome["details"]["errors"]
    events = await w.wait_for(lambda: _events_of(w, flow_id))
    assert [e["kind"] for e in events][-1] == "state_updated"
    assert [e["command_id"] for e in events if e["kind"] == "state_updated"] == cids[:1]
    other = uuid.uuid4()
    await w.publish(s.create(), {**body, "id": str(other)})
    assert [e["kind"] for e in await w.wait_for(lambda: _events_of(w, other))] == ["created"]


async def _outcomes_of(w: Wire, cids: set[str]) -> list[dict[str, Any]] | None:
    found = [o for o in await w.outcomes() if o["command_id"] in cids]
    return found if len(found) == len(cids) else None


async def test_an_api_reply_nats_would_not_carry_is_an_error_not_silence(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    w, s = nats_wire, nats_wire.s
    flow_id = uuid.uuid4()
    body = {"id": str(flow_id), "controller_id": "c", "goal": "g", "owner_session_key": "o"}
    await w.publish(s.create(), body)
    await w.publish(s.command(flow_id, "start"))
    for _ in range(6):  # the state stays one key; the audit log keeps every patch
        await w.publish(s.command(flow_id, "update"), {"patch": {"k": "x" * 200_000}})
    await w.wait_for(lambda: _count_events(w, flow_id, 8))
    reply = await w.request("events", {"flow_id": str(flow_id)})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_input"
    assert reply["error"]["details"]["reason"] == "reply_too_large"
    assert reply["error"]["details"]["limit"] == w.nc.max_payload
    some = await w.request("events", {"flow_id": str(flow_id), "limit": 3})
    assert [e["revision"] for e in some["result"]["events"]] == [0, 1, 2]


async def _count_events(w: Wire, flow_id: uuid.UUID, n: int) -> bool:
    return len(await _events_of(w, flow_id)) >= n
