"""Scenario 2b: raw JetStream, no flowd: how fast this NATS takes and hands out messages.

For each message size (flowd's mean command, and its mean event, measured in scenario 1 when
it ran): publish N messages with async publish to a file-storage stream, then drain them with
a durable pull consumer, fetching batches of 128 (flowd's FLOWD_BATCH) and acking each message
(as flowd does). Single process, one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import api

from flowbench.context import Context
from flowbench.stats import rate

BATCH = 128


async def one_size(nc: Client, size: int, count: int) -> dict[str, Any]:
    js = nc.jetstream(publish_async_max_pending=4000)
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"BENCHRAW_{tag}", f"benchraw.{tag}"
    await js.add_stream(
        api.StreamConfig(name=stream, subjects=[f"{subject}.>"], storage=api.StorageType.FILE)
    )
    try:
        body = os.urandom(size // 2).hex().encode()[:size]
        started = time.perf_counter()
        futures = [
            await js.publish_async(
                f"{subject}.{i % 64}", body, headers={"Nats-Msg-Id": f"{tag}-{i}"}
            )
            for i in range(count)
        ]
        await asyncio.gather(*futures)
        published = time.perf_counter() - started
        sub = await js.pull_subscribe(f"{subject}.>", durable="bench", stream=stream)
        consumed_n = 0
        started = time.perf_counter()
        while consumed_n < count:
            try:
                msgs = await sub.fetch(BATCH, timeout=2)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                await msg.ack()
            consumed_n += len(msgs)
        await nc.flush()
        consumed = time.perf_counter() - started
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    return {
        "message_bytes": size,
        "messages": count,
        "publish_per_s": rate(count, published),
        "publish_mb_per_s": round(count * size / published / 1e6, 2),
        "consume_ack_per_s": rate(consumed_n, consumed),
        "consumed": consumed_n,
        "publish_then_consume_per_s": rate(count, published + consumed),
    }


async def run(ctx: Context) -> dict[str, Any]:
    sizes = {
        "command": int(ctx.shared.get("command_bytes", 300)),
        "event": int(ctx.shared.get("event_bytes", 1000)),
    }
    out: dict[str, Any] = {
        "method": f"publish_async x N, then pull consumer fetch({BATCH}) + ack each; one "
        "process, one connection",
        "sizes_from": "scenario 1" if "command_bytes" in ctx.shared else "defaults",
    }
    async with ctx.nats() as nc:
        for name, size in sizes.items():
            res = await one_size(nc, size, ctx.sizes.jetstream_messages)
            print(
                f"  {name} ({size} B): publish {res['publish_per_s']}/s, "
                f"consume+ack {res['consume_ack_per_s']}/s"
            )
            out[name] = res
    return out
