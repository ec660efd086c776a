"""``P.api.*`` is served concurrently, up to FLOWD_API_CONCURRENCY, then ``busy`` (issue 17,
Seen 6: requests used to be served one at a time, so a slow ``list`` delayed every ``get``).

A slow ``list`` here is a real one: the test holds an ACCESS EXCLUSIVE lock on ``flows``,
so the daemon's list query waits inside PostgreSQL for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from flowd.client import FlowClient
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

CREATE = {"controller_id": "ctl", "goal": "test", "owner_session_key": "owner"}
WAITING_ON_A_LOCK = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'"""


@asynccontextmanager
async def flows_locked(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """``flows`` locked against every reader until the block ends."""
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("LOCK TABLE flows IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def waiting_in_postgres(conn: asyncpg.Connection[Any], n: int) -> None:
    """Until ``n`` queries wait on a lock (the requests reached PostgreSQL)."""
    deadline = time.monotonic() + 20
    while await conn.fetchval(WAITING_ON_A_LOCK) < n:
        assert time.monotonic() < deadline, "the requests never reached PostgreSQL"
        await asyncio.sleep(0.02)


async def a_flow(w: Wire) -> str:
    fid = str(uuid.uuid4())
    reply = await w.request("cmd.create", {**CREATE, "id": fid})
    assert reply["ok"], reply
    return fid


def ask(w: Wire, op: str, body: dict[str, Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(w.request(op, body))


async def test_a_slow_list_delays_no_other_request(
    make_daemon: Callable[..., DaemonProcess], nats_wire: Wire, database_url: str
) -> None:
    make_daemon()
    w = nats_wire
    fid = await a_flow(w)
    async with flows_locked(database_url) as lock:
        listing = ask(w, "list", {"limit": 1000})
        await waiting_in_postgres(lock, 1)  # the list is held inside PostgreSQL
        # served meanwhile: a request on another table is answered ...
        outcome = await asyncio.wait_for(w.request("outcome", {"command_id": "nope"}), 10)
        assert outcome == {"ok": True, "result": {"outcome": None, "first_use": None}}
        # ... and a get runs beside the list (it reached PostgreSQL: not queued behind it)
        getting = ask(w, "get", {"flow_id": fid})
        await waiting_in_postgres(lock, 2)
        assert not listing.done()
    listed, got = await asyncio.wait_for(asyncio.gather(listing, getting), 20)
    assert [f["id"] for f in listed["result"]["flows"]] == [fid]
    assert got["result"]["id"] == fid


async def test_beyond_the_bound_a_request_gets_busy_at_once(
    make_daemon: Callable[..., DaemonProcess], nats_wire: Wire, database_url: str
) -> None:
    d = make_daemon(FLOWD_API_CONCURRENCY=1)
    w = nats_wire
    fid = await a_flow(w)
    async with flows_locked(database_url) as lock:
        listing = ask(w, "list", {})
        await waiting_in_postgres(lock, 1)
        reply = await w.nc.request(
            w.s.api("get"), json.dumps({"flow_id": fid}).encode(), timeout=10
        )
        body = json.loads(reply.data)
        assert body["ok"] is False
        assert body["error"]["code"] == "busy"
        assert body["error"]["details"] == {"limit": 1}
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "busy"
        # FlowClient retries `busy` within its request timeout: answered once the list is
        client = FlowClient(w.nc, prefix=w.s.prefix, request_timeout=20)
        getting = asyncio.ensure_future(client.get(fid))
        await asyncio.sleep(0.3)
        assert not getting.done()
    assert (await asyncio.wait_for(getting, 20))["id"] == fid
    assert (await listing)["ok"]
    assert "flowd_api_busy_total" in d.metrics()
