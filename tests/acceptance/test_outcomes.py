"""Every command gets its one outcome, whatever headers it carries and however its subject
spells the flow id (issue 16: defects 6 and 13)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

CREATE = {"controller_id": "ctl", "goal": "test", "owner_session_key": "owner"}


async def _events_of(w: Wire, fid: str, n: int) -> list[dict[str, Any]] | None:
    evs = [e for e in await w.events() if e["flow_id"] == fid]
    return evs if len(evs) >= n else None


async def _outcomes_on(w: Wire, token: str, n: int) -> list[Any] | None:
    msgs = await w.stream_msgs(w.s.evt_stream, f"{w.s.prefix}.out.{token}")
    return msgs if len(msgs) >= n else None


@pytest.mark.parametrize("status", ["408", "409", "100", "503", ""])
async def test_a_user_status_header_does_not_hide_a_command(
    daemon: DaemonProcess, nats_wire: Wire, status: str
) -> None:
    """Only the server's status lines mark pull-status messages: a command carrying a user
    header ``Status`` is applied like any other."""
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    for cid, subject, body in [
        ("c1", s.create(), {**CREATE, "id": fid}),
        ("c2", s.command(fid, "start"), {}),
        ("c3", s.command(fid, "update"), {"patch": {"x": 1}}),
    ]:
        data = uuid.uuid4().hex  # distinct ids per parametrised case
        await w.js.publish(
            subject,
            json.dumps(body).encode(),
            headers={"Nats-Msg-Id": f"{cid}-{data}", "Status": status, "Description": "x"},
        )
    events = await w.wait_for(lambda: _events_of(w, fid, 3))
    assert [e["kind"] for e in events] == ["created", "started", "state_updated"]
    assert events[-1]["flow"]["state_json"] == {"x": 1}


async def test_unchanged_outcomes_echo_the_token_as_published(
    daemon: DaemonProcess, nats_wire: Wire
) -> None:
    """``P.out.<token>`` carries the flow id token exactly as the command's subject had it,
    for ``unchanged`` outcomes as for rejections."""
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    upper = fid.upper()
    await w.publish(s.create(), {**CREATE, "id": fid, "sync_mode": "mirrored"})
    await w.wait_for(lambda: _events_of(w, fid, 2))
    await w.publish(s.command(upper, "request_cancel"), cid="rc-1")
    await w.wait_for(lambda: _events_of(w, fid, 3))
    await w.publish(s.command(upper, "request_cancel"), cid="rc-2")  # a repeat: unchanged
    obs = {"run_id": "r1", "task": "t", "status": "succeeded"}
    await w.publish(f"{s.prefix}.obs.{upper}", obs, cid="obs-1")
    await w.wait_for(lambda: _events_of(w, fid, 4))
    late = {"run_id": "r1", "task": "t", "status": "running"}  # never overwrites: unchanged
    await w.publish(f"{s.prefix}.obs.{upper}", late, cid="obs-2")
    msgs = await w.wait_for(lambda: _outcomes_on(w, upper, 2))
    got = {m.headers["Flowd-Command-Id"]: json.loads(m.data) for m in msgs}
    assert {cid: o["status"] for cid, o in got.items()} == {
        "rc-2": "unchanged",
        "obs-2": "unchanged",
    }
    assert await w.stream_msgs(s.evt_stream, f"{s.prefix}.out.{fid}") == []
