"""Scenario 3: ingest of step observations for mirrored flows, delivered out of order.

Each mirrored flow gets ``runs`` runs, each reported twice (``running``, then ``succeeded``);
every flow's reports are shuffled, so about half of the runs report ``succeeded`` before
``running`` (flowd must keep the terminal status: the late ``running`` is ``unchanged``).
Flows are interleaved across the stream; two producer processes publish as fast as they can.
Throughput = observations / (last outcome stored in the events stream - first publish).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any

import asyncpg

from flowbench import natsutil
from flowbench.context import Context
from flowbench.producers import Job, Message, ProducerGroup, summarize
from flowbench.stats import rate
from flowd.bus.subjects import MSG_ID, Subjects


def observations(s: Subjects, flows: list[uuid.UUID], runs: int, seed: int) -> list[Message]:
    """Every flow's 2 x runs reports, shuffled per flow, then interleaved across flows."""
    rng = random.Random(seed)
    per_flow: list[list[Message]] = []
    for fid in flows:
        msgs = []
        for r in range(runs):
            for status in ("running", "succeeded"):
                body = {
                    "run_id": f"run-{r}",
                    "task": "backup" if r % 2 else "sync",
                    "status": status,
                    "child_session_key": f"child-{r}",
                    "result_json": {"bytes": 1024 * r} if status == "succeeded" else None,
                }
                data = json.dumps(body, separators=(",", ":")).encode()
                msgs.append((s.observation(fid), data, f"obs-{fid}-{r}-{status}"))
        rng.shuffle(msgs)
        per_flow.append(msgs)
    out: list[Message] = []
    for i in range(2 * runs):
        for msgs in per_flow:
            out.append(msgs[i])
    return out


def out_of_order_runs(msgs: list[Message]) -> int:
    """Runs whose ``succeeded`` is published before their ``running``."""
    seen_succeeded: set[str] = set()
    count = 0
    for _, _, cid in msgs:
        key, _, status = cid.rpartition("-")
        if status == "succeeded":
            seen_succeeded.add(key)
        elif key in seen_succeeded:
            count += 1
    return count


async def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    async with ctx.daemon("ingest") as (daemon, dsn), ctx.nats() as nc:
        s = Subjects(daemon.prefix)
        js = nc.jetstream()
        flows = [uuid.uuid4() for _ in range(sz.ingest_flows)]
        for n, fid in enumerate(flows):
            body = {
                "id": str(fid),
                "controller_id": "bench-ingest",
                "goal": f"mirror of external job {n}",
                "owner_session_key": f"owner-{n % 100}",
                "sync_mode": "mirrored",
            }
            await js.publish_async(
                s.create(), json.dumps(body).encode(), headers={MSG_ID: f"create-{fid}"}
            )
        await js.publish_async_completed()
        await natsutil.wait_for_count(nc, s.evt_stream, 2 * len(flows), timeout=120)
        base = 2 * len(flows)
        producers = sz.producers
        batches = [
            observations(s, flows[p::producers], sz.ingest_runs, seed=p) for p in range(producers)
        ]
        expected = sum(len(b) for b in batches)
        late = sum(out_of_order_runs(b) for b in batches)
        print(f"  {len(flows)} flows x {sz.ingest_runs} runs x 2 = {expected} observations")
        group = ProducerGroup([Job(ctx.servers.nats_url, b) for b in batches])
        await group.start()
        progress = natsutil.Progress()
        group.go()
        try:
            state = await natsutil.wait_for_count(
                nc,
                s.evt_stream,
                base + expected,
                timeout=120 + expected / 30,
                every=0.2,
                on_sample=progress,
                stall=30,
            )
        except TimeoutError as exc:
            group.kill()
            raise await ctx.stalled(daemon, nc, str(exc)) from exc
        done_local = time.time()
        reports = summarize(await group.results(timeout=120))
        end = state.last_ts if state.last_ts and state.last_ts < done_local + 1 else done_local
        wall = end - reports["first_send"]
        info = await js.stream_info(s.evt_stream, subjects_filter=s.out_all)
        unchanged = sum((info.state.subjects or {}).values())
        conn = await asyncpg.connect(dsn)
        try:
            steps = {
                str(r["status"]): int(r["count"])
                for r in await conn.fetch("SELECT status, count(*) FROM flow_steps GROUP BY 1")
            }
        finally:
            await conn.close()
        result = {
            "flows": len(flows),
            "runs_per_flow": sz.ingest_runs,
            "observations": expected,
            "runs_with_succeeded_first": late,
            "wall_seconds": round(wall, 3),
            "observations_per_s": rate(expected, wall),
            "sustained_10_90_per_s": progress.window_rate(base, expected),
            "outcomes": {"step_observed_events": expected - unchanged, "unchanged": unchanged},
            "check_steps_by_status": steps,
            "check_all_runs_succeeded": steps.get("succeeded") == len(flows) * sz.ingest_runs,
            "producers": reports,
            "daemon_warnings": daemon.warnings(),
        }
        print(f"    {result['observations_per_s']} observations/s; {unchanged} unchanged")
        return result
