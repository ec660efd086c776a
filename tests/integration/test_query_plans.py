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
