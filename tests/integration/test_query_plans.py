"""The wait engine's tick reads only due rows, however many flows wait (EXPLAIN ANALYZE)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from flowd.store import postgres

pytestmark = pytest.mark.postgres

WAITING, DUE = 50_000, 25


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_nodes(child))
    return out


async def test_claim_due_reads_only_due_rows(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO flows (id, controller_id, goal, owner_session_key, sync_mode, status,
                               revision, created_at, updated_at)
            SELECT gen_random_uuid(), 'c', 'g', 'o', 'managed', 'waiting', 2, now(), now()
            FROM generate_series(1, $1)""",
            WAITING,
        )
        # every flow waits on a timer; DUE of them are due, the rest in the far future
        await conn.execute(
            """
            INSERT INTO wait_conditions (flow_id, kind, due_at)
            SELECT id, 'timer', CASE WHEN row_number() OVER () <= $1
                                     THEN now() - interval '1 minute'
                                     ELSE now() + interval '1 day' END
            FROM flows""",
            DUE,
        )
        await conn.execute("ANALYZE")
        raw = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + postgres.CLAIM_DUE,
            await conn.fetchval("SELECT now()"),
            await conn.fetchval("SELECT now() + interval '30 seconds'"),
            256,
        )
        plan = json.loads(raw)[0]["Plan"]
        scans = [n for n in _nodes(plan) if n.get("Relation Name") == "wait_conditions"]
        due_scan = [n for n in scans if n.get("Index Name") == "wait_conditions_due_idx"]
        assert due_scan, json.dumps(plan, indent=1)
        assert all(n["Actual Rows"] <= DUE for n in due_scan)  # not 50,000
        assert not any(n["Node Type"] == "Seq Scan" for n in scans)
    finally:
        await conn.close()


BACKLOG, BLOCKED = 50_000, 100


async def test_next_outbox_batch_reads_a_batch_not_the_backlog(database_url: str) -> None:
    """The relay's next batch skips parked flows through the partial index on parked rows and
    reads the outbox in id order up to the batch size: not the whole backlog, with or
    without parked rows."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO outbox (topic, msg_id, body)
            SELECT 'evt.' || CASE WHEN n <= $2 THEN 'blocked' ELSE gen_random_uuid()::text END
                   || '.started', 'm' || n, '{}'
            FROM generate_series(1, $1) AS n""",
            BACKLOG,
            BLOCKED,
        )
        await conn.execute("ANALYZE outbox")
        for parked in (False, True):
            if parked:  # the first row of flow "blocked" is parked: its 99 others wait
                await conn.execute(
                    "UPDATE outbox SET parked_at = now(), parked_reason = 'x' "
                    "WHERE id = (SELECT min(id) FROM outbox)"
                )
            raw = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + postgres.NEXT_OUTBOX, [], 256
            )
            plan = json.loads(raw)[0]["Plan"]
            nodes = _nodes(plan)
            scans = [n for n in nodes if n.get("Relation Name") == "outbox"]
            assert not any(n["Node Type"] == "Seq Scan" for n in scans), json.dumps(plan, indent=1)
            main = [n for n in scans if n.get("Index Name") == "outbox_pkey"]
            assert main, json.dumps(plan, indent=1)
            assert all(n["Actual Rows"] <= 256 + BLOCKED for n in main)  # not 50,000
            rows = await conn.fetch(postgres.NEXT_OUTBOX, [], 256)
            assert len(rows) == 256
            assert any(r["topic"] == "evt.blocked.started" for r in rows) is not parked
    finally:
        await conn.close()
