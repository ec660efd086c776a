"""Producer processes: publish prepared JetStream messages, open loop.

Each producer is its own process (``spawn``), so publishing does not share a GIL with the
harness, and speaks the NATS protocol itself over a blocking socket (``_Wire``): every
message is a JetStream publish with a reply subject, whose acks are counted. Two modes:

- saturation (``rate=None``): publish everything as fast as the window of ``max_pending``
  unacknowledged messages allows;
- paced (``rate=r``): message ``i`` is *scheduled* at ``t0 + offset + i / r`` and sent then (or
  at once, in a burst, if the producer fell behind). Nothing waits for replies. With
  ``stamp_ids`` the scheduled time (ns) is appended to the command id (``<id>@<ns>``) so the
  harness can measure from the scheduled time: a late send counts against latency
  (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import resource
import select
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from flowbench.quiet import no_gc_pauses
from flowd.bus.subjects import MSG_ID

Message = tuple[str, bytes, str]  # subject, body, command id
CHUNK = 512  # messages per write when publishing as fast as possible
ACK_READS = 0.05  # seconds between reads of the acks while paced


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
        "client": reports[0].get("client"),
    }


class _Wire:
    """Just enough of the NATS client protocol to publish with a reply subject and count
    JetStream's acks: a blocking socket, no client library. nats-py spends ~0.1 CPU-ms per
    paced publish (a timer, its flusher task, a future per ack); this spends a few µs, so
    the load generator takes little of the cores it shares with the daemon and servers."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url if "//" in url else f"nats://{url}")
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.acks = 0
        self.errors: list[str] = []
        self.inbox = f"_INBOX.bench.{uuid.uuid4().hex}"
        self._line()  # INFO
        options: dict[str, Any] = {"verbose": False, "pedantic": False, "headers": True}
        options.update(name="flowd-bench-producer", protocol=1, lang="python-raw")
        if parts.username:
            options.update(user=urllib.parse.unquote(parts.username))
            options.update(**{"pass": urllib.parse.unquote(parts.password or "")})
        self.sock.sendall(
            f"CONNECT {json.dumps(options)}\r\nSUB {self.inbox} 1\r\nPING\r\n".encode()
        )
        while (line := self._line()) != b"PONG":
            if line.startswith(b"-ERR"):
                raise ConnectionError(line.decode())

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._recv(block=True)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _recv(self, block: bool) -> None:
        data = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        if not data:
            raise ConnectionError("NATS closed the connection")
        self.buf += data

    def frame(self, subject: str, body: bytes, msg_id: str) -> bytes:
        head = f"NATS/1.0\r\n{MSG_ID}: {msg_id}\r\n\r\n".encode()
        size = len(head) + len(body)
        return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            self.inbox.encode(),
            len(head),
            size,
            head,
            body,
        )

    def poll(self, timeout: float) -> None:
        """Read what the server sent within ``timeout`` s: count acks, answer pings."""
        if select.select([self.sock], [], [], max(0.0, timeout))[0]:
            with contextlib.suppress(BlockingIOError):
                self._recv(block=False)
        while True:
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            if line.startswith((b"MSG ", b"HMSG ")):
                size = int(line.rsplit(b" ", 1)[1])
                if len(rest) < size + 2:
                    return  # the payload is still on its way
                payload, rest = rest[:size], rest[size + 2 :]
                self.acks += 1
                if b'"error"' in payload:
                    self.errors.append(payload.decode(errors="replace")[:300])
            elif line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                self.errors.append(line.decode(errors="replace"))
            self.buf = rest


def _main(job: Job, pipe: multiprocessing.connection.Connection) -> None:
    try:
        wire = _Wire(job.nats_url)
        cpu_ready = _cpu()  # start-up (imports, connect) is not part of the measurement
        pipe.send("ready")
        t0: float = pipe.recv()
        with no_gc_pauses():
            report = _send(job, wire, t0, cpu_ready)
        wire.sock.close()
    except Exception as exc:  # report it to the parent instead of dying silently
        report = {"error": repr(exc)}
    pipe.send(report)


def _send(job: Job, wire: _Wire, t0: float, cpu_ready: float) -> dict[str, Any]:
    """Paced: every message due by now goes out in one write, then sleep (reading acks)
    until the next is due. Saturation: writes of up to ``CHUNK`` messages while fewer than
    ``max_pending`` are unacknowledged."""
    start = t0 + job.offset
    time.sleep(max(0.0, start - time.time()))
    first_send = time.time()
    behind = 0.0
    interval = 1.0 / job.rate if job.rate else 0.0
    i, n = 0, len(job.messages)
    read_at = 0.0
    while i < n:
        now = time.time()
        if job.rate is None:
            due = min(n, i + CHUNK, wire.acks + job.max_pending)
        else:
            due = min(n, int((now - start) / interval) + 1)
        frames = []
        for j in range(i, due):
            subject, body, cid = job.messages[j]
            if job.rate is not None:
                scheduled = start + j * interval
                behind = max(behind, now - scheduled)
                if job.stamp_ids:
                    cid = f"{cid}@{int(scheduled * 1e9)}"
            frames.append(wire.frame(subject, body, cid))
        if frames:
            wire.sock.sendall(b"".join(frames))
            i = due
        if i < n and job.rate is None:
            wire.poll(0.0 if frames else 0.05)  # the window is full: wait for acks
        elif i < n:
            # Acks are read now and then (they wait in the socket meanwhile), not waited
            # for: one wake-up and one write per due time.
            if now >= read_at:
                wire.poll(0.0)
                read_at = now + ACK_READS
            time.sleep(max(0.0, start + i * interval - time.time()))
    last_send = time.time()
    deadline = last_send + 120
    while wire.acks + len(wire.errors) < n and time.time() < deadline:
        wire.poll(0.1)
    return {
        "sent": n,
        "first_send": first_send,
        "last_send": last_send,
        "max_behind_s": behind,
        "ack_errors": len(wire.errors) + max(0, n - wire.acks - len(wire.errors)),
        "ack_error_sample": wire.errors[:3],
        "cpu_s": _cpu() - cpu_ready,
        "client": "raw NATS protocol over a blocking socket (bench/flowbench/producers.py)",
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
