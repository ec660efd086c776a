"""WaitEngine: wakes waiting flows on timers, NATS messages and timeouts, without losing one.

- Timers, ``any`` timeouts and cancels-while-waiting are ``wait_conditions`` rows with a due
  time. Each tick claims the due rows with ``FOR UPDATE SKIP LOCKED`` plus a lease, so any
  number of replicas fire each once; rows that fell due while every daemon was down are
  simply due at start. A tick reads only due rows (partial index on ``due_at``).
- Subject waits: the engine subscribes (queue group ``flowd-wake``) to every subject a
  waiting flow declares, refreshed as waits come and go, and resolves a message to flows by
  an indexed lookup on (subject, correlation id). Subjects under ``<prefix>.wake.>`` are
  captured by the ``N_WAKE`` stream and consumed durably; any other subject is core NATS only.
- Signals are not here: they are commands (``signal`` verb), kept durably by the store until
  a wait consumes them.

Every wake goes through FlowManager with a command id derived from the condition (timers) or
the message, so two replicas racing produce one event, never two.

Nothing one flow's wait or one message holds stops the others: a wake message the door
refuses (``core.door``: not UTF-8, NUL, lone surrogates, numbers out of range; an unusable
``Flowd-Correlation-Id``) wakes nobody and goes to ``<prefix>.dlq.wake`` with the reason; a
stored subject NATS refuses is skipped (logged, rate-limited) while the others are
subscribed one by one; a timer that cannot be fired is logged and skipped (its lease brings it
back later) while the rest fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from flowd.bus import codec
from flowd.bus import subjects as names
from flowd.bus.codec import RESERVED
from flowd.bus.nats import BusUnavailable, Message, NatsBus
from flowd.core import door, errors, waits
from flowd.daemon.health import Metrics
from flowd.manager import FlowManager, utcnow
from flowd.store.port import Due

log = structlog.get_logger("flowd.waits")
#: Seconds between two log lines about the same skipped subject or unfireable timer.
LOG_EVERY = 300.0


class _Refused(Exception):
    """A wake message that wakes nobody: it is dead-lettered with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Seldom:
    """Rate limit for log lines that would repeat every tick or refresh: once per key per
    ``every`` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return False
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = now
        return True


class WaitEngine:
    """Fires due conditions and routes subject messages to waiting flows."""

    def __init__(
        self,
        manager: FlowManager,
        bus: NatsBus,
        metrics: Metrics,
        *,
        tick: float = 0.1,
        lease: float = 30.0,
        batch: int = 256,
        refresh: float = 1.0,
    ) -> None:
        self.manager = manager
        self.store = manager.store
        self.bus = bus
        self.metrics = metrics
        self.tick_interval = tick
        self.lease = lease
        self.batch = batch
        self.refresh_interval = refresh
        self._refresh = asyncio.Event()
        self._listening: dict[str, Callable[[], Awaitable[None]]] = {}
        self._seldom = _Seldom(LOG_EVERY)

    def waits_changed(self) -> None:
        """Ask for a subscription refresh now (called after local commits)."""
        self._refresh.set()

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._timers(stop))
            tasks.create_task(self._subjects(stop))
            tasks.create_task(self._durable(stop))

    # -- timers, timeouts, cancels ------------------------------------------------------------

    async def tick(self) -> int:
        """Fire what is due now; returns how many conditions were claimed."""
        now = utcnow()
        due = await self.store.claim_due(now, now + timedelta(seconds=self.lease), self.batch)
        if due:
            await asyncio.gather(*(self._fire_or_skip(d) for d in due))
        return len(due)

    async def _timers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.tick() >= self.batch:
                    continue  # more are due: no pause
            except errors.StoreUnavailable as exc:
                log.warning("wait_tick_failed", error=str(exc))
            except Exception as exc:  # a bug: the next tick tries again, the daemon stays up
                if self._seldom(f"tick:{type(exc).__name__}"):
                    log.exception("wait_tick_crashed", error=repr(exc)[:500])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.tick_interval)

    async def _fire_or_skip(self, due: Due) -> None:
        """Fire one due condition; one that cannot be fired (a bug, a row no rule allows
        now) is logged and left to its lease, and the others fire."""
        try:
            await self._fire(due)
        except errors.StoreUnavailable:
            raise
        except Exception as exc:
            cond = due.condition
            if self._seldom(f"fire:{due.flow_id}:{cond.kind}"):
                log.error(
                    "wake_failed",
                    flow_id=str(due.flow_id),
                    cause=cond.kind,
                    due_at=repr(cond.due_at),
                    error=repr(exc)[:500],
                    retry_in=self.lease,
                )

    async def _fire(self, due: Due) -> None:
        cond, flow_id = due.condition, due.flow_id
        due_at = cond.due_at.isoformat() if cond.due_at else None
        cid = f"{RESERVED}wake:{flow_id}:{due.revision}:{cond.kind}:{due_at}"
        now = utcnow()
        try:
            if cond.kind == "cancel":
                await self.manager.cancel(flow_id, command_id=cid)
            elif cond.kind == "timeout" and cond.on_timeout == "fail":
                await self.manager.fail(flow_id, "wait timed out", command_id=cid)
            else:
                wake = waits.wake(cond.kind, now, due_at=due_at)
                await self.manager.resume(flow_id, {"wake": wake}, cause=wake, command_id=cid)
            self.metrics.inc("wakes_total", cause=cond.kind)
            self.metrics.observe(
                "wake_delay_seconds", (now - cond.due_at).total_seconds() if cond.due_at else 0.0
            )
            log.info("flow_woken", flow_id=str(flow_id), cause=cond.kind, command_id=cid)
        except errors.DuplicateCommand:
            pass  # another replica fired it
        except errors.StoreUnavailable:
            raise
        except errors.FlowError as exc:
            # The flow moved on (resumed, cancelled…) between the claim and now.
            log.info("wake_skipped", flow_id=str(flow_id), cause=cond.kind, code=exc.code)

    # -- subject waits ------------------------------------------------------------------------

    async def _subjects(self, stop: asyncio.Event) -> None:
        durable = self.bus.subjects.prefix + ".wake."
        try:
            while not stop.is_set():
                self._refresh.clear()  # before the read: a change during it asks again
                try:
                    await self._subscribe(await self.store.wait_subjects(), durable)
                except (errors.StoreUnavailable, BusUnavailable) as exc:
                    log.warning("wait_subscriptions_failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        _first(stop.wait(), self._refresh.wait()), self.refresh_interval
                    )
        finally:
            for unsubscribe in self._listening.values():
                with contextlib.suppress(Exception):
                    await unsubscribe()
            self._listening.clear()

    async def _subscribe(self, stored: list[str], durable: str) -> None:
        """Listen on exactly the subjects in ``stored`` (those under ``durable`` come through
        the wake stream), one by one: a subject that is not allowed, or that NATS refuses, is
        skipped and logged, and never keeps the others from being subscribed."""
        wanted = set()
        for subject in stored:
            if subject.startswith(durable):
                continue
            problem = waits.subject_problem(subject, self.bus.subjects.reserved)
            if problem is None:
                wanted.add(subject)
            else:
                self._skip_subject(subject, f"subject {problem}")
        for subject in wanted - self._listening.keys():
            try:
                self._listening[subject] = await self.bus.listen(
                    subject, self.bus.subjects.wake_queue, self.on_message
                )
            except BusUnavailable as exc:
                if not self.bus.connected:
                    raise
                self._skip_subject(subject, str(exc))
        for subject in self._listening.keys() - wanted:
            await self._listening.pop(subject)()

    def _skip_subject(self, subject: str, reason: str) -> None:
        if self._seldom(f"subject:{subject}"):
            log.error("wait_subject_skipped", subject=door.escaped(subject, 300), reason=reason)

    async def _durable(self, stop: asyncio.Event) -> None:
        consumer = self.bus.subjects.wake_consumer
        while not stop.is_set():
            try:
                for msg in await self.bus.fetch(consumer, 64, wait=0.5):
                    await self._deliver_or_dead_letter(msg)
                    await msg.ack()
            except (errors.StoreUnavailable, BusUnavailable) as exc:
                log.warning("wake_stream_failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1)
            except Exception:  # a bug: the message comes back (max_deliver bounds it)
                log.exception("wake_stream_crashed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1)

    async def on_message(self, msg: Message) -> None:
        """A message on a subject some flow waits on (core NATS)."""
        try:
            await self._deliver_or_dead_letter(msg)
        except (errors.StoreUnavailable, BusUnavailable) as exc:
            log.warning("wake_message_lost", subject=msg.subject, error=str(exc))
        except errors.FlowError as exc:  # e.g. a value the database refuses
            log.warning("wake_message_refused", subject=msg.subject, error=str(exc))

    async def _deliver_or_dead_letter(self, msg: Message) -> None:
        """Wake the flows ``msg`` is for; a message that cannot wake anyone (refused at the
        door, or it hit a bug) goes to ``<prefix>.dlq.wake`` instead."""
        try:
            await self._deliver(msg)
            return
        except _Refused as exc:
            reason = exc.reason
        except (errors.StoreUnavailable, BusUnavailable):
            raise
        except Exception as exc:
            log.exception("wake_message_crashed", subject=msg.subject)
            reason = f"could not be applied: {type(exc).__name__}"
        await self.bus.dead_letter(msg, "wake", reason, _message_id(msg))
        self.metrics.inc("dead_letters_total", kind="wake")
        log.warning("wake_message_dead_lettered", subject=msg.subject, reason=reason)

    async def _deliver(self, msg: Message) -> None:
        payload, cid = _read(msg)
        if cid is None:
            log.info("wake_message_without_correlation_id", subject=msg.subject)
            return
        msg_id = _message_id(msg)
        for flow_id in await self.store.flows_waiting_on(msg.subject, cid):
            await self._resume_by_message(flow_id, msg.subject, cid, payload, msg_id)

    async def _resume_by_message(
        self, flow_id: UUID, subject: str, cid: str, payload: Any, msg_id: str
    ) -> None:
        wake = waits.wake("subject", utcnow(), subject=subject, correlation_id=cid, payload=payload)
        try:
            await self.manager.resume(
                flow_id, {"wake": wake}, cause=wake, command_id=f"{RESERVED}msg:{msg_id}:{flow_id}"
            )
            self.metrics.inc("wakes_total", cause="subject")
            log.info("flow_woken", flow_id=str(flow_id), cause="subject", subject=subject)
        except errors.StoreUnavailable:
            raise
        except errors.FlowError as exc:
            log.info("wake_skipped", flow_id=str(flow_id), cause="subject", code=exc.code)


def _read(msg: Message) -> tuple[Any, str | None]:
    """(payload, correlation id): the id from the Flowd-Correlation-Id header, else from a
    JSON body's ``correlation_id`` field; the payload is the JSON body, else its text. What
    the door refuses raises _Refused."""
    problem = waits.subject_problem(msg.subject)
    if problem is not None:  # only under <prefix>.wake.>: no flow can wait on it
        raise _Refused(f"subject {problem}")
    cid = (msg.headers or {}).get(names.CORRELATION_ID)
    if cid is not None and (problem := door.text_problem(cid, codec.MAX_ID_LENGTH)):
        raise _Refused(f"{names.CORRELATION_ID} header {problem}")
    payload: Any = None
    if msg.data:
        try:
            text = door.utf8_text(msg.data)
            try:
                payload = door.read_json(msg.data)
            except door.NotJson:
                payload = text
        except door.Unreadable as exc:
            raise _Refused(exc.reason) from None
        except errors.InvalidInput as exc:
            raise _Refused(exc.message) from None
    if cid is None and isinstance(payload, dict) and isinstance(payload.get("correlation_id"), str):
        cid = payload["correlation_id"]
    return payload, cid


def _message_id(msg: Message) -> str:
    """The message's usable Nats-Msg-Id; else, for a wake stream message, its stream
    sequence (the same on every redelivery); else a new id."""
    fallback = uuid.uuid4().hex
    if msg.reply and msg.reply.startswith("$JS.ACK."):
        fallback = f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"
    return codec.command_id(msg.headers, fallback)


async def _first(*waiters: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waiters]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
