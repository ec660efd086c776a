"""Raw NATS helpers: stream state with server timestamps, event recording, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from flowd.bus.subjects import COMMAND_ID, Subjects


def parse_ts(value: str) -> float:
    """An RFC 3339 timestamp with up to nanoseconds (as nats-server writes them) -> epoch s."""
    head, _, frac = value.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


@dataclass(frozen=True)
class StreamState:
    messages: int
    last_ts: float | None  # server clock of the last stored message


async def stream_state(nc: Client, stream: str) -> StreamState:
    """Message count and last-message time, from the raw STREAM.INFO reply (nats-py's
    StreamState drops ``last_ts``)."""
    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
    state = json.loads(reply.data)["state"]
    last = state.get("last_ts")
    has_last = last and not last.startswith("0001")
    return StreamState(int(state["messages"]), parse_ts(last) if has_last else None)


@dataclass
class Progress:
    """(local time, messages) samples taken while waiting for a stream to fill."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def window_rate(self, base: int, expected: int, lo: float = 0.1, hi: float = 0.9) -> float:
        """Messages/s between ``lo`` and ``hi`` of the way to ``expected``: the sustained rate,
        without the ramp-up and the tail."""
        pts = [(t, n - base) for t, n in self.samples]
        a = next(((t, n) for t, n in pts if n >= lo * expected), None)
        b = next(((t, n) for t, n in pts if n >= hi * expected), None)
        if a is None or b is None or b[0] <= a[0]:
            return 0.0
        return round((b[1] - a[1]) / (b[0] - a[0]), 1)


async def wait_for_count(
    nc: Client,
    stream: str,
    target: int,
    *,
    timeout: float,
    every: float = 0.1,
    on_sample: Progress | None = None,
    tick: Callable[[], None] | None = None,
    stall: float = 60.0,
) -> StreamState:
    """Poll until ``stream`` holds ``target`` messages. TimeoutError after ``timeout``, or
    once the count has not moved for ``stall`` seconds."""
    deadline = time.monotonic() + timeout
    last_count, moved = -1, time.monotonic()
    while True:
        state = await stream_state(nc, stream)
        if state.messages != last_count:
            last_count, moved = state.messages, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise TimeoutError(f"{stream}: stalled at {state.messages} of {target} for {stall}s")
        if on_sample is not None:
            on_sample.samples.append((time.time(), state.messages))
        if tick is not None:
            tick()
        if state.messages >= target:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream}: {state.messages} of {target} messages in {timeout}s")
        await asyncio.sleep(every)


@dataclass
class Received:
    command_id: str | None
    at: float
    data: bytes
    subject: str


class Recorder:
    """A core-NATS subscription that timestamps every message on arrival."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._subs: list[object] = []

    async def start(self, nc: Client, *subjects: str) -> Recorder:
        for subject in subjects:
            self._subs.append(
                await nc.subscribe(
                    subject,
                    cb=self._on,
                    pending_msgs_limit=10_000_000,
                    pending_bytes_limit=4 * 1024**3,
                )
            )
        await nc.flush()
        return self

    async def _on(self, msg: Msg) -> None:
        cid = msg.headers.get(COMMAND_ID) if msg.headers else None
        self.messages.append(Received(cid, time.time(), msg.data, msg.subject))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()

    async def wait(self, count: int, timeout: float, start: int = 0) -> bool:
        """True once ``count`` messages arrived after index ``start``."""
        deadline = time.monotonic() + timeout
        while len(self.messages) - start < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


async def connect(url: str) -> Client:
    return await nats.connect(url, name="flowd-bench", max_reconnect_attempts=3)


async def delete_streams(nc: Client, prefix: str) -> None:
    s = Subjects(prefix)
    js = nc.jetstream()
    for name in (s.cmd_stream, s.obs_stream, s.evt_stream, s.wake_stream, s.dlq_stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)


def server_version(nc: Client) -> str:
    return str(nc.connected_server_version)
