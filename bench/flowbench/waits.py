"""Scenario 6: the wait engine with many waiting flows.

Bulk: real waiting flows (create -> start -> set_waiting with a far-future timer, through
FlowManager on a PostgresFlowStore with the outbox on, so each has its wait_conditions row),
made concurrently in chunks before the daemon starts; the daemon then relays their events.
Then, with all of them waiting:

(a) timers: flows wait for timers due at known times spread over a few seconds;
    firing delay = the resumed event's ``cause.at`` - ``cause.due_at`` (when the engine
    claimed it), delivery delay = event received by the harness - due time;
(b) signals: flows wait for signal ``go``; the harness publishes ``P.cmd.<id>.signal``
    commands on a fixed schedule (open loop); latency = resumed event received - scheduled
    send time.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from flowbench import env, natsutil
from flowbench.context import Context
from flowbench.stats import rate, summary_ms
from flowd import CreateManagedInput, FlowManager
from flowd.bus.subjects import MSG_ID, Subjects
from flowd.store.postgres import PostgresFlowStore


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def _gather_chunks(n: int, chunk: int, one: Any) -> None:
    for lo in range(0, n, chunk):
        await asyncio.gather(*(one(i) for i in range(lo, min(n, lo + chunk))))


async def _running_flows(mgr: FlowManager, n: int, tag: str) -> list[UUID]:
    ids: list[UUID] = [UUID(int=0)] * n

    async def one(i: int) -> None:
        flow = await mgr.create_managed(
            CreateManagedInput(
                controller_id="bench-waits", goal=f"{tag} flow {i}", owner_session_key=tag
            )
        )
        await mgr.start_running(flow.id)
        ids[i] = flow.id

    await _gather_chunks(n, 200, one)
    return ids


async def bulk(mgr: FlowManager, n: int, chunk: int) -> dict[str, Any]:
    """``n`` flows waiting for timers 1-30 days away."""
    base = time.time() + 86400

    async def one(i: int) -> None:
        flow = await mgr.create_managed(
            CreateManagedInput(
                controller_id="bench-waits", goal=f"bulk flow {i}", owner_session_key=f"o{i % 100}"
            )
        )
        await mgr.start_running(flow.id)
        due = base + (i * 7919 % (29 * 86400))
        await mgr.set_waiting(flow.id, {"kind": "timer", "at": _iso(due)})

    started = time.perf_counter()
    await _gather_chunks(n, chunk, one)
    took = time.perf_counter() - started
    return {
        "flows": n,
        "seconds": round(took, 1),
        "flows_per_s": rate(n, took),
        "commits_per_s": rate(3 * n, took),
    }


async def timers(ctx: Context, mgr: FlowManager, nc: Any, prefix: str) -> dict[str, Any]:
    n, spread = ctx.sizes.waits_timers, ctx.sizes.waits_timer_spread
    ids = await _running_flows(mgr, n, "timer")
    wanted = {str(i) for i in ids}
    recorder = await natsutil.Recorder().start(nc, Subjects(prefix).events("*", "resumed"))
    try:
        t0 = time.time() + 1.0 + n / 200  # after every wait below is committed
        due = {fid: t0 + k * spread / n for k, fid in enumerate(ids)}

        async def wait(fid: UUID) -> None:
            await mgr.set_waiting(fid, {"kind": "timer", "at": _iso(due[fid])})

        await asyncio.gather(*(wait(fid) for fid in ids))
        setup_late = time.time() > t0
        await recorder.wait(n, timeout=spread + 60)
    finally:
        await recorder.stop()
    fire, delivered = [], []
    for m in recorder.messages:
        body = json.loads(m.data)
        if body["flow_id"] not in wanted:
            continue
        cause = body["payload"].get("cause") or {}
        due_at = datetime.fromisoformat(cause["due_at"]).timestamp()
        fire.append(datetime.fromisoformat(cause["at"]).timestamp() - due_at)
        delivered.append(m.at - due_at)
    return {
        "timers": n,
        "spread_seconds": spread,
        "fired": len(fire),
        "setup_finished_after_first_due": setup_late,
        "firing_delay": summary_ms(fire),
        "event_delivery_delay": summary_ms(delivered),
    }


async def signals(ctx: Context, mgr: FlowManager, nc: Any, prefix: str) -> dict[str, Any]:
    n, per_s = ctx.sizes.waits_signals, ctx.sizes.waits_signal_rate
    s = Subjects(prefix)
    ids = await _running_flows(mgr, n, "signal")
    await asyncio.gather(*(mgr.set_waiting(fid, {"kind": "signal", "name": "go"}) for fid in ids))
    recorder = await natsutil.Recorder().start(nc, s.events("*", "resumed"))
    js = nc.jetstream()
    scheduled: dict[str, float] = {}
    try:
        await asyncio.sleep(0.5)
        start = time.time() + 0.2
        futures = []
        for k, fid in enumerate(ids):
            at = start + k / per_s
            await asyncio.sleep(max(0.0, at - time.time()))
            cid = f"signal-{fid}"
            scheduled[cid] = at
            body = json.dumps({"name": "go", "payload": {"k": k}}).encode()
            futures.append(
                await js.publish_async(s.command(fid, "signal"), body, headers={MSG_ID: cid})
            )
        await asyncio.gather(*futures)
        await recorder.wait(n, timeout=60)
    finally:
        await recorder.stop()
    latencies = [
        m.at - scheduled[m.command_id] for m in recorder.messages if m.command_id in scheduled
    ]
    return {
        "signals": n,
        "rate_per_s": per_s,
        "resumed": len(latencies),
        "latency": summary_ms(latencies),
    }


async def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    dsn = await env.fresh_database(ctx.servers, "waits")
    # The harness's own connections skip the WAL flush wait: setup speed, not the measurement
    # (the daemon's connections keep the server's synchronous_commit).
    setup_dsn = dsn + ("&" if "?" in dsn else "?") + "synchronous_commit=off"
    store = await PostgresFlowStore.connect(
        setup_dsn, run_migrations=True, outbox=True, max_size=10
    )
    mgr = FlowManager(store)
    try:
        print(
            f"  bulk: {sz.waits_bulk} waiting flows (FlowManager, chunks of {sz.waits_bulk_chunk})"
        )
        made = await bulk(mgr, sz.waits_bulk, sz.waits_bulk_chunk)
        print(f"    {made['flows_per_s']} flows/s")
        async with ctx.daemon("waits", dsn) as (daemon, _), ctx.nats() as nc:
            started = time.perf_counter()
            expected = 3 * sz.waits_bulk
            evt = Subjects(daemon.prefix).evt_stream
            await natsutil.wait_for_count(nc, evt, expected, timeout=120 + expected / 200)
            relayed = time.perf_counter() - started
            conn = await asyncpg.connect(dsn)
            try:
                waiting = await conn.fetchval("SELECT count(*) FROM wait_conditions")
            finally:
                await conn.close()
            print(f"  {waiting} wait conditions; timers")
            timer = await timers(ctx, mgr, nc, daemon.prefix)
            print(f"    firing delay p50 {timer['firing_delay'].get('p50_ms')} ms")
            print("  signals")
            signal = await signals(ctx, mgr, nc, daemon.prefix)
            print(f"    latency p50 {signal['latency'].get('p50_ms')} ms")
            warnings = daemon.warnings()
    finally:
        await store.close()
    return {
        "bulk": made,
        "startup_relay": {
            "events": expected,
            "seconds_to_publish_backlog": round(relayed, 1),
            "events_per_s": rate(expected, relayed),
        },
        "wait_conditions_during_measurement": waiting,
        "timers": timer,
        "signals": signal,
        "daemon_warnings": warnings,
    }
