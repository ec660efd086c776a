"""What NATS cannot carry never takes the daemon down: a dead letter of a body near the
server's max_payload is cut to fit (issue 16, defect 1)."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import pytest

from flowd.bus.subjects import DLQ_REASON, DLQ_SUBJECT, DLQ_TRUNCATED
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


async def _events_of(w: Wire, flow_id: uuid.UUID) -> list[dict[str, object]]:
    return [e for e in await w.events() if e["flow_id"] == str(flow_id)]


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)
