"""NatsBus: the daemon's one door to NATS (connect, streams and consumers, fetch, publish).

The only daemon-side module that imports ``nats``. NATS errors that mean "try again later"
surface as ``BusUnavailable``; everything above this module sees flowd types only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from flowd.aio import Wakeup
from flowd.bus import subjects as names
from flowd.bus.subjects import Subjects
from flowd.core import errors, jsontext
from flowd.core.outbox import Drained, OutboxMessage

Message = Msg
log = structlog.get_logger("flowd.bus")

#: Seconds beyond a consumer's ack wait after which JetStream has surely redelivered what was
#: delivered and not settled when it was asked (its timer may fire a little late).
REDELIVERY_GRACE = 5.0

#: How a consumer's messages are kept from overtaking earlier ones that JetStream will only
#: redeliver after their ack wait (``_Pull``): a jump in the delivery sequence means
#: deliveries were lost on "any" jump (this process is the consumer's only puller: a
#: partition) or on a jump "across_reconnect" (others may pull the same consumer, so a jump
#: alone proves nothing); "ignore": order does not matter (creates without a flow id, wake
#: messages), nothing is held back.
Gaps = Literal["any", "across_reconnect", "ignore"]

#: Stream sequences a consumer remembers having handed out (at least FLOWD_BATCH's maximum).
HANDED_OUT_KEPT = 4096
#: Times a partition's consumer is asked, one ack wait apart, for messages still owed before
#: the rest is given up on.
RESYNC_ROUNDS = 3


class BusUnavailable(Exception):
    """NATS could not be reached or did not answer in time; retry later."""


#: nats-py's header block: ``NATS/1.0\r\n``, ``key: value\r\n`` per header, ``\r\n``.
_HEADER_LINE = len(b"NATS/1.0\r\n\r\n")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: The outbox headers' bytes besides their values: the header block's first and last line,
#: two names, their separators and line ends.
_HEADERS_SLACK = _HEADER_LINE + len("Nats-Msg-Id: \r\nFlowd-Command-Id: \r\n")
#: A subject NATS cannot publish to: empty tokens, wildcards, whitespace, control characters.
_BAD_SUBJECT = re.compile(r"^\.|\.\.|\.$|^$|(^|\.)[*>](\.|$)|[\s\x00-\x1f\x7f]")


def wire_size(headers: Mapping[str, str] | None, payload: int) -> int:
    """The bytes nats-server counts against its ``max_payload`` for a message with
    ``headers`` and a body of ``payload`` bytes: the header block as nats-py writes it, plus
    the body. (nats-py itself checks the body alone; a message whose headers push it over the
    limit is sent, and the server then closes the connection.)"""
    if not headers:
        return payload
    size = _HEADER_LINE
    for key, value in headers.items():
        size += len(key.strip()) + len(value.strip().translate(_NEWLINES).encode()) + 4
    return size + payload


@contextlib.asynccontextmanager
async def _translated() -> Any:
    try:
        yield
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise BusUnavailable(f"NATS: {exc!r}") from exc


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


#: Stream metadata key naming the prefix whose daemon created the stream (nats-server >= 2.10
#: keeps stream metadata; 2.9 accepts and drops it, so the description says it as well).
OWNER_KEY = "flowd_prefix"
OWNER_TAG = "flowd prefix="


def stream_owner(config: api.StreamConfig) -> str | None:
    """The prefix a stream is tagged with (metadata, else description), or None."""
    owner = (config.metadata or {}).get(OWNER_KEY)
    if owner is None and (config.description or "").startswith(OWNER_TAG):
        owner = (config.description or "").removeprefix(OWNER_TAG)
    return owner


def check_owner(existing: api.StreamConfig, wanted: api.StreamConfig, prefix: str) -> None:
    """errors.Misconfigured unless the stream ``existing`` may be rewritten as ``wanted`` by
    the daemon of ``prefix``: tagged with ``prefix``, or untagged (made by a flowd from before
    tags, or by hand) with exactly the subjects ``wanted`` has."""
    owner = stream_owner(existing)
    if owner is None:
        subjects = list(existing.subjects or [])
        if sorted(subjects) == sorted(wanted.subjects or []):
            return  # adopted: the update tags it
        owner = ",".join(sorted({s.split(".")[0] for s in subjects})) or "(no subjects)"
    if owner != prefix:
        raise errors.Misconfigured(
            f"NATS stream {existing.name} belongs to prefix {owner!r}, not to this daemon's "
            f"{prefix!r} (both prefixes map to the same stream names): give one of them a "
            "prefix that maps to other names (upper-cased, '-' read as '_')"
        )


async def connect(
    url: str,
    *,
    name: str = "flowd",
    creds: str | None = None,
    nkey: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    closed_cb: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """A NATS connection that, once made, reconnects forever (the daemon must outlive NATS
    outages). The first connect tries each server once: unreachable ->
    ``BusUnavailable`` (the caller retries with backoff); credentials or TLS refused ->
    ``errors.Misconfigured`` (retrying cannot help). nats-py's own error logging (a traceback
    per attempt) is replaced by ``_ErrorLog``: at most one line per ``LOG_EVERY`` seconds.
    ``closed_cb``: called if it closes for good anyway (the server refused a message of the
    protocol, e.g. one over its max_payload, which flowd never sends)."""
    where = redact(url)
    seen: list[BaseException] = []  # the first connect's errors: what to tell the caller
    error_log = _ErrorLog(where)
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:  # the first connect: what it raises says it all
            if len(seen) < 100:
                seen.append(exc)
        else:
            error_log(exc)

    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        # The first connect only: set to reconnect forever once connected (below).
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "error_cb": on_error,
    }
    options.update(_auth(creds, nkey, tls_ca, tls_cert, tls_key))
    if closed_cb is not None:
        options["closed_cb"] = closed_cb
    nc = _LenientClient()
    try:
        await nc.connect(**options)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        refusal = next(filter(None, map(_refusal, [exc, *seen])), None)
        if refusal is not None:
            raise errors.Misconfigured(f"NATS at {where} refused flowd: {refusal}") from exc
        last = seen[-1] if seen and isinstance(exc, nats.errors.NoServersError) else exc
        raise BusUnavailable(f"cannot connect to NATS at {where}: {last!r}") from exc
    connected = True
    seen.clear()
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _auth(
    creds: str | None,
    nkey: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> dict[str, Any]:
    """nats.connect options for a credentials file, an nkey seed, TLS and mTLS (a user and
    password, or a token, travel in the URL); ``errors.Misconfigured`` for TLS files that
    cannot be loaded."""
    options: dict[str, Any] = {}
    if creds:
        options["user_credentials"] = creds
    if nkey:
        options["nkeys_seed"] = nkey
    if tls_ca or tls_cert:
        try:
            tls = ssl.create_default_context(cafile=tls_ca)
            if tls_cert:
                tls.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise errors.Misconfigured(f"NATS TLS files: {exc}") from exc
        options["tls"] = tls
    return options


def redact(url: str) -> str:
    """``url`` (comma-separated servers) without user, password or token."""
    return ",".join(
        # up to the last "@" of the authority: a password may hold a raw "@" (nats-py takes it)
        re.sub(r"^([a-z][a-z0-9+.-]*://)?[^/]*@", r"\1", u.strip())
        for u in url.split(",")
    )


def _refusal(exc: BaseException) -> str | None:
    """Why the server will never accept this client as configured (TLS, credentials, a
    credentials file that cannot be read), or None: worth trying again."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"credentials: {exc}"
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or any(
        word in text for word in ("authorization violation", "authentication", "bad credentials")
    ):
        return "authorization violation (user, password, token or credentials)"
    return None


#: Seconds between two log lines about a NATS connection that keeps failing.
LOG_EVERY = 30.0


class _ErrorLog:
    """nats-py's error callback, rate-limited: the first error, then at most one line per
    ``LOG_EVERY`` seconds saying how many were suppressed (an unreachable server fails
    every half second, forever)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.next_at = 0.0
        self.suppressed = 0

    def __call__(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        log.warning("nats_error", server=self.where, error=repr(exc), suppressed=self.suppressed)
        self.next_at, self.suppressed = now + LOG_EVERY, 0


class _LenientClient(Client):
    """nats-py decodes a message's subject and reply strictly, in its read loop, and a
    UnicodeDecodeError there ends the read loop for good: one message published on a subject
    that is not UTF-8 would leave the connection up but deaf. Here such bytes become U+FFFD,
    which the codec refuses (a dead letter) like any other unusable subject."""

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode(errors="replace"),
            reply=reply.decode(errors="replace"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


class NatsBus:
    """JetStream streams, pull consumers and publishing for one subject prefix."""

    def __init__(self, nc: Client, subjects: Subjects, limits: StreamLimits) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=5)
        self.subjects = subjects
        self.limits = limits
        self._subs: dict[str, _Pull] = {}
        self._streams: dict[str, str] = {}
        self._acks: _Acks | None = None
        self._evt_max_msg = -1  # the events stream's max_msg_size, as last read

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
                description=OWNER_TAG + s.prefix,
                metadata={OWNER_KEY: s.prefix},
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
        async with _translated():
            for config in streams:
                info = await self._claim(config)
                if config.name == s.evt_stream:
                    self._evt_max_msg = int(info.config.max_msg_size or -1)
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
                    pull = _Pull(
                        self.nc, self.js, stream, durable, gaps=gaps, ack_wait=lim.ack_wait
                    )
                    self._subs[durable] = await pull.start()
                self._streams[durable] = stream
        return self

    async def _claim(self, config: api.StreamConfig) -> api.StreamInfo:
        """Create the stream of ``config``, or update it if it is this prefix's (``check_owner``:
        errors.Misconfigured if it is another's); its info as it is now."""
        try:
            info = await self.js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            try:
                return await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:  # made meanwhile: by whom?
                info = await self.js.stream_info(config.name or "")
        check_owner(info.config, config, self.subjects.prefix)
        return await self.js.update_stream(config)

    async def fetch(self, durable: str, batch: int, wait: float, *, idle: bool = True) -> list[Msg]:
        """The messages that have arrived, as soon as there is one (at most ``batch`` are
        asked for); ``[]`` when none arrives within ``wait`` seconds. ``idle``: every message
        fetched before has been settled (acked or nak'd), so the consumer's count of unsettled
        messages can be trusted (see ``resync``)."""
        try:
            return await self._subs[durable].fetch(batch, wait, idle)
        except (nats.errors.Error, OSError) as exc:
            raise BusUnavailable(str(exc)) from exc

    async def relinquish(self, durable: str, held: Sequence[Msg]) -> None:
        """Stop pulling ``durable``: once its open pull request has expired (nothing more
        can arrive here) nak ``held`` (fetched, not settled), what a resync held back and what
        arrived but was never fetched, in stream order. A nak'd message is redelivered at
        once, so whoever pulls next (another replica, after a partition moved; it resyncs)
        has them all in hand without waiting for an ack wait."""
        await self._subs[durable].relinquish(held)

    def resync(self, durable: str) -> None:
        """Before pulling ``durable`` (just taken over, or after a restart): the messages
        another process was delivered and did not settle are applied before anything newer,
        in stream order (``_Pull``)."""
        self._subs[durable].resync()

    async def pending(self, durable: str) -> tuple[int, int]:
        """(messages not yet delivered, delivered but unacked) of a consumer."""
        async with _translated():
            info = await self.js.consumer_info(self._streams[durable], durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    def publish_limit(self) -> int:
        """The largest message, headers and body, that the server (its ``max_payload``) and
        the events stream (its ``max_msg_size``, as last read) take."""
        limit = int(self.nc.max_payload)
        return min(limit, self._evt_max_msg) if self._evt_max_msg > 0 else limit

    async def publish_outbox(
        self, batch: Sequence[OutboxMessage], *, skip: Collection[int] = ()
    ) -> Drained:
        """Publish ``batch`` in order, pipelined, except the rows at the indexes in ``skip``,
        and return once JetStream acked all. A message that can never be published (too big
        for ``publish_limit``, a subject NATS refuses, a size the stream refuses) is not sent
        again: it is returned to be parked, and the later messages of its flow in the batch
        are kept back. Any other failure raises BusUnavailable: nothing is known about which
        landed, and a re-send is dropped by id."""
        limit = self.publish_limit()
        refreshed = False
        parked: dict[int, str] = {}
        kept: set[int] = set()
        blocked: set[str] = set()
        out: list[tuple[int, str, bytes, dict[str, str]]] = []
        for i, m in enumerate(batch):
            if i in skip:
                continue
            if blocked and m.flow_key in blocked:
                kept.add(i)
                continue
            headers = {names.MSG_ID: m.msg_id}
            if m.command_id is not None:
                headers[names.COMMAND_ID] = m.command_id
            subject = self.subjects.topic(m.topic)
            body = m.text().encode()
            # Cheap on the hot path: an upper bound first (4 bytes per character at most),
            # the exact size only near the limit; events' subjects are flowd's own.
            at_most = len(body) + 4 * (len(m.msg_id) + len(m.command_id or "")) + _HEADERS_SLACK
            why = None
            if at_most > limit and (size := wire_size(headers, len(body))) > limit:
                if not refreshed and size <= self.nc.max_payload:
                    # Over the stream's limit as last read: read it again (raised since?).
                    refreshed = await self._refresh_limit()
                    limit = self.publish_limit()
                if size > limit:
                    why = f"message of {size} bytes exceeds the {limit} byte limit of NATS"
            if not m.topic.startswith("evt.") and _BAD_SUBJECT.search(subject):
                why = f"NATS refuses the subject {subject!r}"
            if why is None:
                out.append((i, subject, body, headers))
            else:
                parked[i] = why
                blocked.add(m.flow_key)
        if out:
            refused = await self._publish_pipelined(out)
            if refused:
                await self._refresh_limit()  # a stream limit lowered since it was read
            parked.update(refused)
        return Drained(parked, frozenset(kept))

    async def _publish_pipelined(
        self, out: list[tuple[int, str, bytes, dict[str, str]]]
    ) -> dict[int, str]:
        """Send ``out`` (batch index, subject, body, headers) and wait for every ack; the
        batch indexes JetStream refused for good, with why."""
        async with _translated():
            if self._acks is None:
                self._acks = await _Acks(self.nc).start()
            waiting = self._acks.expect(len(out))
            try:
                for (_, subject, body, headers), reply in zip(out, waiting.replies, strict=True):
                    await self.nc.publish(subject, body, reply, headers)
                async with asyncio.timeout(10):
                    await waiting.done
            finally:
                self._acks.forget(waiting)
            if waiting.error is not None:
                raise BusUnavailable(f"JetStream refused an event: {waiting.error}")
        return {out[n][0]: why for n, why in waiting.refused.items()}

    async def _refresh_limit(self) -> bool:
        """Read the events stream's ``max_msg_size`` again (True), if NATS answers."""
        try:
            info = await self.js.stream_info(self.subjects.evt_stream)
        except (nats.errors.Error, OSError, TimeoutError):
            return False
        self._evt_max_msg = int(info.config.max_msg_size or -1)
        return True

    async def stored_ids(self, subjects: Collection[str]) -> dict[str, str]:
        """The ``Nats-Msg-Id`` of the last message the events stream holds on each of
        ``subjects`` (full subjects), for those that have one."""

        async def last(subject: str) -> tuple[str, str | None]:
            try:
                msg = await self.js.get_last_msg(self.subjects.evt_stream, subject)
            except nats.js.errors.NotFoundError:
                return subject, None
            return subject, (msg.headers or {}).get(names.MSG_ID)

        asked = [s for s in subjects if not _BAD_SUBJECT.search(s)]
        async with _translated():
            found = await asyncio.gather(*(last(s) for s in asked))
        return {subject: msg_id for subject, msg_id in found if msg_id is not None}

    async def dead_letter(self, msg: Msg, source: str, reason: str, command_id: str) -> None:
        """Copy ``msg`` to ``<prefix>.dlq.<source>`` with why, then the caller acks it (a
        core NATS message, not from a stream, has no stream sequence or delivery count)."""
        headers = {
            names.MSG_ID: f"dlq-{command_id}",
            names.DLQ_REASON: reason[:1000],
            names.DLQ_SUBJECT: msg.subject,
        }
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            meta = msg.metadata
            headers[names.DLQ_STREAM_SEQ] = str(meta.sequence.stream)
            headers[names.DLQ_DELIVERED] = str(meta.num_delivered)
        await self.publish_letter(self.subjects.dead_letter(source), msg.data or b"", headers)

    async def publish_letter(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """JetStream-publish a dead letter: a copy of ``data`` with ``headers``, cut so that
        the whole message fits the server's ``max_payload`` (then ``Flowd-Dlq-Truncated``
        says the original size). Too big, it would make the server close the connection."""
        data, headers = fitted(data, headers, int(self.nc.max_payload))
        async with _translated():
            await self.js.publish(subject, data, headers=headers)

    async def publish_outcome(self, message: OutboxMessage) -> None:
        """Publish one outcome that is not recorded (it has no outbox row): an
        ``idempotency_conflict``, whose command id belongs to the id's first use."""
        headers = {names.MSG_ID: message.msg_id}
        if message.command_id is not None:
            headers[names.COMMAND_ID] = message.command_id
        async with _translated():
            await self.js.publish(
                self.subjects.topic(message.topic), message.text().encode(), headers=headers
            )

    async def nudge_relay(self) -> None:
        """Tell the replica holding the relay lock that this one committed outbox rows."""
        async with _translated():
            await self.nc.publish(self.subjects.relay_nudge, b"")

    async def on_relay_nudge(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on every replica's ``nudge_relay`` (this one's included)."""

        async def nudged(msg: Msg) -> None:
            callback()

        async with _translated():
            await self.nc.subscribe(self.subjects.relay_nudge, cb=nudged)

    async def serve(self, subject: str, handler: Callable[[Msg], Awaitable[None]]) -> None:
        """Serve requests on ``subject`` in the shared queue group."""
        async with _translated():
            await self.nc.subscribe(subject, queue=self.subjects.api_queue, cb=handler)

    async def listen(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """Subscribe (core NATS, queue group) and return the function that unsubscribes."""
        async with _translated():
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


def fitted(data: bytes, headers: dict[str, str], limit: int) -> tuple[bytes, dict[str, str]]:
    """``data`` and ``headers``, the body cut (and ``Flowd-Dlq-Truncated: <original size>``
    added) if the message would not fit ``limit`` bytes, headers included."""
    if wire_size(headers, len(data)) <= limit:
        return data, headers
    cut = {**headers, names.DLQ_TRUNCATED: str(len(data))}
    room = max(limit - wire_size(cut, 0), 0)
    return data[:room], cut


#: JetStream publish errors that the same message gets again however often it is sent: the
#: message (10054) or its headers (10097) exceed what the stream takes.
PERMANENT_PUBLISH_ERRORS: Final = frozenset({10054, 10097})


@dataclass(slots=True)
class _Waiting:
    """One batch of publishes whose acks are awaited (``_Acks``)."""

    replies: list[str]
    done: asyncio.Future[None]
    left: int
    error: str | None = None  # a refusal that may pass later (the batch fails)
    refused: dict[int, str] = field(default_factory=dict)  # index -> a refusal for good


class _Acks:
    """JetStream publish acks for the outbox relay: one reply subscription for all, a
    counter per batch. nats-py's ``publish_async`` costs a semaphore wait, a random token, a
    future and a JSON parse per message; the relay publishes every event, so it counts acks
    itself and parses only a refusal."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._next = 0
        self._batches: dict[str, tuple[_Waiting, int]] = {}  # reply -> (its batch, index)

    async def start(self) -> _Acks:
        await self._nc.subscribe(f"{self._prefix}.*", cb=self._ack)
        return self

    def expect(self, count: int) -> _Waiting:
        first, self._next = self._next, self._next + count
        replies = [f"{self._prefix}.{n}" for n in range(first, first + count)]
        waiting = _Waiting(replies, asyncio.get_running_loop().create_future(), count)
        for n, reply in enumerate(replies):
            self._batches[reply] = (waiting, n)
        if not count:
            waiting.done.set_result(None)
        return waiting

    def forget(self, waiting: _Waiting) -> None:
        for reply in waiting.replies:
            self._batches.pop(reply, None)

    async def _ack(self, msg: Msg) -> None:
        waiting, n = self._batches.pop(msg.subject, (None, 0))
        if waiting is None:
            return  # the batch gave up (timed out) already
        if msg.headers and msg.headers.get(api.Header.STATUS):  # 503: no stream listens
            waiting.error = waiting.error or f"status {msg.headers.get(api.Header.STATUS)}"
        elif b'"error"' in msg.data:
            error = jsontext.loads(msg.data).get("error", {})
            why = f"{error.get('code')} {error.get('description')} ({error.get('err_code')})"
            if error.get("err_code") in PERMANENT_PUBLISH_ERRORS:
                waiting.refused[n] = f"JetStream refused it: {why}"
            else:
                waiting.error = waiting.error or why
        waiting.left -= 1
        if not waiting.left and not waiting.done.done():
            waiting.done.set_result(None)


class _Pull:
    """A durable pull consumer, pulled continuously, whose messages come out in stream order.

    nats-py's ``fetch(n)`` waits, once nothing is queued, until all ``n`` messages arrived or
    its timeout passed: under light load a command would sit in the client for up to the
    whole timeout. Here one pull request (``batch``, expiring after ``wait``) stays open on
    the server and every ``fetch`` returns what has arrived as soon as there is something;
    a new request is sent only when the last one is used up or expired. The server never
    delivers more than the consumer's ``max_ack_pending`` unacked messages, whatever is asked.

    Order. JetStream sends a message that was delivered and not settled again only when its
    ack wait runs out, and meanwhile hands out newer ones; so a flow's later command could
    overtake its earlier one when (a) a delivery was lost on the way (the NATS node it
    travelled through died, the connection dropped), or (b) another process had it (it
    crashed, or gave the partition up). Each delivery carries the consumer's delivery
    sequence, one more than the one before: a jump (see ``Gaps``) shows (a); taking a
    consumer over calls ``resync`` for (b). Either way the consumer *resyncs*: once every
    message fetched before is settled (``idle``) it asks the consumer how many messages are
    unsettled and up to which stream sequence; it holds back everything that arrives (kept
    in progress) until all of those are in hand, then hands them out sorted by stream
    sequence, with anything newer that arrived meanwhile after them. Redeliveries may come
    in any order (ack waits run out in the order they were last extended), so sorting is
    what makes the order right. Unsettled messages that do not come back within the ack wait
    are given up on: at once on a shared consumer (another replica settled them); on a
    partition's consumer after asking again, up to ``RESYNC_ROUNDS`` times.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        stream: str,
        durable: str,
        *,
        gaps: Gaps,
        ack_wait: float,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._durable = durable
        # The default API prefix, as NatsBus's nc.jetstream() uses: a JetStream domain would
        # need its own prefix here as well.
        self._next = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._gaps = gaps
        self._ack_wait = ack_wait
        self._inbox = self._nc.new_inbox()
        # What the subscription delivered and no fetch took yet; a fetch waiting for the
        # next arrival waits on ``_wakeup`` (a future and a timer: cheaper than wait_for's
        # task per fetch on this, the busiest path).
        self._arrivals: collections.deque[Msg] = collections.deque()
        self._wakeup = Wakeup()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sub: Any = None
        self._open = 0  # messages the open request may still bring
        self._until = 0.0  # when it expires (loop time)
        self._last: int | None = None  # delivery sequence of the last message received
        self._reconnects = 0  # the connection's reconnect count then
        self._resync: _Resync | None = None
        self._handed_out: dict[int, None] = {}  # stream sequences lately handed out, in order

    async def start(self) -> _Pull:
        self._loop = asyncio.get_running_loop()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._arrived)
        return self

    async def _arrived(self, msg: Msg) -> None:
        self._arrivals.append(msg)
        self._wakeup.wake()

    async def _arrival(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message to arrive; whether one is there."""
        if not self._arrivals:
            await self._wakeup.wait(timeout)
        return bool(self._arrivals)

    def resync(self, *, lost: int = 0) -> None:
        """Hold everything back until the consumer's unsettled messages are all in hand
        (``lost``: deliveries that never arrived, the reason for it)."""
        if self._gaps == "ignore":
            return
        if lost:
            log.warning("deliveries_lost", consumer=self._durable, lost=lost)
        if self._resync is None:
            self._resync = _Resync()
        else:
            self._resync.through = None  # ask again: more may be owed now

    async def fetch(self, batch: int, wait: float, idle: bool = True) -> list[Msg]:
        r = self._resync
        if r is not None and r.through is None and idle:
            await self._ask(r)
        # Until it can ask, come back soon to see whether everything fetched was settled.
        arrived = await self._receive(batch, wait, 0.05 if r and r.through is None else wait)
        if self._gaps == "ignore":  # never resyncs: nothing to track
            return arrived
        taken = []
        for msg in arrived:
            delivery = msg.metadata.sequence.consumer
            last, self._last = self._last, delivery  # (a step back: a new consumer leader)
            if self._lost_deliveries() and last is not None and delivery > last + 1:
                self.resync(lost=delivery - last - 1)
            if self._resync is None:
                taken.append(msg)
                self._handed_out[msg.metadata.sequence.stream] = None
                if len(self._handed_out) > HANDED_OUT_KEPT:
                    del self._handed_out[next(iter(self._handed_out))]
            else:
                self._resync.hold(msg)
        if self._resync is not None:
            return taken + await self._release_when_complete(self._resync)
        return taken

    def _lost_deliveries(self) -> bool:
        """Whether a jump before this delivery would mean deliveries were lost (``Gaps``): on
        a shared consumer only the first delivery since a reconnect can tell."""
        reconnects = int(self._nc.stats["reconnects"])
        reconnected, self._reconnects = reconnects != self._reconnects, reconnects
        return self._gaps == "any" or reconnected

    async def _receive(self, batch: int, wait: float, patience: float) -> list[Msg]:
        """Stream messages that arrived (waiting up to ``patience`` for one), keeping a pull
        request of ``batch`` expiring after ``wait`` open."""
        loop = self._loop
        assert loop is not None, "start() first"
        if not self._arrivals:
            if self._open <= 0 or loop.time() >= self._until:
                request = {"batch": batch, "expires": int(wait * 1e9)}
                await self._nc.publish(self._next, jsontext.dumps(request).encode(), self._inbox)
                self._open, self._until = batch, loop.time() + wait
            if not await self._arrival(min(self._until - loop.time() + 0.1, patience)):
                if loop.time() >= self._until:
                    self._open = 0  # expired (its 408 may still come: harmless)
                return []
        arrived = list(self._arrivals)
        self._arrivals.clear()
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
        if refused and not msgs:  # e.g. the consumer is gone: the caller backs off
            raise BusUnavailable(f"pull request refused: {refused}")
        return msgs

    async def _ask(self, r: _Resync) -> None:
        """How many messages are unsettled now, up to which stream sequence."""
        async with _translated():
            await self._nc.flush(timeout=5)  # this process's acks reach the server first
            info = await self._js.consumer_info(self._stream, self._durable)
        r.asked += 1
        r.owed = int(info.num_ack_pending or 0)
        r.through = int(info.delivered.stream_seq or 0) if info.delivered else 0
        if self._last is None and self._gaps == "any" and info.delivered is not None:
            # Taking a partition over: its next delivery must be the consumer's next one, or
            # it went elsewhere (a dead owner's pull request still open on the server).
            self._last = int(info.delivered.consumer_seq or 0)
        r.until = asyncio.get_running_loop().time() + self._ack_wait + REDELIVERY_GRACE
        if r.owed:
            log.info("resync_owed", consumer=self._durable, owed=r.owed, held=len(r.held))

    async def _release_when_complete(self, r: _Resync) -> list[Msg]:
        """All held messages in stream order once the owed ones are in hand, else []."""
        now = asyncio.get_running_loop().time()
        if now >= r.progress_at:  # held messages must not run out their ack wait
            r.progress_at = now + self._ack_wait / 3
            for msg in r.held.values():
                with contextlib.suppress(Exception):
                    await msg.in_progress()
        if r.through is None:
            return []
        # A copy of a message handed out before (its ack wait ran out in a lane) is not
        # owed: that one was settled. It goes out again all the same (a no-op by command id).
        through, handed_out = r.through, self._handed_out
        missing = r.owed - sum(1 for seq in r.held if seq <= through and seq not in handed_out)
        if missing > 0 and now < r.until:
            return []
        if missing > 0 and self._gaps == "any" and r.asked < RESYNC_ROUNDS:
            # Only this process pulls: they should come (a consumer leader elected since
            # re-arms their ack waits; a crashed lane's nak may delay one). Ask again.
            log.info("resync_extended", consumer=self._durable, missing=missing)
            r.through = None
            return []
        if missing > 0:  # settled by another replica (shared consumer) meanwhile
            log.warning("resync_gave_up", consumer=self._durable, missing=missing)
        self._resync = None
        return [r.held[seq] for seq in sorted(r.held)]

    async def relinquish(self, held: Sequence[Msg]) -> None:
        # Until the last pull request expired, whatever its open count says (a late 408 of
        # an earlier request zeroes it), a delivery can still arrive here and be stranded.
        if (left := self._until - asyncio.get_running_loop().time()) > -0.1:
            await asyncio.sleep(left + 0.1)  # the server's clock started a little later
        back = {m.metadata.sequence.stream: m for m in held}
        if self._resync is not None:
            back.update(self._resync.held)
        while self._arrivals:
            msg = self._arrivals.popleft()
            if not _status(msg):
                back.setdefault(msg.metadata.sequence.stream, msg)
        # Whoever pulls next resyncs (it sorts what comes back), so the order of naks is
        # only a courtesy.
        self._open, self._last, self._resync = 0, None, None
        for seq in sorted(back):
            with contextlib.suppress(Exception):  # unacked, it comes back anyway
                await back[seq].nak()

    async def close(self) -> None:
        await self._sub.unsubscribe()


@dataclass(slots=True)
class _Resync:
    """Messages held back until a consumer's unsettled ones are all in hand (``_Pull``)."""

    held: dict[int, Msg] = field(default_factory=dict)  # by stream sequence
    through: int | None = None  # the last stream sequence delivered, once asked
    owed: int = 0  # messages unsettled then: all must be held before any is handed out
    until: float = 0.0  # loop time: the rest is given up on (settled by another process)
    progress_at: float = 0.0  # loop time of the next in-progress for held messages
    asked: int = 0  # times the consumer was asked

    def hold(self, msg: Msg) -> None:
        seq = msg.metadata.sequence
        had = self.held.get(seq.stream)
        if had is None or had.metadata.sequence.consumer < seq.consumer:
            self.held[seq.stream] = msg  # the latest delivery's ack is the one that counts


def _status(msg: Msg) -> str | None:
    """A pull request's status (408 expired, 409 refused, 100 heartbeat), or None for a stream
    message. Only the server marks a status message: it has no ack subject, while every
    stream message has one (``$JS.ACK.…``). A publisher's own ``Status`` header never counts."""
    if msg.reply.startswith("$JS.ACK."):
        return None
    return (msg.headers or {}).get(api.Header.STATUS) or "100"
