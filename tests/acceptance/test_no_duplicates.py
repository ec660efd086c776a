"""The real daemon never publishes an event twice (issue 16, defect 5b): outbox rows whose
delete was lost come back after a restart long past the duplicate window, and are found
stored and deleted, not sent again."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest
from nats.aio.msg import Msg

from flowd.bus.subjects import COMMAND_ID, MSG_ID
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

WINDOW = 1  # FLOWD_DUPLICATE_WINDOW, seconds
RESTORE = """
INSERT INTO outbox (topic, msg_id, command_id, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::json[])"""


async def test_rows_whose_delete_was_lost_are_not_sent_again_after_a_restart(
    make_daemon: Callable[..., DaemonProcess], nats_wire: Wire, database_url: str
) -> None:
    w, s = nats_wire, nats_wire.s
    daemon = make_daemon(FLOWD_DUPLICATE_WINDOW=WINDOW)
    flows = [uuid.uuid4() for _ in range(5)]
    for f in flows:
        await w.publish(
            s.create(), {"id": str(f), "controller_id": "c", "goal": "g", "owner_session_key": "o"}
        )
        await w.publish(s.command(f, "start"))
        await w.publish(s.command(f, "update"), {"patch": {"a": 1}})
    published = await w.wait_for(lambda: _at_least(w, 15))
    assert daemon.stop() == 0

    # Every published row comes back, as deletes that never reached the disk would leave it.
    head = s.prefix + "."
    rows = [
        (
            m.subject.removeprefix(head),
            (m.headers or {})[MSG_ID],
            (m.headers or {}).get(COMMAND_ID),
            m.data.decode(),
        )
        for m in published
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(RESTORE, *[list(c) for c in zip(*rows, strict=True)])
    finally:
        await conn.close()
    await asyncio.sleep(WINDOW + 1.5)  # JetStream would no longer drop a re-send by its id

    daemon = make_daemon(FLOWD_DUPLICATE_WINDOW=WINDOW)
    await w.publish(s.command(flows[0], "update"), {"patch": {"b": 2}})  # one new event
    events = await w.wait_for(lambda: _at_least(w, 16))
    await asyncio.sleep(1)  # time for a duplicate to show, were one sent
    ids = [(m.headers or {})[MSG_ID] for m in await w.stream_msgs(s.evt_stream, s.evt_all)]
    assert len(events) == 16
    assert Counter(ids).most_common(1)[0][1] == 1
    assert "flowd_outbox_already_stored_total 15" in await asyncio.to_thread(daemon.metrics)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await conn.close()


async def _at_least(w: Wire, n: int) -> list[Msg] | None:
    msgs = await w.stream_msgs(w.s.evt_stream, w.s.evt_all)
    return msgs if len(msgs) >= n else None
