"""Producer processes: publish prepared JetStream messages, open loop.

Each producer is its own process (``spawn``), so publishing does not share a GIL with the
harness. Two modes:

- saturation (``rate=None``): publish everything as fast as the async-publish window allows;
- paced (``rate=r``): message ``i`` is *scheduled* at ``t0 + offset + i / r`` and sent then (or
  at once, in a burst, if the producer fell behind). Nothing waits for replies. With
  ``stamp_ids`` the scheduled time (ns) is appended to the command id (``<id>@<ns>``) so the
  harness can measure from the scheduled time: a late send counts against latency
  (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from flowbench.quiet import no_gc_pauses
from flowd.bus.subjects import MSG_ID

Message = tuple[str, bytes, str]  # subject, body, command id


@dataclass(frozen=True)
class Job:
    nats_url: str
    messages: list[Message]
    rate: float | None = None  # messages/s of this producer; None: as fast as possible
    offset: float = 0.0  # seconds added to this producer's schedule
    stamp_ids: bool = False
    max_pending: int = 20_000  # unacknowledged async publishes in flight


@dataclass
class ProducerGroup:
    """Start producers, release them together at ``t0``, collect their reports."""

    jobs: list[Job]
    _procs: list[Any] = field(default_factory=list)
    _pipes: list[multiprocessing.connection.Connection] = field(default_factory=list)

    async def start(self, timeout: float = 60) -> None:
        ctx = multiprocessing.get_context("spawn")
        for job in self.jobs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_main, args=(job, child), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._pipes.append(parent)
        for pipe in self._pipes:
            if not await asyncio.to_thread(pipe.poll, timeout):
                raise TimeoutError("producer did not connect")
            if (msg := pipe.recv()) != "ready":
                raise RuntimeError(f"producer failed: {msg}")

    def go(self, delay: float = 0.2) -> float:
        """Release every producer at ``t0 = now + delay`` (wall clock); returns t0."""
        t0 = time.time() + delay
        for pipe in self._pipes:
            pipe.send(t0)
        return t0

    async def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for pipe in self._pipes:
            if not await asyncio.to_thread(pipe.poll, timeout):
                raise TimeoutError("producer did not finish")
            report = pipe.recv()
            if "error" in report:
                raise RuntimeError(f"producer failed: {report['error']}")
            out.append(report)
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
        return out

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()


def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One line about all producers: when they sent, how far they fell behind, their CPU."""
    first = min(r["first_send"] for r in reports)
    last = max(r["last_send"] for r in reports)
    sent = sum(r["sent"] for r in reports)
    return {
        "producers": len(reports),
        "sent": sent,
        "first_send": first,
        "last_send": last,
        "publish_seconds": round(last - first, 3),
        "publish_rate": round(sent / (last - first), 1) if last > first else None,
        "max_behind_schedule_ms": round(max(r["max_behind_s"] for r in reports) * 1000, 1),
        "ack_errors": sum(r["ack_errors"] for r in reports),
        "cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
        "event_loop": reports[0].get("event_loop"),
    }


def loop_factory() -> Any:
    """uvloop when installed: less CPU per publish, so the producers take less of the
    machine from the daemon (they share its cores)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _main(job: Job, pipe: multiprocessing.connection.Connection) -> None:
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            report = runner.run(_produce(job, pipe))
    except Exception as exc:  # report it to the parent instead of dying silently
        report = {"error": repr(exc)}
    pipe.send(report)


async def _produce(job: Job, pipe: multiprocessing.connection.Connection) -> dict[str, Any]:
    nc = await nats.connect(job.nats_url, name="flowd-bench-producer")
    js = nc.jetstream(publish_async_max_pending=job.max_pending)
    cpu_ready = _cpu()  # start-up (imports, connect) is not part of the measurement
    pipe.send("ready")
    t0: float = await asyncio.to_thread(pipe.recv)
    with no_gc_pauses():
        return await _send(job, nc, js, t0, cpu_ready)


async def _send(
    job: Job, nc: Client, js: JetStreamContext, t0: float, cpu_ready: float
) -> dict[str, Any]:
    futures: list[asyncio.Future[PubAck]] = []
    start = t0 + job.offset
    await asyncio.sleep(max(0.0, start - time.time()))
    first_send = time.time()
    behind = 0.0
    interval = 1.0 / job.rate if job.rate else 0.0
    i, n = 0, len(job.messages)
    while i < n:
        now = time.time()
        while i < n and (job.rate is None or start + i * interval <= now):
            subject, body, cid = job.messages[i]
            if job.rate is not None:
                scheduled = start + i * interval
                behind = max(behind, now - scheduled)
                if job.stamp_ids:
                    cid = f"{cid}@{int(scheduled * 1e9)}"
            futures.append(await js.publish_async(subject, body, headers={MSG_ID: cid}))
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start + i * interval - time.time()))
    last_send = time.time()
    await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=120)
    errors = sum(1 for f in futures if f.cancelled() or f.exception() is not None)
    await nc.drain()
    return {
        "sent": n,
        "first_send": first_send,
        "last_send": last_send,
        "max_behind_s": behind,
        "ack_errors": errors,
        "cpu_s": _cpu() - cpu_ready,
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
