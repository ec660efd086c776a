"""FlowManager: read -> apply (pure core) -> compare-and-set commit, with exactly one retry.

Without ``expected_revision`` a write that loses a race re-reads the flow, re-validates and
commits once more; a second loss raises ``RevisionMismatch``. With ``expected_revision`` the
caller asked for compare-and-set: a mismatch is raised at once and nothing is retried.

The read before a write may come from a small in-process cache of flows this manager wrote
last (``cache_size``; 0 turns it off). It cannot make a wrong write: the commit's revision
check rejects a stale copy exactly as it rejects a concurrent writer, and the retry reads
the row. Nor a wrong refusal: a rejection or a no-op decided on a cached copy is decided
again on the row before it is reported.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel, JsonValue, ValidationError

from flowd.core import apply, errors, owner, waits
from flowd.core.apply import Change
from flowd.core.models import (
    CreateManagedInput,
    Flow,
    FlowEvent,
    FlowStep,
    JsonObject,
    StepObservation,
)
from flowd.core.requests import Claim, owner_of, split
from flowd.core.status import FlowStatus, SyncMode
from flowd.store.port import MAX_PAGE, FlowStore

Clock = Callable[[], datetime]
#: A command id, or a ``Claim``: the id with what the command asked, so that the id used
#: again for a different request is an ``IdempotencyConflict`` (core.requests).
CommandRef = str | Claim
Step = Callable[[Flow], Change | None]
M = TypeVar("M", bound=BaseModel)


def utcnow() -> datetime:
    """The current time, UTC, microsecond precision (what PostgreSQL keeps)."""
    return datetime.now(UTC)


def _validated(model: type[M], value: object) -> M:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise errors.InvalidInput(
            f"invalid {model.__name__}: {exc.error_count()} error(s)",
            {".".join(map(str, e["loc"])) or "_": e["msg"] for e in exc.errors()},
        ) from None


class FlowManager:
    """The one API for changing flows; every method is atomic and audited."""

    def __init__(
        self,
        store: FlowStore,
        *,
        clock: Clock = utcnow,
        new_id: Callable[[], UUID] = uuid.uuid4,
        cache_size: int = 10_000,
        on_commit: Callable[[Change | None], None] | None = None,
        reserved_subjects: Sequence[str] = (),
        max_state_bytes: int | None = apply.MAX_STATE_BYTES,
    ) -> None:
        """``on_commit`` is called after every write: with the change, or None for a
        recorded outcome (a rejection, a no-op); both may have queued outbox messages.
        ``reserved_subjects``: subjects (with all under them) no subject wait may name.
        A write whose ``state_json`` would exceed ``max_state_bytes`` (serialized; None: no
        limit) is refused with ``StateTooLarge``."""
        self.store = store
        self._max_state = max_state_bytes
        self._clock = clock
        self._new_id = new_id
        self._cache: dict[UUID, Flow] = {}
        self._cache_size = cache_size
        self._on_commit = on_commit or (lambda change: None)
        self._reserved = tuple(reserved_subjects)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, flow_id: UUID) -> Flow | None:
        """The flow, or None (as the original FlowManager's ``Option<Flow>``)."""
        return await self.store.get(flow_id)

    async def require(self, flow_id: UUID) -> Flow:
        """The flow, or ``FlowNotFound``."""
        flow = await self.store.get(flow_id)
        if flow is None:
            raise errors.FlowNotFound(flow_id)
        return flow

    async def list_by_owner(
        self, owner: str, *, limit: int = 100, after: UUID | None = None
    ) -> list[Flow]:
        """Flows of one owner session, oldest first; ``after`` is the last id of a page."""
        return await self.store.list_flows(owner=owner, limit=_limit(limit), after=after)

    async def list_by_status(
        self, status: FlowStatus, *, limit: int = 100, after: UUID | None = None
    ) -> list[Flow]:
        """Flows in one status, oldest first; ``after`` is the last id of a page."""
        status = _validated_status(status)
        return await self.store.list_flows(status=status, limit=_limit(limit), after=after)

    async def list_steps(self, flow_id: UUID) -> list[FlowStep]:
        """Steps of a flow, oldest first (``FlowNotFound`` if the flow does not exist)."""
        await self.require(flow_id)
        return await self.store.list_steps(flow_id)

    async def list_events(
        self, flow_id: UUID, *, after_revision: int = -1, limit: int = MAX_PAGE
    ) -> list[FlowEvent]:
        """The audit log of a flow in revision order (``FlowNotFound`` if it does not exist)."""
        events = await self.store.list_events(
            flow_id, after_revision=after_revision, limit=_limit(limit)
        )
        if not events:
            await self.require(flow_id)
        return events

    # -- creation ----------------------------------------------------------------------------

    async def create_managed(
        self, data: CreateManagedInput | JsonObject, *, command_id: CommandRef | None = None
    ) -> Flow:
        """A new managed flow, status ``created``, revision 0."""
        return await self._create(data, SyncMode.MANAGED, command_id)

    async def create_mirrored(
        self, data: CreateManagedInput | JsonObject, *, command_id: CommandRef | None = None
    ) -> Flow:
        """A new mirrored flow, born ``running`` (events ``created`` and ``started``)."""
        return await self._create(data, SyncMode.MIRRORED, command_id)

    async def _create(
        self, data: CreateManagedInput | JsonObject, mode: SyncMode, command_id: CommandRef | None
    ) -> Flow:
        valid = _validated(CreateManagedInput, data)
        _owner_may(command_id, valid.owner_session_key)
        change = apply.create(valid, mode=mode, now=self._clock(), new_id=self._new_id)
        apply.check_state(change, None, self._max_state)
        await self._commit(change, command_id)
        return change.flow

    async def record_rejection(
        self, command_id: CommandRef, flow_id: UUID | None, token: str, error: errors.FlowError
    ) -> None:
        """Record that ``command_id`` was rejected with ``error`` (and, with the outbox on,
        announce it on ``out.<token>``). A command already processed raises DuplicateCommand
        (or IdempotencyConflict: the id was first used for a different request)."""
        cid, request = split(command_id)
        assert cid is not None
        outcome: JsonObject = {
            "status": "rejected",
            "flow_id": None if flow_id is None else str(flow_id),
            "code": error.code,
            "message": error.message,
            "details": error.details(),
        }
        await self.store.record_outcome(cid, flow_id, token, outcome, request=request)
        self._on_commit(None)

    # -- mutations ---------------------------------------------------------------------------

    async def start_running(
        self,
        flow_id: UUID,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """created -> running."""
        return await self._mutate(flow_id, expected_revision, command_id, self._op(apply.start))

    async def set_waiting(
        self,
        flow_id: UUID,
        wait_json: JsonObject,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """running -> waiting; ``wait_json`` must be a valid wait condition (core.waits).
        A kept signal that matches resumes the flow at once."""
        apply.require_object(wait_json, "wait_json")
        waits.parse(wait_json, reserved=self._reserved)

        async def wait(flow: Flow) -> Change:
            pending = tuple(await self.store.pending_signals(flow.id))
            return apply.set_waiting(
                flow, wait_json, now=self._clock(), new_id=self._new_id, pending=pending
            )

        return await self._mutate_async(flow_id, expected_revision, command_id, wait)

    async def signal(
        self,
        flow_id: UUID,
        name: str,
        payload: JsonValue = None,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """Send signal ``name``: resumes the flow if it waits for it, else the signal is kept
        (durably) and consumed by the first later wait for that name."""
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise errors.InvalidInput("signal name must be 1-200 characters", {"name": "invalid"})
        return await self._mutate(
            flow_id,
            expected_revision,
            command_id,
            lambda f: apply.signal(f, name, payload, now=self._clock(), new_id=self._new_id),
        )

    async def resume(
        self,
        flow_id: UUID,
        state_patch: JsonObject | None = None,
        *,
        expected_revision: int | None = None,
        cause: JsonObject | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """waiting -> running; clears ``wait_json`` and shallow-merges ``state_patch``."""
        if state_patch is not None:
            apply.require_object(state_patch, "state_patch")
        return await self._mutate(
            flow_id,
            expected_revision,
            command_id,
            lambda f: apply.resume(
                f, state_patch, now=self._clock(), new_id=self._new_id, cause=cause
            ),
        )

    async def finish(
        self,
        flow_id: UUID,
        final_state: JsonObject | None = None,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """running -> finished, after merging ``final_state``."""
        if final_state is not None:
            apply.require_object(final_state, "final_state")
        return await self._mutate(
            flow_id,
            expected_revision,
            command_id,
            lambda f: apply.finish(f, final_state, now=self._clock(), new_id=self._new_id),
        )

    async def fail(
        self,
        flow_id: UUID,
        reason: str,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """running | waiting -> failed; ``state_json.failure = {reason, at}``."""
        return await self._mutate(
            flow_id,
            expected_revision,
            command_id,
            lambda f: apply.fail(f, reason, now=self._clock(), new_id=self._new_id),
        )

    async def request_cancel(
        self,
        flow_id: UUID,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
        token: str | None = None,
    ) -> Flow:
        """Set the sticky cancel intent (status unchanged). A repeat, or a flow that is already
        terminal, writes nothing: the outcome is ``unchanged`` (announced on ``out.<token>``,
        default the flow id)."""
        return await self._mutate(
            flow_id, expected_revision, command_id, self._op(apply.request_cancel), token
        )

    async def cancel(
        self,
        flow_id: UUID,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """Any non-terminal status -> cancelled."""
        return await self._mutate(flow_id, expected_revision, command_id, self._op(apply.cancel))

    async def update_state(
        self,
        flow_id: UUID,
        patch: JsonObject,
        next_step: str | None = None,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
    ) -> Flow:
        """Shallow-merge ``patch``, optionally set ``current_step``; status unchanged."""
        apply.require_object(patch, "patch")
        return await self._mutate(
            flow_id,
            expected_revision,
            command_id,
            lambda f: apply.update_state(
                f, patch, next_step, now=self._clock(), new_id=self._new_id
            ),
        )

    async def record_step_observation(
        self,
        obs: StepObservation | JsonObject,
        *,
        expected_revision: int | None = None,
        command_id: CommandRef | None = None,
        token: str | None = None,
    ) -> FlowStep:
        """Upsert the step ``(flow_id, run_id)``; a late non-terminal report never overwrites
        a terminal step (``unchanged``, announced on ``out.<token>``). Accepted on terminal
        flows too."""
        valid = _validated(StepObservation, obs)
        result: list[FlowStep | None] = [None]

        async def observe(flow: Flow) -> Change | None:
            existing = await self.store.get_step(flow.id, valid.run_id)
            change = apply.observe_step(
                flow, existing, valid, now=self._clock(), new_id=self._new_id
            )
            result[0] = change.step if change is not None else existing
            return change

        await self._mutate_async(valid.flow_id, expected_revision, command_id, observe, token)
        step = result[0]
        assert step is not None
        return step

    # -- the template ------------------------------------------------------------------------

    def _op(self, fn: Callable[..., Change | None]) -> Step:
        return lambda flow: fn(flow, now=self._clock(), new_id=self._new_id)

    async def _mutate(
        self,
        flow_id: UUID,
        expected: int | None,
        command_id: CommandRef | None,
        step: Step,
        token: str | None = None,
    ) -> Flow:
        async def run(flow: Flow) -> Change | None:
            return step(flow)

        return await self._mutate_async(flow_id, expected, command_id, run, token)

    async def _mutate_async(
        self,
        flow_id: UUID,
        expected: int | None,
        command_id: CommandRef | None,
        step: Callable[[Flow], Awaitable[Change | None]],
        token: str | None = None,
    ) -> Flow:
        """Read, apply ``step``, write with the revision check (see the class docstring).
        ``token``: the subject token an ``unchanged`` outcome is announced under."""
        attempts = 1 if expected is not None else 2
        flow = self._cache.get(flow_id)
        while True:
            cached = flow is not None
            if flow is None:
                flow = await self.require(flow_id)
            _owner_may(command_id, flow.owner_session_key)  # (it never changes)
            try:
                if expected is not None and flow.revision != expected:
                    raise errors.RevisionMismatch(flow_id, expected, flow.revision)
                change = await step(flow)
                change = change and apply.check_state(change, flow, self._max_state)
            except errors.StoreUnavailable:
                raise
            except errors.FlowError:
                if not cached:
                    raise
                change = None
            if change is None:
                if cached:
                    # refused, or nothing to do, says the copy (perhaps only the copy is
                    # old): ask the row
                    flow = None
                    continue
                await self._unchanged(flow, command_id, token)
                return flow
            try:
                await self._commit(change, command_id)
            except (errors.RevisionMismatch, errors.FlowNotFound) as exc:
                self._cache.pop(flow_id, None)
                if not cached:  # lost on the row itself: a race, retried once
                    if isinstance(exc, errors.FlowNotFound) or attempts == 1:
                        raise
                    attempts -= 1
                flow = None  # (an old copy costs a read, not the retry)
                continue
            return change.flow

    async def _unchanged(
        self, flow: Flow, command_id: CommandRef | None, token: str | None
    ) -> None:
        """Record that ``command_id`` changed nothing (its outcome names the revision)."""
        cid, request = split(command_id)
        if cid is not None:
            outcome: JsonObject = {
                "status": "unchanged",
                "flow_id": str(flow.id),
                "revision": flow.revision,
            }
            await self.store.record_outcome(
                cid, flow.id, token or str(flow.id), outcome, request=request
            )
            self._on_commit(None)

    async def _commit(self, change: Change, command_id: CommandRef | None) -> None:
        """Write ``change``; keep the flow as it is now for the next write (unless it ended:
        a terminal flow takes no more changes)."""
        cid, request = split(command_id)
        await self.store.commit(change, command_id=cid, request=request)
        flow = change.flow
        if flow.status.terminal or not self._cache_size:
            self._cache.pop(flow.id, None)
        elif (known := self._cache.pop(flow.id, None)) is None or known.revision < flow.revision:
            self._cache[flow.id] = flow  # (re)inserted last: the oldest entry goes first
            if len(self._cache) > self._cache_size:
                del self._cache[next(iter(self._cache))]
        else:
            self._cache[flow.id] = known
        self._on_commit(change)


def _owner_may(command_id: CommandRef | None, owner_session_key: str) -> None:
    """``Forbidden`` if the command proved it acts for an owner other than the flow's."""
    if (claimed := owner_of(command_id)) is not None:
        owner.require_owner(claimed, owner_session_key)


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise errors.InvalidInput(
            f"limit must be an integer from 1 to {MAX_PAGE}", {"limit": "out of range"}
        )
    return limit


def _validated_status(status: object) -> FlowStatus:
    try:
        return FlowStatus(str(status))
    except ValueError:
        raise errors.InvalidInput(f"unknown status {status!r}", {"status": "unknown"}) from None
