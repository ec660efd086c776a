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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from flowd.bus import subjects as names
from flowd.bus.codec import RESERVED
from flowd.bus.nats import BusUnavailable, Message, NatsBus
from flowd.core import errors, waits
from flowd.daemon.health import Metrics
from flowd.manager import FlowManager, utcnow
from flowd.store.port import Due

log = structlog.get_logger("flowd.waits")


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
            await asyncio.gather(*(self._fire(d) for d in due))
        return len(due)

    async def _timers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.tick() >= self.batch:
                    continue  # more are due: no pause
            except errors.StoreUnavailable as exc:
                log.warning("wait_tick_failed", error=str(exc))
            except Exception:  # a bug must not stop every timer (nor the daemon)
                log.exception("wait_tick_crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.tick_interval)

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
                    wanted = {
                        s for s in await self.store.wait_subjects() if not s.startswith(durable)
                    }
                    for subject in wanted - self._listening.keys():
                        self._listening[subject] = await self.bus.listen(
                            subject, self.bus.subjects.wake_queue, self.on_message
                        )
                    for subject in self._listening.keys() - wanted:
                        await self._listening.pop(subject)()
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

    async def _durable(self, stop: asyncio.Event) -> None:
        consumer = self.bus.subjects.wake_consumer
        while not stop.is_set():
            try:
                for msg in await self.bus.fetch(consumer, 64, wait=0.5):
                    try:
                        await self._deliver(msg)
                    except errors.StoreUnavailable:
                        raise  # it stays, and comes back after its ack wait
                    except errors.FlowError as exc:  # e.g. a value the database refuses
                        log.warning("wake_message_refused", subject=msg.subject, error=str(exc))
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
            await self._deliver(msg)
        except errors.StoreUnavailable as exc:
            log.warning("wake_message_lost", subject=msg.subject, error=str(exc))
        except errors.FlowError as exc:  # e.g. a value the database refuses
            log.warning("wake_message_refused", subject=msg.subject, error=str(exc))

    async def _deliver(self, msg: Message) -> None:
        payload, cid = _read(msg)
        if cid is None:
            log.info("wake_message_without_correlation_id", subject=msg.subject)
            return
        msg_id = (msg.headers or {}).get(names.MSG_ID) or uuid.uuid4().hex
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
    JSON body's ``correlation_id`` field."""
    payload: Any
    try:
        payload = json.loads(msg.data) if msg.data else None
    except ValueError:
        payload = msg.data.decode(errors="replace")
    cid = (msg.headers or {}).get(names.CORRELATION_ID)
    if cid is None and isinstance(payload, dict) and isinstance(payload.get("correlation_id"), str):
        cid = payload["correlation_id"]
    return payload, cid


async def _first(*waiters: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waiters]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
