"""Dispatcher: one fetched batch of commands or observations -> manager -> outcome -> ack.

Per message the path is: decode (bus.codec) -> ``execute`` (FlowManager, idempotent by command
id, outboxed) -> ack. Messages of one flow run one after another in stream order; different
flows run concurrently, bounded by a semaphore. How each ending maps to ack / dead letter is
decided here in one place (``_handle``):

- applied, unchanged, duplicate -> ack (the outcome is in the outbox already);
- rejected (a FlowError) -> record the rejection (outboxed ``out.<token>`` message) -> ack;
- undecodable, or delivered too often without an outcome -> dead letter -> ack;
- PostgreSQL unreachable -> retried in place with backoff, the message kept in progress; it
  is never dead-lettered and never overtaken by a later message of the same flow. Only on
  shutdown is it nak'd, for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from flowd.bus import codec
from flowd.bus.nats import BusUnavailable, Message, NatsBus
from flowd.core import errors
from flowd.core.models import Flow, FlowStep, JsonObject, StepObservation
from flowd.core.outbox import snapshot
from flowd.daemon.health import Metrics
from flowd.manager import FlowManager

log = structlog.get_logger("flowd.dispatch")
Kind = Literal["cmd", "obs"]


async def execute(manager: FlowManager, cmd: codec.Decoded) -> Flow | FlowStep:
    """Apply one decoded command through the manager (the path shared with the API)."""
    body: Any = cmd.body
    cid = cmd.command_id
    if cmd.verb == "create":
        create = manager.create_mirrored if body.sync_mode == "mirrored" else manager.create_managed
        return await create(body.input(), command_id=cid)
    if cmd.verb == "observe":
        obs = StepObservation.model_validate(
            {**body.model_dump(exclude={"flow_id"}), "flow_id": cmd.flow_id}
        )
        return await manager.record_step_observation(obs, command_id=cid)
    assert cmd.flow_id is not None
    fid, opts = cmd.flow_id, {"expected_revision": body.expected_revision, "command_id": cid}
    match cmd.verb:
        case "start":
            return await manager.start_running(fid, **opts)
        case "wait":
            return await manager.set_waiting(fid, body.wait_json, **opts)
        case "resume":
            return await manager.resume(fid, body.state_patch, **opts)
        case "finish":
            return await manager.finish(fid, body.final_state, **opts)
        case "fail":
            return await manager.fail(fid, body.reason, **opts)
        case "request_cancel":
            return await manager.request_cancel(fid, **opts)
        case "cancel":
            return await manager.cancel(fid, **opts)
        case "update":
            return await manager.update_state(fid, body.patch, body.next_step, **opts)
        case "signal":
            return await manager.signal(fid, body.name, body.payload, **opts)
    raise AssertionError(f"unhandled verb {cmd.verb}")  # codec.BODIES and this match agree


def result_json(result: Flow | FlowStep) -> JsonObject:
    """A manager result as JSON for replies."""
    if isinstance(result, Flow):
        return snapshot(result)
    data: JsonObject = result.model_dump(mode="json")
    return data


class Dispatcher:
    """Applies batches of JetStream messages; see the module docstring for the rules."""

    def __init__(
        self,
        manager: FlowManager,
        bus: NatsBus,
        metrics: Metrics,
        *,
        concurrency: int,
        max_payload: int,
        max_deliver: int,
        wake_relay: Callable[[], None],
        stopping: asyncio.Event,
    ) -> None:
        self.manager = manager
        self.bus = bus
        self.metrics = metrics
        self.max_payload = max_payload
        self.max_deliver = max_deliver
        self._wake_relay = wake_relay
        self._stopping = stopping
        self._slots = asyncio.Semaphore(concurrency)

    async def handle_batch(
        self,
        kind: Kind,
        msgs: list[Message],
        *,
        partitioned: bool = False,
        abort: asyncio.Event | None = None,
    ) -> None:
        """Apply ``msgs``: per flow in order, across flows concurrently. ``partitioned``:
        the stored subjects carry a partition token after ``cmd``/``obs``. ``abort``: set
        when this process lost the partition; unfinished messages are handed back."""
        lanes: dict[str, list[tuple[Message, codec.Decoded | Exception]]] = {}
        prefix_len = len(self.bus.subjects.prefix) + 1 + len(kind) + 1
        skip = 1 if partitioned else 0
        for msg in msgs:
            meta = msg.metadata
            fallback = f"{meta.stream}:{meta.sequence.stream}"
            decoded: codec.Decoded | Exception
            try:
                ok = codec.decode(
                    kind,
                    msg.subject[prefix_len:].split(".")[skip:],
                    msg.headers,
                    msg.data,
                    fallback_id=fallback,
                    max_payload=self.max_payload,
                )
                decoded, key = ok, str(ok.flow_id) if ok.flow_id else ok.command_id
            except codec.Rejected as exc:
                decoded, key = exc, exc.token
            except codec.Undecodable as exc:
                decoded, key = exc, fallback
            lanes.setdefault(key, []).append((msg, decoded))
        stop = _any_event(self._stopping, abort)
        await asyncio.gather(*(self._lane(kind, lane, stop) for lane in lanes.values()))
        self._wake_relay()

    async def _lane(
        self,
        kind: Kind,
        lane: list[tuple[Message, codec.Decoded | Exception]],
        stop: Callable[[], bool],
    ) -> None:
        async with self._slots:
            for i, (msg, decoded) in enumerate(lane):
                if stop() and isinstance(decoded, codec.Decoded):
                    # Shutting down mid-lane: hand the rest back, in order, untouched.
                    for rest, _ in lane[i:]:
                        await _settle(rest.nak())
                    return
                if not await self._handle(kind, msg, decoded, stop):
                    # This message goes back for redelivery; so must every later message
                    # of its flow, or they would overtake it.
                    for rest, _ in lane[i + 1 :]:
                        await _settle(rest.nak(delay=1))
                    return

    async def _handle(
        self,
        kind: Kind,
        msg: Message,
        decoded: codec.Decoded | Exception,
        stop: Callable[[], bool],
    ) -> bool:
        """Settle one message; False if it was handed back for redelivery."""
        started = time.perf_counter()
        delivered = msg.metadata.num_delivered
        cid = decoded.command_id if isinstance(decoded, codec.Decoded | codec.Rejected) else None
        bound = log.bind(
            subject=msg.subject,
            command_id=cid,
            flow_id=str(decoded.flow_id) if isinstance(decoded, codec.Decoded) else None,
            delivered=delivered,
        )
        if isinstance(decoded, codec.Undecodable):
            return await self._dead_letter(kind, msg, decoded.reason, bound)
        if delivered >= self.max_deliver:
            reason = f"delivered {delivered} times without an outcome"
            return await self._dead_letter(kind, msg, reason, bound)
        if isinstance(decoded, codec.Rejected):
            done = await self._with_store(
                msg,
                bound,
                stop,
                lambda: self.manager.record_rejection(
                    decoded.command_id, decoded.flow_id, decoded.token, decoded.error
                ),
            )
            if done:
                self._count_rejection(decoded.error.code, bound, decoded.error.message)
                await _settle(msg.ack())
            return done
        assert isinstance(decoded, codec.Decoded)
        return await self._apply(kind, msg, decoded, bound, started, stop)

    async def _apply(
        self,
        kind: Kind,
        msg: Message,
        cmd: codec.Decoded,
        bound: Any,
        started: float,
        stop: Callable[[], bool],
    ) -> bool:
        outcome: list[str] = []

        async def attempt() -> None:
            try:
                result = await execute(self.manager, cmd)
                outcome.append("applied")
                revision = result.revision if isinstance(result, Flow) else None
                bound.info("command_applied", verb=cmd.verb, revision=revision)
            except errors.DuplicateCommand:
                outcome.append("duplicate")
                bound.info("command_duplicate", verb=cmd.verb)
            except errors.StoreUnavailable:
                raise
            except errors.FlowError as exc:
                token = cmd.token
                await self.manager.record_rejection(cmd.command_id, cmd.flow_id, token, exc)
                outcome.append("rejected")
                self._count_rejection(exc.code, bound, exc.message, verb=cmd.verb)

        try:
            done = await self._with_store(msg, bound, stop, attempt)
        except errors.DuplicateCommand:  # the rejection raced a duplicate: same thing
            done, outcome[:] = True, ["duplicate"]
        except Exception:
            # A bug, not bad input: log it and let JetStream redeliver; after max_deliver
            # deliveries the message is dead-lettered instead of blocking its flow forever.
            bound.exception("command_crashed", verb=cmd.verb)
            self.metrics.inc("commands_crashed_total", kind=kind)
            await _settle(msg.nak(delay=min(30, 2**msg.metadata.num_delivered)))
            return False
        if not done:
            return False
        await _settle(msg.ack())
        status = outcome[0] if outcome else "applied"
        if status == "applied":
            self.metrics.inc("commands_applied_total", kind=kind, verb=cmd.verb)
        elif status == "duplicate":
            self.metrics.inc("commands_duplicate_total", kind=kind)
        self.metrics.observe("command_seconds", time.perf_counter() - started)
        return True

    async def _with_store(
        self, msg: Message, bound: Any, stop: Callable[[], bool], call: Callable[[], Any]
    ) -> bool:
        """Run ``call`` until PostgreSQL answers; False if we stopped before it did."""
        delay = 0.05
        while True:
            try:
                await call()
                return True
            except errors.StoreUnavailable as exc:
                self.metrics.inc("store_unavailable_total")
                bound.warning("store_unavailable", error=str(exc), retry_in=delay)
                if stop():
                    await _settle(msg.nak(delay=1))
                    return False
                await _settle(msg.in_progress())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                delay = min(delay * 2, 2.0)

    async def _dead_letter(self, kind: Kind, msg: Message, reason: str, bound: Any) -> bool:
        meta = msg.metadata
        cid = codec.command_id(msg.headers, f"{meta.stream}:{meta.sequence.stream}")
        while True:
            try:
                await self.bus.dead_letter(msg, kind, reason, cid)
                break
            except BusUnavailable:
                if self._stopping.is_set():
                    return False  # not acked: redelivered after restart
                await asyncio.sleep(0.5)
        await _settle(msg.ack())
        self.metrics.inc("dead_letters_total", kind=kind)
        bound.warning("command_dead_lettered", reason=reason)
        return True

    def _count_rejection(self, code: str, bound: Any, message: str, verb: str = "") -> None:
        self.metrics.inc("commands_rejected_total", code=code)
        bound.info("command_rejected", code=code, message=message, verb=verb or None)


def _any_event(*events: asyncio.Event | None) -> Callable[[], bool]:
    return lambda: any(e.is_set() for e in events if e is not None)


async def _settle(ack: Any) -> None:
    """Send an ack/nak/progress; a lost connection only means JetStream redelivers."""
    try:
        await ack
    except Exception as exc:  # nats raises several unrelated types here
        log.warning("ack_failed", error=repr(exc))
