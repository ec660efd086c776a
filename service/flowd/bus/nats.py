"""NatsBus: the daemon's one door to NATS (connect, streams and consumers, fetch, publish).

The only daemon-side module that imports ``nats``. NATS errors that mean "try again later"
surface as ``BusUnavailable``; everything above this module sees flowd types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from flowd.bus import subjects as names
from flowd.bus.subjects import Subjects
from flowd.core import jsontext
from flowd.core.outbox import OutboxMessage

Message = Msg
log = structlog.get_logger("flowd.bus")

#: Seconds beyond a consumer's ack wait after which JetStream surely redelivers what a
#: process had been delivered and did not settle (the server's timer may fire a little late).
REDELIVERY_GRACE = 5.0

#: How a consumer's messages are kept from overtaking earlier ones still owed (``_Pull``):
#: a jump in its delivery sequence means deliveries were lost on "any" jump (this process is
#: the consumer's only puller: a partition) or on a jump "across_reconnect" (others may pull
#: the same consumer, so a jump alone proves nothing); "ignore": order does not matter
#: (creates without a flow id, wake messages), neither lost nor owed messages are waited for.
Gaps = Literal["any", "across_reconnect", "ignore"]


class BusUnavailable(Exception):
    """NATS could not be reached or did not answer in time; retry later."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Stream and consumer settings that are configuration, not constants."""

    replicas: int = 1
    commands_max_age: float = 7 * 86400
    events_max_age: float = 7 * 86400
    events_max_bytes: int = -1
    dlq_max_age: float = 30 * 86400
    duplicate_window: float = 300
    ack_wait: float = 30
    max_deliver: int = 20
    max_ack_pending: int = 1024


async def connect(
    url: str,
    *,
    name: str = "flowd",
    creds: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Client:
    """A NATS connection that reconnects forever (the daemon must outlive NATS outages)."""
    tls: ssl.SSLContext | None = None
    if tls_ca or tls_cert:
        tls = ssl.create_default_context(cafile=tls_ca)
        if tls_cert:
            tls.load_cert_chain(tls_cert, tls_key)
    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
    }
    if creds:
        options["user_credentials"] = creds
    if tls is not None:
        options["tls"] = tls
    try:
        return await nats.connect(**options)
    except (OSError, nats.errors.Error) as exc:
        raise BusUnavailable(f"cannot connect to NATS at {url}: {exc}") from exc


class NatsBus:
    """JetStream streams, pull consumers and publishing for one subject prefix."""

    def __init__(self, nc: Client, subjects: Subjects, limits: StreamLimits) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=5)
        self.subjects = subjects
        self.limits = limits
        self._subs: dict[str, _Pull] = {}
        self._streams: dict[str, str] = {}

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure(self) -> NatsBus:
        """Create or update the streams and durable consumers (idempotent); returns self."""
        s, lim = self.subjects, self.limits
        transform = {
            kind: api.SubjectTransform(*s.partition_transform(kind)) if s.partitioned else None
            for kind in ("cmd", "obs")
        }

        def config_of(
            name: str, subjects: list[str], max_age: float, **extra: Any
        ) -> api.StreamConfig:
            return api.StreamConfig(
                name=name,
                subjects=subjects,
                max_age=max_age,
                num_replicas=lim.replicas,
                storage=api.StorageType.FILE,
                **extra,
            )

        dedup = {"duplicate_window": lim.duplicate_window}
        streams = [
            config_of(
                s.cmd_stream,
                [s.cmd_all],
                lim.commands_max_age,
                subject_transform=transform["cmd"],
                **dedup,
            ),
            config_of(
                s.obs_stream,
                [s.obs_all],
                lim.commands_max_age,
                subject_transform=transform["obs"],
                **dedup,
            ),
            config_of(
                s.evt_stream,
                [s.evt_all, s.out_all],
                lim.events_max_age,
                max_bytes=lim.events_max_bytes,
                **dedup,
            ),
            config_of(s.wake_stream, [s.wake_all], lim.commands_max_age, **dedup),
            config_of(s.dlq_stream, [s.dlq_all], lim.dlq_max_age),
        ]
        async with self._translated():
            for config in streams:
                try:
                    await self.js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    await self.js.update_stream(config)
            consumers: list[tuple[str, str, str | None, Gaps]] = [
                (s.wake_stream, s.wake_consumer, None, "ignore")
            ]
            if s.partitioned:
                consumers.append((s.cmd_stream, s.create_consumer, s.create(), "ignore"))
                for p in range(s.partitions):
                    for kind, stream in (("cmd", s.cmd_stream), ("obs", s.obs_stream)):
                        where = s.partition_filter(kind, p)
                        consumers.append((stream, s.consumer(kind, p), where, "any"))
            else:
                consumers.append((s.cmd_stream, s.cmd_consumer, None, "across_reconnect"))
                consumers.append((s.obs_stream, s.obs_consumer, None, "across_reconnect"))
            for stream, durable, subject_filter, gaps in consumers:
                consumer = api.ConsumerConfig(
                    durable_name=durable,
                    filter_subject=subject_filter,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=lim.ack_wait,
                    max_deliver=lim.max_deliver,
                    max_ack_pending=lim.max_ack_pending,
                    max_waiting=512,
                )
                await self.js.add_consumer(stream, consumer)
                if durable not in self._subs:
                    pull = _Pull(self.nc, stream, durable, gaps=gaps, ack_wait=lim.ack_wait)
                    self._subs[durable] = await pull.start()
                self._streams[durable] = stream
        return self

    async def fetch(self, durable: str, batch: int, wait: float) -> list[Msg]:
        """The messages that have arrived, as soon as there is one (at most ``batch`` are
        asked for); ``[]`` when none arrives within ``wait`` seconds."""
        try:
            return await self._subs[durable].fetch(batch, wait)
        except (nats.errors.Error, OSError) as exc:
            raise BusUnavailable(str(exc)) from exc

    async def relinquish(self, durable: str, held: Sequence[Msg]) -> None:
        """Stop pulling ``durable``: once its open pull request has expired (nothing more
        can arrive here) nak ``held`` (fetched, not settled) and what arrived but was never
        fetched, together in stream order. Whoever pulls next (another replica, after a
        partition moved) gets them first and in that order: a nak'd message is redelivered
        at once, and a message nak'd while a pull request is open could come straight back
        behind a later one of its flow."""
        await self._subs[durable].relinquish(held)

    async def expect_redeliveries(self, durable: str) -> int:
        """Before pulling ``durable`` (just taken over, or just started after a crash): its
        messages delivered and not yet acked, which another process had, will be taken before
        anything newer (anything newer arriving first is left for redelivery, and pulling
        pauses for the ack wait). Returns how many that is."""
        async with self._translated():
            info = await self.js.consumer_info(self._streams[durable], durable)
        owed = int(info.num_ack_pending or 0)
        through = int(info.delivered.stream_seq or 0) if info.delivered else 0
        self._subs[durable].expect_redeliveries(through, owed)
        return owed

    async def pending(self, durable: str) -> tuple[int, int]:
        """(messages not yet delivered, delivered but unacked) of a consumer."""
        async with self._translated():
            info = await self.js.consumer_info(self._streams[durable], durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def publish_outbox(self, batch: Sequence[OutboxMessage]) -> None:
        """Publish ``batch`` in order, pipelined, and return once JetStream acked all."""
        async with self._translated():
            futures = []
            for m in batch:
                headers = {names.MSG_ID: m.msg_id}
                if m.command_id is not None:
                    headers[names.COMMAND_ID] = m.command_id
                body = m.text().encode()
                futures.append(
                    await self.js.publish_async(self.subjects.topic(m.topic), body, headers=headers)
                )
            await asyncio.wait_for(asyncio.gather(*futures), timeout=10)

    async def dead_letter(self, msg: Msg, source: str, reason: str, command_id: str) -> None:
        """Copy ``msg`` to ``<prefix>.dlq.<source>`` with why, then the caller acks it."""
        meta = msg.metadata
        headers = {
            names.MSG_ID: f"dlq-{command_id}",
            names.DLQ_REASON: reason[:1000],
            names.DLQ_SUBJECT: msg.subject,
            names.DLQ_STREAM_SEQ: str(meta.sequence.stream),
            names.DLQ_DELIVERED: str(meta.num_delivered),
        }
        async with self._translated():
            await self.js.publish(self.subjects.dead_letter(source), msg.data, headers=headers)

    async def nudge_relay(self) -> None:
        """Tell the replica holding the relay lock that this one committed outbox rows."""
        async with self._translated():
            await self.nc.publish(self.subjects.relay_nudge, b"")

    async def on_relay_nudge(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on every replica's ``nudge_relay`` (this one's included)."""

        async def nudged(msg: Msg) -> None:
            callback()

        async with self._translated():
            await self.nc.subscribe(self.subjects.relay_nudge, cb=nudged)

    async def serve(self, subject: str, handler: Callable[[Msg], Awaitable[None]]) -> None:
        """Serve requests on ``subject`` in the shared queue group."""
        async with self._translated():
            await self.nc.subscribe(subject, queue=self.subjects.api_queue, cb=handler)

    async def listen(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """Subscribe (core NATS, queue group) and return the function that unsubscribes."""
        async with self._translated():
            sub = await self.nc.subscribe(subject, queue=queue, cb=handler)
        return sub.unsubscribe

    async def reply(self, msg: Msg, data: bytes, headers: dict[str, str] | None) -> None:
        """Answer a request (best effort: a requester that left gets nothing)."""
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.nc.publish(msg.reply, data, headers=headers)

    async def close(self) -> None:
        """Stop the pull subscriptions, drain the rest (API replies, publishes), close."""
        for sub in self._subs.values():
            with contextlib.suppress(Exception):
                await sub.close()
        self._subs.clear()
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except Exception:  # a drain that cannot finish must not keep the process alive
            with contextlib.suppress(Exception):
                await self.nc.close()

    @contextlib.asynccontextmanager
    async def _translated(self) -> Any:
        try:
            yield
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"NATS: {exc!r}") from exc


class _Pull:
    """A durable pull consumer, pulled continuously, whose deliveries arrive in order or wait.

    nats-py's ``fetch(n)`` waits, once nothing is queued, until all ``n`` messages arrived or
    its timeout passed: under light load a command would sit in the client for up to the
    whole timeout. Here one pull request (``batch``, expiring after ``wait``) stays open on
    the server and every ``fetch`` returns what has arrived as soon as there is something;
    a new request is sent only when the last one is used up or expired. The server never
    delivers more than the consumer's ``max_ack_pending`` unacked messages, whatever is asked.

    Lost deliveries. A message the server delivered can be lost on the way (the NATS node it
    travelled through died, the connection dropped). The server counts it delivered and sends
    it again only after its ack wait, so a later message of the same flow, delivered in the
    meantime, would overtake it. Every delivery carries the consumer's delivery sequence, one
    more than the one before; a jump (see ``Gaps``) means deliveries were lost. Then what
    came after the jump is dropped unsettled and pulling pauses until everything delivered so
    far has passed its ack wait: the server then redelivers it all, the lost ones first, in
    the order it first delivered them.

    Owed redeliveries. Taking a consumer over (after a crash, or a partition that moved), the
    messages the other process had and never settled come back only when their ack wait runs
    out, and the server hands out newer ones meanwhile. ``expect_redeliveries`` says how many
    are owed, up to which stream sequence; a newer message arriving before they all came back
    is handled like a lost delivery: dropped, and a pause.
    """

    def __init__(self, nc: Client, stream: str, durable: str, *, gaps: Gaps, ack_wait: float):
        self._nc = nc
        # The default API prefix, as NatsBus's nc.jetstream() uses: a JetStream domain would
        # need its own prefix here as well.
        self._next = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._durable = durable
        self._gaps = gaps
        self._ack_wait = ack_wait
        self._inbox = nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Any = None
        self._open = 0  # messages the open request may still bring
        self._until = 0.0  # when it expires (loop time)
        self._last: int | None = None  # delivery sequence of the last message taken
        self._reconnects = 0  # the connection's reconnect count when it was taken
        self._paused_until = 0.0  # loop time: no pulling before (deliveries were lost)
        self._owed: _Owed | None = None  # redeliveries to take before anything newer

    async def start(self) -> _Pull:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._arrived)
        return self

    async def _arrived(self, msg: Msg) -> None:
        self._queue.put_nowait(msg)

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        loop = asyncio.get_running_loop()
        if self._paused_until:
            if (left := self._paused_until - loop.time()) > 0:
                await asyncio.sleep(min(wait, left))
            self._take_arrived()  # the open request's tail: dropped, it comes back in order
            if loop.time() < self._paused_until:
                return []
            self._open, self._last, self._paused_until = 0, None, 0.0  # redeliveries first
        arrived: list[Msg] = []
        if self._queue.empty():
            if self._open <= 0 or loop.time() >= self._until:
                request = {"batch": batch, "expires": int(wait * 1e9)}
                await self._nc.publish(self._next, jsontext.dumps(request).encode(), self._inbox)
                self._open, self._until = batch, loop.time() + wait
            try:
                arrived.append(
                    await asyncio.wait_for(self._queue.get(), self._until - loop.time() + 0.1)
                )
            except TimeoutError:
                self._open = 0  # expired (its 408 may still come: harmless)
                return []
        msgs, refused = self._take_arrived(arrived)
        if refused and not msgs:  # e.g. the consumer is gone: the caller backs off
            raise BusUnavailable(f"pull request refused: {refused}")
        return self._in_order(msgs)

    def _take_arrived(self, arrived: list[Msg] | None = None) -> tuple[list[Msg], str]:
        """The stream messages queued so far (after ``arrived``, taken already), and why the
        open request was refused, if it was. While paused they are dropped (left unsettled)
        and extend the pause."""
        arrived = arrived or []
        while not self._queue.empty():
            arrived.append(self._queue.get_nowait())
        msgs, refused = [], ""
        for msg in arrived:
            status = _status(msg)
            if status is None:
                msgs.append(msg)
                self._open -= 1
            elif status != "100":  # 100: heartbeat / flow control
                self._open = 0  # the request ended: 408 expired; 409 refused (see why)
                if status != "408":
                    assert msg.headers is not None
                    refused = f"{status} {msg.headers.get(api.Header.DESCRIPTION, '')}"
        if msgs and self._paused_until:
            self._pause()
            return [], refused
        return msgs, refused

    def _in_order(self, msgs: list[Msg]) -> list[Msg]:
        """``msgs`` up to the first one that could overtake an earlier message (then pause)."""
        if self._gaps == "ignore":
            return msgs
        reconnected = int(self._nc.stats["reconnects"]) != self._reconnects
        for i, msg in enumerate(msgs):
            seq = msg.metadata.sequence
            if why := self._overtakes(seq.consumer, seq.stream, reconnected):
                event, detail = why
                log.warning(
                    event,
                    consumer=self._durable,
                    held_back=len(msgs) - i,
                    resume_in=self._ack_wait + REDELIVERY_GRACE,
                    **detail,
                )
                self._pause()
                return msgs[:i]
            self._last = seq.consumer  # (a step back is a new consumer leader: fine)
        self._reconnects = int(self._nc.stats["reconnects"])
        return msgs

    def _overtakes(
        self, delivery: int, stream_seq: int, reconnected: bool
    ) -> tuple[str, dict[str, int]] | None:
        """Why the message delivered as ``delivery`` may not be taken yet, or None."""
        last = self._last
        if last is not None and delivery > last + 1 and (self._gaps == "any" or reconnected):
            return "deliveries_lost", {"lost": delivery - last - 1}
        if (owed := self._owed) is not None:
            if stream_seq <= owed.through:
                owed.seen.add(stream_seq)
                if len(owed.seen) >= owed.count:
                    self._owed = None
            elif asyncio.get_running_loop().time() < owed.until:
                self._owed = None  # the pause that follows outlasts their ack wait
                return "redeliveries_owed", {"owed": owed.count - len(owed.seen)}
            else:  # expired, so redelivered before anything newer (or acked by another)
                self._owed = None
        return None

    def expect_redeliveries(self, through: int, count: int) -> None:
        """``count`` delivered, unsettled messages up to stream sequence ``through`` (another
        process had them) come back before anything newer is taken. Their ack wait runs out
        within ``ack_wait`` of now (the consumer's leader answered, so its timers run): after
        that the server redelivers them before anything newer by itself."""
        if self._gaps != "ignore" and count > 0:
            until = asyncio.get_running_loop().time() + self._ack_wait + REDELIVERY_GRACE
            self._owed = _Owed(through, count, set(), until)

    def _pause(self) -> None:
        """No pulling until what was delivered up to now has passed its ack wait."""
        until = asyncio.get_running_loop().time() + self._ack_wait + REDELIVERY_GRACE
        self._paused_until = max(self._paused_until, until)

    async def relinquish(self, held: Sequence[Msg]) -> None:
        loop = asyncio.get_running_loop()
        if self._open > 0 and (left := self._until - loop.time()) > -0.1:
            await asyncio.sleep(left + 0.1)  # the server's clock started a little later
        back = list(held)
        arrived, _ = self._take_arrived()
        if not self._paused_until and self._owed is None:
            back += arrived
        # Paused or owed redeliveries, only ``held`` goes back at once: it came before the
        # messages still owed, so it is redelivered before them; the rest follows them.
        self._open, self._last, self._paused_until, self._owed = 0, None, 0.0, None
        for msg in sorted(back, key=lambda m: m.metadata.sequence.stream):
            with contextlib.suppress(Exception):  # unacked, it comes back anyway
                await msg.nak()

    async def close(self) -> None:
        await self._sub.unsubscribe()


@dataclass(slots=True)
class _Owed:
    """Redeliveries a consumer owes this process before anything newer (``_Pull``)."""

    through: int  # stream sequence: anything above is newer
    count: int
    seen: set[int]
    until: float  # loop time: given up on after


def _status(msg: Msg) -> str | None:
    """A pull request's status header (408 expired, 409 refused, 100 heartbeat), or None for a
    stream message."""
    return msg.headers.get(api.Header.STATUS) if msg.headers else None
