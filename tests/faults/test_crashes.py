"""Faults under load: kill -9 of the daemon, PostgreSQL stopped and restarted.

After each: every command has exactly one effect, every flow's events are gapless by
revision, and the database and the event stream agree.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowd.embedded import EmbeddedPostgres
from tests.acceptance.test_daemon import CREATE, assert_gapless, by_flow
from tests.support import servers
from tests.support.daemon import Wire

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.nats]

FLOWS, UPDATES = 40, 8
PER_FLOW = 3 + UPDATES  # create, start, updates…, finish


async def publish_load(w: Wire, flows: list[str]) -> dict[str, list[str]]:
    """Each flow driven create -> start -> updates -> finish; returns command ids per flow."""
    s = w.s
    sent: dict[str, list[str]] = {f: [] for f in flows}
    for fid in flows:
        sent[fid].append(await w.publish(s.command(fid, "create"), CREATE))
    for fid in flows:
        sent[fid].append(await w.publish(s.command(fid, "start")))
    for i in range(UPDATES):
        for fid in flows:
            sent[fid].append(await w.publish(s.command(fid, "update"), {"patch": {"i": i}}))
    for fid in flows:
        sent[fid].append(await w.publish(s.command(fid, "finish")))
    return sent


async def _count(w: Wire) -> int:
    return int((await w.js.stream_info(w.s.evt_stream)).state.messages)


async def assert_all_applied_once(w: Wire, sent: dict[str, list[str]]) -> None:
    async def complete() -> list[dict[str, Any]] | None:
        events = await w.events()
        return events if len(events) >= FLOWS * PER_FLOW else None

    events = await w.wait_for(complete, seconds=90, every=0.5)
    assert len(events) == FLOWS * PER_FLOW
    assert_gapless(events)
    assert await w.outcomes() == []  # no command was rejected (so none ran out of order)
    flows = by_flow(events)
    for fid, cids in sent.items():
        assert [e["command_id"] for e in flows[fid]] == cids  # stream order, each once
        assert flows[fid][-1]["flow"]["state_json"] == {"i": UPDATES - 1}
        db = (await w.request("get", {"flow_id": fid}))["result"]
        assert db == flows[fid][-1]["flow"]  # database and stream agree
    assert max(Counter(e["event_id"] for e in events).values()) == 1


async def test_kill_9_mid_load_loses_and_duplicates_nothing(
    make_daemon: Any, nats_wire: Wire
) -> None:
    first = make_daemon(FLOWD_ACK_WAIT=2, FLOWD_BATCH=16)
    flows = [str(uuid.uuid4()) for _ in range(FLOWS)]
    load = asyncio.create_task(publish_load(nats_wire, flows))
    await nats_wire.wait_for(lambda: _at_least(nats_wire, 60), every=0.01)
    first.kill()
    applied_before = await _count(nats_wire)
    sent = await load
    assert applied_before < FLOWS * PER_FLOW, "the kill came too late to test anything"
    make_daemon(FLOWD_ACK_WAIT=2, FLOWD_BATCH=16)
    await assert_all_applied_once(nats_wire, sent)


async def _at_least(w: Wire, n: int) -> bool:
    return await _count(w) >= n


async def test_postgres_restart_under_load_recovers_by_itself(
    make_daemon: Any, nats_wire: Wire, tmp_path: Path
) -> None:
    with EmbeddedPostgres(tmp_path / "pg", fast=True) as pg:
        name = servers.create_database(pg.dsn)
        url = servers.with_database(pg.dsn, name)
        d = make_daemon(database=url, FLOWD_BATCH=16)
        flows = [str(uuid.uuid4()) for _ in range(FLOWS)]
        load = asyncio.create_task(publish_load(nats_wire, flows))
        await nats_wire.wait_for(lambda: _at_least(nats_wire, 40), every=0.02)
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(3)  # commands keep arriving; flowd must wait, not drop them
        stuck = await _count(nats_wire)
        await asyncio.to_thread(pg.start)
        sent = await load
        await assert_all_applied_once(nats_wire, sent)
        assert stuck < FLOWS * PER_FLOW
        assert "flowd_store_unavailable_total" in d.metrics()
        assert d.proc is not None
        assert d.proc.poll() is None  # never crashed
