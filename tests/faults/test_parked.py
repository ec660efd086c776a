"""A parked outbox row survives kill -9 of the daemon: after a restart it is still parked and
listed, its flow still blocked, and every other flow's events still flow."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from tests.acceptance.test_outbox_parking import BIG_WAIT, LIMIT, _count, _parked, create, events_of
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.nats]


async def test_a_parked_row_survives_kill_9(
    make_daemon: Callable[..., DaemonProcess], nats_wire: Wire
) -> None:
    w, s = nats_wire, nats_wire.s
    daemon = make_daemon(FLOWD_ACK_WAIT=3)  # what it had in hand comes back soon
    stuck = uuid.uuid4()
    await w.publish(s.create(), create(stuck))
    await w.publish(s.command(stuck, "start"))
    await w.wait_for(lambda: _count(events_of(w, stuck), 2))
    info = await w.js.stream_info(s.evt_stream)
    info.config.max_msg_size = LIMIT
    await w.js.update_stream(info.config)
    await w.publish(s.command(stuck, "wait"), {"wait_json": BIG_WAIT})
    [row] = await w.wait_for(lambda: _parked(daemon))
    resume = await w.publish(s.command(stuck, "resume"), {})  # waits behind the parked row
    await w.wait_for(lambda: _applied(daemon, resume))

    daemon.kill()  # SIGKILL
    daemon = make_daemon(FLOWD_ACK_WAIT=3)  # (its start puts the stream's own limits back)

    assert await _parked(daemon) == [row]  # still parked: not retried by itself
    others = [uuid.uuid4() for _ in range(20)]
    await asyncio.gather(*(w.publish(s.create(), create(f)) for f in others))
    for f in others:
        assert [e["kind"] for e in await w.wait_for(lambda f=f: events_of(w, f))] == ["created"]
    await w.publish(s.command(stuck, "update"), {"patch": {"n": 1}})
    await asyncio.sleep(1)  # time enough for a blocked event to leak out, were it free
    assert [e["revision"] for e in await events_of(w, stuck)] == [0, 1]
    assert "outbox_parked: 1" in await asyncio.to_thread(_readyz, daemon)
    # A parked row does not hold up a clean stop: the rest is flushed, exit 0.
    assert await asyncio.to_thread(daemon.stop) == 0
    assert "outbox_flush_incomplete" not in {e.get("event") for e in daemon.log_events()}


async def _applied(daemon: DaemonProcess, command_id: str) -> bool:
    return any(
        e.get("event") == "command_applied" and e.get("command_id") == command_id
        for e in daemon.log_events()
    )


def _readyz(daemon: DaemonProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(daemon.url("/readyz"), timeout=5) as r:
        return str(r.read().decode())
