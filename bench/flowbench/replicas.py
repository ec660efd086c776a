"""Scenario 7 (scale-out): end-to-end throughput with 1, 2 and 3 flowd replicas on a
three-node JetStream cluster (R3 streams, FLOWD_PARTITIONS=6), one PostgreSQL.

Every party runs on this one machine (three nats-server processes, PostgreSQL, the replicas
and the harness share its cores), so this measures what partitioned scale-out costs and
whether it holds order under sharing — not what three machines would give.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats

from flowbench import env, natsutil
from flowbench.context import Context
from flowbench.e2e import VERBS, _body
from flowbench.flowd import Flowd
from flowd.bus.subjects import Subjects
from flowd.embedded import nats_cluster

PARTITIONS = 6


async def _one(ctx: Context, urls: str, replicas: int, flows: int) -> dict[str, Any]:
    dsn = await env.fresh_database(ctx.servers, f"replicas{replicas}")
    prefix = env.unique_prefix(f"rep{replicas}")
    s = Subjects(prefix)
    daemons = [
        Flowd(
            urls,
            dsn,
            prefix,
            ctx.out / "logs" / f"flowd-replicas{replicas}-{i}.log",
            FLOWD_PARTITIONS=str(PARTITIONS),
            FLOWD_STREAM_REPLICAS="3",
        )
        for i in range(replicas)
    ]
    for d in daemons:
        d.start()
    nc = await nats.connect(urls.split(","))
    try:
        for d in daemons:
            await asyncio.to_thread(d.wait_ready, 120)
        await asyncio.sleep(2)  # let the replicas spread the partitions between them
        js = nc.jetstream()
        ids = [uuid.uuid4() for _ in range(flows)]
        started = time.monotonic()
        pending = []
        for verb in VERBS:  # all creates, then all starts, …: each flow's order is kept
            for n, fid in enumerate(ids):
                body = json.dumps(_body(verb, fid, n)).encode()
                pending.append(
                    await js.publish_async(
                        s.command(fid, verb), body, headers={"Nats-Msg-Id": uuid.uuid4().hex}
                    )
                )
        await asyncio.gather(*pending)
        state = await natsutil.wait_for_count(
            nc, s.evt_stream, flows * len(VERBS), timeout=1200, stall=120
        )
        seconds = time.monotonic() - started
        outcomes = await natsutil.stream_state(nc, s.evt_stream)
        return {
            "replicas": replicas,
            "flows": flows,
            "commands": flows * len(VERBS),
            "events": state.messages,
            "seconds": round(seconds, 3),
            "commands_per_s": round(flows * len(VERBS) / seconds, 1),
            "events_stream_messages": outcomes.messages,
        }
    finally:
        for d in daemons:
            await asyncio.to_thread(d.stop)
        await natsutil.delete_streams(nc, prefix)
        await nc.close()


async def run(ctx: Context) -> dict[str, Any]:
    flows = max(50, ctx.sizes.e2e_flows // 4)
    with tempfile.TemporaryDirectory(prefix="flowd-cluster-") as tmp:
        nodes = nats_cluster(Path(tmp))
        for node in nodes:
            await asyncio.to_thread(node.start)
        try:
            runs = [await _one(ctx, ",".join(n.url for n in nodes), r, flows) for r in (1, 2, 3)]
        finally:
            for node in nodes:
                await asyncio.to_thread(node.stop)
    return {"cluster_nodes": 3, "stream_replicas": 3, "partitions": PARTITIONS, "runs": runs}
