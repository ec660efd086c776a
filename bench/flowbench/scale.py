"""Scenario 4: reads with many flows in the table.

The flows table is filled by SQL (``INSERT … SELECT generate_series``, every column of
migrations/0001_flows.sql) after the real migrations ran, then VACUUM ANALYZE. Then
``PostgresFlowStore.get``, ``list_flows(owner=…)`` and ``list_flows(status=…)`` (first page,
limit 100) are timed from Python, one call at a time, and the same SQL (imported from
flowd.store.postgres, so it cannot drift) is shown with EXPLAIN (ANALYZE, BUFFERS).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from flowbench import env
from flowbench.context import Context
from flowbench.stats import summary_ms
from flowd.core.status import FlowStatus
from flowd.store import postgres as sql
from flowd.store.postgres import PostgresFlowStore

# The cursor PostgresFlowStore.list_flows uses for a first page.
FIRST_PAGE = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))

# Status mix of a long-lived installation: most flows are over.
STATUS_CASE = """CASE
    WHEN g % 100 < 5 THEN 'created'  WHEN g % 100 < 30 THEN 'running'
    WHEN g % 100 < 40 THEN 'waiting' WHEN g % 100 < 90 THEN 'finished'
    WHEN g % 100 < 95 THEN 'failed'  ELSE 'cancelled' END"""

POPULATE = f"""
INSERT INTO flows (id, controller_id, goal, owner_session_key, requester_origin, sync_mode,
                   status, current_step, state_json, wait_json, cancel_requested_at, revision,
                   created_at, updated_at)
SELECT md5('flow-' || g)::uuid,
       'controller-' || (g % 50),
       'goal of flow ' || g || ': build, test and ship',
       'owner-' || (g % $3::int),
       CASE WHEN g % 7 = 0 THEN 'https://ci.example.com/jobs/' || g END,
       CASE WHEN g % 5 = 0 THEN 'mirrored' ELSE 'managed' END,
       s.status,
       'step-' || (g % 10),
       jsonb_build_object('progress', (g % 100) / 100.0, 'attempt', 1 + g % 3,
                          'labels', jsonb_build_array('bench', 'scale')),
       CASE WHEN s.status = 'waiting' THEN '{{"kind": "manual"}}'::jsonb END,
       NULL,
       CASE s.status WHEN 'created' THEN 0 WHEN 'running' THEN 2 ELSE 4 END,
       now() - (($2::int - g) * interval '30 seconds'),
       now() - (($2::int - g) * interval '30 seconds') + interval '10 minutes'
FROM generate_series($1::int, $2::int) AS g,
     LATERAL (SELECT {STATUS_CASE} AS status) AS s"""


async def populate(dsn: str, flows: int, owners: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        chunk = 100_000
        for lo in range(1, flows + 1, chunk):
            hi = min(flows, lo + chunk - 1)
            # $2 must be the total so created_at is the same function of g in every chunk
            await conn.execute(POPULATE.replace("($2::int - g)", f"({flows} - g)"), lo, hi, owners)
        filled = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute("VACUUM ANALYZE flows")
        analyzed = time.perf_counter() - started
        sizes: Any = await conn.fetchrow(
            "SELECT pg_size_pretty(pg_table_size('flows')) AS heap, "
            "pg_size_pretty(pg_indexes_size('flows')) AS indexes, "
            "(SELECT count(*) FROM flows) AS rows"
        )
        status_counts = {
            str(r["status"]): int(r["count"])
            for r in await conn.fetch("SELECT status, count(*) FROM flows GROUP BY 1 ORDER BY 1")
        }
    finally:
        await conn.close()
    return {
        "rows": sizes["rows"],
        "insert_seconds": round(filled, 1),
        "vacuum_analyze_seconds": round(analyzed, 1),
        "table_size": sizes["heap"],
        "indexes_size": sizes["indexes"],
        "owners": owners,
        "by_status": status_counts,
    }


async def timed(
    calls: int, warmup: int, call: Callable[[int], Awaitable[object]]
) -> dict[str, Any]:
    for i in range(warmup):
        await call(i)
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return summary_ms(samples)


async def explain(dsn: str, query: str, *args: Any) -> dict[str, list[str]]:
    """The plan for these values (custom), and the generic plan PostgreSQL may switch a
    prepared statement to after five executions (asyncpg prepares and reuses statements)."""
    conn = await asyncpg.connect(dsn)
    try:
        custom = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query, *args)
        await conn.execute(f"PREPARE bench_q AS {query}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        literals = ", ".join(_literal(a) for a in args)
        generic = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_q({literals})")
    finally:
        await conn.close()
    return {"custom": [r[0] for r in custom], "generic": [r[0] for r in generic]}


def _literal(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, datetime) and value.year == 1:
        return "'-infinity'"
    return "'" + str(value).replace("'", "''") + "'"


async def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    dsn = await env.fresh_database(ctx.servers, "scale")
    store = await PostgresFlowStore.connect(dsn, run_migrations=True, max_size=2)
    try:
        print(f"  populating {sz.scale_flows} flows")
        table = await populate(dsn, sz.scale_flows, sz.scale_owners)
        print(f"    {table['insert_seconds']} s insert, {table['vacuum_analyze_seconds']} s vacuum")
        rng = random.Random(4)
        ids = [
            uuid.UUID(_md5_uuid(rng.randint(1, sz.scale_flows)))
            for _ in range(sz.scale_calls + sz.scale_warmup)
        ]
        owners = [f"owner-{rng.randrange(sz.scale_owners)}" for _ in ids]
        statuses = [rng.choice(list(FlowStatus)) for _ in ids]

        async def get(i: int) -> object:
            flow = await store.get(ids[i])
            assert flow is not None
            return flow

        async def by_owner(i: int) -> object:
            return await store.list_flows(owner=owners[i], limit=100)

        async def by_status(i: int) -> object:
            return await store.list_flows(status=statuses[i], limit=100)

        n, w = sz.scale_calls, sz.scale_warmup
        timings = {
            "get": await timed(n, w, get),
            "list_by_owner": await timed(n, w, by_owner),
            "list_by_status": await timed(n, w, by_status),
        }
        for name, t in timings.items():
            print(f"    {name}: p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms")
        plans = {
            "get": await explain(dsn, sql.SELECT_FLOW, ids[0]),
            "list_by_owner": await explain(dsn, sql.LIST_BY_OWNER, owners[0], 100, *FIRST_PAGE),
            "list_by_status": await explain(
                dsn, sql.LIST_BY_STATUS, FlowStatus.RUNNING.value, 100, *FIRST_PAGE
            ),
        }
    finally:
        await store.close()
    return {
        "table": table,
        "calls_each": n,
        "warmup_calls_discarded": w,
        "how": "one call at a time through PostgresFlowStore (asyncpg pool), random ids / "
        "owners / statuses, first page, limit 100",
        "latency": timings,
        "explain_params": {"owner": owners[0], "status": "running", "limit": 100},
        "explain": plans,
    }


def _md5_uuid(g: int) -> str:
    import hashlib

    return hashlib.md5(f"flow-{g}".encode()).hexdigest()
