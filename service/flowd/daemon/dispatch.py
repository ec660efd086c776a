"""Dispatcher: commands or observations as they are pulled -> manager -> outcome -> ack.

Per message the path is: decode (bus.codec) -> ``execute`` (FlowManager, idempotent by command
id, outboxed) -> ack. Messages of one flow run one after another in stream order (a lane);
different flows run concurrently, bounded by a semaphore. How each ending maps to ack / dead
letter is decided here in one place (``_handle``):

- applied, unchanged, duplicate (its id and request seen before) -> ack (the outcome is in
  the outbox already);
- rejected (a FlowError) -> record the rejection (outboxed ``out.<token>`` message) -> ack;
- its id first used for a different request, or no proof of its owner -> an
  ``idempotency_conflict`` / ``forbidden`` outcome published
  at once (not recorded: the id is the first use's) -> ack;
- undecodable, or delivered too often without an outcome -> dead letter -> ack;
- PostgreSQL unreachable (or read-only, or another "not now" error) -> retried in place with
  backoff, the message kept in progress; it is never dead-lettered and never overtaken by a
  later message of the same flow. Only when stopping (shutdown, or the partition moved away)
  is it handed back, with the rest of its lane, in stream order;
- a crash (a bug while applying it) -> a best-effort ``internal`` rejection recorded as its
  outcome, then a dead letter with the exception's type -> ack; its flow's later messages
  follow it in order, as after any other outcome.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog

from flowd.bus import codec
from flowd.bus.nats import BusUnavailable, Message, NatsBus
from flowd.core import errors
from flowd.core.models import Flow, FlowStep, JsonObject, StepObservation
from flowd.core.outbox import OutboxMessage, snapshot
from flowd.daemon.health import Metrics
from flowd.manager import FlowManager

log = structlog.get_logger("flowd.dispatch")
Kind = Literal["cmd", "obs"]
#: How handling a message ended: settled (acked, or dead-lettered and acked), or to be handed
#: back (stopping).
Ending = Literal["settled", "back"]
Lane = collections.deque[tuple[Message, codec.Decoded | Exception]]


async def execute(manager: FlowManager, cmd: codec.Decoded) -> Flow | FlowStep:
    """Apply one decoded command through the manager (the path shared with the API)."""
    body: Any = cmd.body
    cid = cmd.claim
    if cmd.verb == "create":
        create = manager.create_mirrored if body.sync_mode == "mirrored" else manager.create_managed
        return await create(body.input(), command_id=cid)
    if cmd.verb == "observe":
        obs = StepObservation.model_validate(
            {**body.model_dump(exclude={"flow_id"}), "flow_id": cmd.flow_id}
        )
        return await manager.record_step_observation(obs, command_id=cid, token=cmd.token)
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
            return await manager.request_cancel(fid, **opts, token=cmd.token)
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
    """Applies JetStream messages as they arrive; see the module docstring for the rules."""

    def __init__(
        self,
        manager: FlowManager,
        bus: NatsBus,
        metrics: Metrics,
        *,
        concurrency: int,
        max_payload: int,
        max_deliver: int,
        stopping: asyncio.Event,
        owners: codec.Owners | None = None,
    ) -> None:
        self.manager = manager
        self.bus = bus
        self.metrics = metrics
        self.max_payload = max_payload
        self.owners = owners
        self.max_deliver = max_deliver
        self._stopping = stopping
        self._slots = asyncio.Semaphore(concurrency)

    async def consume(
        self,
        kind: Kind,
        durable: str,
        *,
        batch: int,
        partitioned: bool = False,
        release: asyncio.Event | None = None,
        drain: bool = False,
    ) -> None:
        """Fetch and apply ``durable``'s messages until stopped, or ``release``d (this process
        lost the partition: unfinished messages are handed back), or, with ``drain``, until
        nothing is pending. Fetching never waits for applying: what arrives joins its flow's
        lane at once, up to ``batch`` messages in flight (the consumer's max_ack_pending).
        ``partitioned``: the stored subjects carry a partition token after ``cmd``/``obs``."""
        stop = _any_event(self._stopping, release)
        lanes = _Lanes(self, kind, stop)
        # the subject's tokens after "<prefix>.<kind>." (and the partition token, if any)
        path_at, first_token = len(self.bus.subjects.prefix) + len(kind) + 2, int(partitioned)
        try:
            while not stop():
                try:
                    if lanes.in_flight >= batch:
                        await lanes.wait_for_room(timeout=0.5)
                        continue
                    msgs = await self.bus.fetch(durable, batch, wait=0.5, idle=lanes.idle)
                    for msg in msgs:
                        lanes.add(*self._decode(kind, msg, path_at, first_token), msg)
                    idle = drain and not msgs and lanes.idle
                    if idle and await self.bus.pending(durable) == (0, 0):
                        return
                except BusUnavailable as exc:
                    log.warning("nats_unavailable", error=str(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), timeout=1)
        finally:
            await lanes.join()
            await self.bus.relinquish(durable, lanes.handed_back)

    def _decode(
        self, kind: Kind, msg: Message, path_at: int, first_token: int
    ) -> tuple[str, codec.Decoded | Exception]:
        """Its lane (its flow, else its command id) and the message decoded, or why not."""
        meta = msg.metadata
        fallback = codec.fallback_id(meta.stream, meta.sequence.stream)
        try:
            ok = codec.decode(
                kind,
                msg.subject[path_at:].split(".")[first_token:],
                msg.headers,
                msg.data,
                fallback_id=fallback,
                max_payload=self.max_payload,
                owners=self.owners,
            )
            return (str(ok.flow_id) if ok.flow_id else ok.command_id), ok
        except codec.Rejected as exc:
            return exc.token, exc
        except codec.Undecodable as exc:
            return fallback, exc
        except Exception as exc:  # a bug in decoding: this message, not the consumer, pays
            log.exception("decode_crashed", subject=msg.subject)
            return fallback, codec.Undecodable(f"could not be decoded: {type(exc).__name__}")

    async def run_lane(
        self,
        kind: Kind,
        lane: Lane,
        stop: Callable[[], bool],
        settled: Callable[[], None],
        hand_back: Callable[[Message], None],
    ) -> None:
        """Settle ``lane``: one flow's messages in stream order (it may grow meanwhile).
        Stopping, the unsettled rest goes to ``hand_back``, which returns it to JetStream
        in stream order once nothing more can arrive (``consume``)."""
        async with self._slots:
            while lane:
                msg, decoded = lane[0]
                if stop() and isinstance(decoded, codec.Decoded):
                    break
                ending = await self._handle(kind, msg, decoded, stop)
                if ending == "back":
                    break  # interrupted by the stop (PostgreSQL or NATS away): back it goes
                lane.popleft()
                settled()
            while lane:
                hand_back(lane.popleft()[0])
                settled()

    async def _handle(
        self,
        kind: Kind,
        msg: Message,
        decoded: codec.Decoded | Exception,
        stop: Callable[[], bool],
    ) -> Ending:
        """Settle one message, or say why not (see ``Ending``)."""
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
            return await self._dead_letter(kind, msg, decoded.reason, bound, stop)
        if delivered >= self.max_deliver:
            reason = f"delivered {delivered} times without an outcome"
            return await self._dead_letter(kind, msg, reason, bound, stop)
        try:
            if isinstance(decoded, codec.Rejected):
                return await self._reject(msg, decoded, bound, stop)
            assert isinstance(decoded, codec.Decoded)
            return await self._apply(kind, msg, decoded, bound, started, stop)
        except (errors.IdempotencyConflict, errors.Forbidden) as exc:
            assert isinstance(decoded, codec.Decoded | codec.Rejected)
            return await self._unrecorded(msg, decoded, exc, bound, stop)
        except Exception as exc:
            assert isinstance(decoded, codec.Decoded | codec.Rejected)
            return await self._crashed(kind, msg, decoded, exc, bound, stop)

    async def _reject(
        self, msg: Message, decoded: codec.Rejected, bound: Any, stop: Callable[[], bool]
    ) -> Ending:
        if isinstance(decoded.error, errors.Forbidden):
            raise decoded.error  # not recorded (``_unrecorded``)
        try:
            done = await self._with_store(
                msg,
                bound,
                stop,
                lambda: self.manager.record_rejection(
                    decoded.claim, decoded.flow_id, decoded.token, decoded.error
                ),
            )
        except errors.DuplicateCommand:  # recorded before (a redelivery, a re-publish)
            done = True
        if not done:
            return "back"
        self._count_rejection(decoded.error.code, bound, decoded.error.message)
        await _settle(msg.ack())
        return "settled"

    async def _apply(
        self,
        kind: Kind,
        msg: Message,
        cmd: codec.Decoded,
        bound: Any,
        started: float,
        stop: Callable[[], bool],
    ) -> Ending:
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
            except (errors.StoreUnavailable, errors.IdempotencyConflict, errors.Forbidden):
                raise
            except errors.FlowError as exc:
                await self.manager.record_rejection(cmd.claim, cmd.flow_id, cmd.token, exc)
                outcome.append("rejected")
                self._count_rejection(exc.code, bound, exc.message, verb=cmd.verb)

        try:
            done = await self._with_store(msg, bound, stop, attempt)
        except errors.DuplicateCommand:  # the rejection raced a duplicate: same thing
            done, outcome[:] = True, ["duplicate"]
        if not done:
            return "back"
        await _settle(msg.ack())
        status = outcome[0] if outcome else "applied"
        if status == "applied":
            self.metrics.inc("commands_applied_total", kind=kind, verb=cmd.verb)
        elif status == "duplicate":
            self.metrics.inc("commands_duplicate_total", kind=kind)
        self.metrics.observe("command_seconds", time.perf_counter() - started)
        return "settled"

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
                    return False  # the lane hands it back
                await _settle(msg.in_progress())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                delay = min(delay * 2, 2.0)

    async def _unrecorded(
        self,
        msg: Message,
        cmd: codec.Decoded | codec.Rejected,
        exc: errors.IdempotencyConflict | errors.Forbidden,
        bound: Any,
        stop: Callable[[], bool],
    ) -> Ending:
        """A rejection that must not take the command id: ``idempotency_conflict`` (the id
        is its first use's) or ``forbidden`` (whoever cannot prove to be the owner must not
        be able to block the owner's ids). Answered on ``out.<token>`` under the message's
        own ``Nats-Msg-Id`` (``out-`` and its fallback id: one answer per stream message)."""
        meta = msg.metadata
        body: JsonObject = {
            "command_id": cmd.command_id,
            "status": "rejected",
            "flow_id": None if cmd.flow_id is None else str(cmd.flow_id),
            "code": exc.code,
            "message": exc.message,
            "details": exc.details(),
        }
        answer = OutboxMessage(
            f"out.{cmd.token}",
            "out-" + codec.fallback_id(meta.stream, meta.sequence.stream),
            cmd.command_id,
            body,
        )
        if not await _until_sent(lambda: self.bus.publish_outcome(answer), stop):
            return "back"
        await _settle(msg.ack())
        self._count_rejection(exc.code, bound, exc.message)
        return "settled"

    async def _crashed(
        self,
        kind: Kind,
        msg: Message,
        cmd: codec.Decoded | codec.Rejected,
        exc: Exception,
        bound: Any,
        stop: Callable[[], bool],
    ) -> Ending:
        """A bug while handling it: it is dead-lettered now, with the exception's type and
        the start of its message, so it neither crash-loops nor holds its flow up (its
        flow's later messages follow it, in order). First, best effort, its publisher gets
        an ``internal`` rejection as its outcome (recorded: ``P.out`` and ``P.api.outcome``)."""
        bound.exception("command_crashed")
        self.metrics.inc("commands_crashed_total", kind=kind)
        what = type(exc).__name__
        internal = errors.Internal(
            f"flowd failed to apply this command ({what}; a bug, logged): it was dead-lettered",
            {"error": what},
        )
        try:
            await self.manager.record_rejection(cmd.claim, cmd.flow_id, cmd.token, internal)
        except Exception as failed:  # already recorded, or the store failed too
            bound.warning("crash_outcome_not_recorded", error=type(failed).__name__)
        reason = f"crashed applying it: {what}: {str(exc)[:200]}"
        return await self._dead_letter(kind, msg, reason, bound, stop)

    async def _dead_letter(
        self, kind: Kind, msg: Message, reason: str, bound: Any, stop: Callable[[], bool]
    ) -> Ending:
        meta = msg.metadata
        cid = codec.command_id(msg.headers, codec.fallback_id(meta.stream, meta.sequence.stream))
        if not await _until_sent(lambda: self.bus.dead_letter(msg, kind, reason, cid), stop):
            return "back"
        await _settle(msg.ack())
        self.metrics.inc("dead_letters_total", kind=kind)
        bound.warning("command_dead_lettered", reason=reason)
        return "settled"

    def _count_rejection(self, code: str, bound: Any, message: str, verb: str = "") -> None:
        self.metrics.inc("commands_rejected_total", code=code)
        bound.info("command_rejected", code=code, message=message, verb=verb or None)


class _Lanes:
    """The messages of one consumer in flight: one lane (a task) per flow."""

    def __init__(self, dispatcher: Dispatcher, kind: Kind, stop: Callable[[], bool]) -> None:
        self._dispatcher = dispatcher
        self._kind = kind
        self._stop = stop
        self._lanes: dict[str, Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.handed_back: list[Message] = []
        #: Messages taken and not yet settled (acked, nak'd or handed back): every message
        #: leaves its lane through ``_settled``.
        self.in_flight = 0

    @property
    def idle(self) -> bool:
        return not self._lanes

    def add(self, key: str, decoded: codec.Decoded | Exception, msg: Message) -> None:
        self.in_flight += 1
        if (lane := self._lanes.get(key)) is not None:
            lane.append((msg, decoded))  # its flow's lane is running: it comes next
            return
        lane = self._lanes[key] = collections.deque([(msg, decoded)])
        task = self._loop.create_task(self._run(key, lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: str, lane: Lane) -> None:
        try:
            await self._dispatcher.run_lane(
                self._kind, lane, self._stop, self._settled, self.handed_back.append
            )
        except Exception:  # a bug: its messages go back, in order, after a backoff
            log.exception("lane_crashed", lane=key, unsettled=len(lane))
            await _nak_all(lane, 1, self._settled)
        finally:
            # No await since the lane was last seen empty: a message added from here on
            # starts a new lane, which runs after this one.
            del self._lanes[key]

    def _settled(self) -> None:
        self.in_flight -= 1
        self._room.set()

    async def wait_for_room(self, timeout: float) -> None:
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout)

    async def join(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _nak_all(lane: Lane, delay: float, settled: Callable[[], None]) -> None:
    """Nak what is left in ``lane``, in order, each back after ``delay`` seconds."""
    while lane:
        await _settle(lane[0][0].nak(delay=delay))
        lane.popleft()
        settled()


async def _until_sent(send: Callable[[], Awaitable[None]], stop: Callable[[], bool]) -> bool:
    """``send()`` until NATS takes it; False if we stopped first (the message goes back)."""
    while True:
        try:
            await send()
            return True
        except BusUnavailable:
            if stop():
                return False
            await asyncio.sleep(0.5)


def _any_event(*events: asyncio.Event | None) -> Callable[[], bool]:
    return lambda: any(e.is_set() for e in events if e is not None)


async def _settle(ack: Any) -> None:
    """Send an ack/nak/progress; a lost connection only means JetStream redelivers."""
    try:
        await ack
    except Exception as exc:  # nats raises several unrelated types here
        log.warning("ack_failed", error=repr(exc))
