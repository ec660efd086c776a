"""A command flowd fails on (a bug, not bad input) is dead-lettered at once, with the reason,
and its flow's later commands follow it in order (subjects.md, Dead letters)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from tests.acceptance.test_daemon import CREATE, by_flow
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

# A real failure flowd does not expect: PostgreSQL raising P0001 (raise_exception) for one
# flow's update, as a trigger someone added might. No fault hook in flowd itself.
BOOM = """
CREATE FUNCTION test_boom() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state_json ? 'boom' THEN
        RAISE EXCEPTION 'boom: a trigger refused this update';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_boom BEFORE UPDATE ON flows FOR EACH ROW EXECUTE FUNCTION test_boom();
"""


async def test_a_command_flowd_fails_on_is_dead_lettered_at_once_and_not_overtaken(
    daemon: DaemonProcess, nats_wire: Wire, database_url: str
) -> None:
    s, w = nats_wire.s, nats_wire
    fid = str(uuid.uuid4())
    await w.publish(s.command(fid, "create"), CREATE, cid="c-create")
    await w.publish(s.command(fid, "start"), cid="c-start")
    await w.wait_for(lambda: _events(w, fid, 2))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(BOOM)
    finally:
        await conn.close()

    await w.publish(s.command(fid, "update"), {"patch": {"boom": 1}}, cid="c-boom")
    await w.publish(s.command(fid, "update"), {"patch": {"ok": 1}}, cid="c-ok")
    events = await w.wait_for(lambda: _events(w, fid, 3))
    assert [(e["kind"], e["revision"], e["command_id"]) for e in events] == [
        ("created", 0, "c-create"),
        ("started", 1, "c-start"),
        ("state_updated", 2, "c-ok"),
    ]
    assert events[-1]["flow"]["state_json"] == {"ok": 1}

    # its outcome: a recorded internal rejection, published before the next command's event
    stream = await w.stream_msgs(s.evt_stream)
    order = [(m.subject, json.loads(m.data).get("command_id")) for m in stream]
    assert order.index((s.outcomes(fid), "c-boom")) < order.index(
        (f"{s.prefix}.evt.{fid}.state_updated", "c-ok")
    )
    [outcome] = await w.outcomes()
    assert (outcome["command_id"], outcome["status"], outcome["code"]) == (
        "c-boom",
        "rejected",
        "internal",
    )
    assert outcome["details"] == {"error": "RaiseError"}
    recorded = (await w.request("outcome", {"command_id": "c-boom"}))["result"]["outcome"]
    assert recorded["code"] == "internal"

    # dead-lettered on its first delivery, with the reason
    [letter] = await w.wait_for(lambda: w.stream_msgs(s.dlq_stream))
    assert letter.headers["Nats-Msg-Id"] == "dlq-c-boom"
    assert letter.headers["Flowd-Dlq-Delivered"] == "1"
    assert letter.headers["Flowd-Dlq-Reason"].startswith("crashed applying it: RaiseError: ")
    assert json.loads(letter.data) == {"patch": {"boom": 1}}
    assert 'flowd_commands_crashed_total{kind="cmd"} 1' in daemon.metrics().splitlines()
    assert daemon.proc is not None
    assert daemon.proc.poll() is None


async def _events(w: Wire, fid: str, n: int) -> list[dict[str, Any]] | None:
    evs = by_flow(await w.events()).get(fid, [])
    return evs if len(evs) >= n else None
