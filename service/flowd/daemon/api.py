"""The request/reply API on ``<prefix>.api.*``: queries, and mutations with a typed reply.

Mutations take the same path as JetStream commands (decode -> ``dispatch.execute``), so they
are idempotent by ``Nats-Msg-Id`` and their events leave through the outbox like any other.
Every request gets exactly one reply: ``{"ok": true, "result": …}`` or
``{"ok": false, "error": {code, message, details}}`` plus the Nats-Service-Error headers.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated, Any, TypeVar
from uuid import UUID

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowd.bus import codec
from flowd.bus import subjects as names
from flowd.bus.nats import Message, NatsBus, wire_size
from flowd.core import errors
from flowd.core.models import JsonObject
from flowd.core.outbox import snapshot
from flowd.core.requests import Claim
from flowd.core.status import FlowStatus
from flowd.daemon.dispatch import execute, result_json
from flowd.daemon.health import Metrics
from flowd.manager import FlowManager

log = structlog.get_logger("flowd.api")
M = TypeVar("M", bound=BaseModel)


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GetRequest(_Req):
    flow_id: UUID


class ListRequest(_Req):
    owner: str | None = Field(default=None, strict=True)
    status: FlowStatus | None = None
    limit: int = Field(default=100, strict=True, ge=1, le=1000)
    after: UUID | None = None


class EventsRequest(_Req):
    flow_id: UUID
    after_revision: int = Field(default=-1, strict=True, ge=-1)
    limit: int = Field(default=1000, strict=True, ge=1, le=1000)


class OutcomeRequest(_Req):
    command_id: str = Field(strict=True, min_length=1, max_length=codec.MAX_ID_LENGTH)


class ParkedListRequest(_Req):
    limit: int = Field(default=1000, strict=True, ge=1, le=1000)


#: An outbox row id (PostgreSQL bigint).
RowId = Annotated[int, Field(strict=True, ge=1, le=2**63 - 1)]


class ParkedRetryRequest(_Req):
    id: RowId


class ParkedSkipRequest(_Req):
    id: RowId
    reason: str = Field(strict=True, min_length=1, max_length=1000)

    @field_validator("reason")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        # It becomes a NATS header value: no control characters, nothing UTF-8 cannot hold.
        if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in value):
            raise ValueError("must not contain control characters or lone surrogates")
        return value


class NotParked(errors.FlowError):
    """No parked outbox row has this id."""

    code = "not_found"

    def __init__(self, row_id: int) -> None:
        self.row_id = row_id
        super().__init__(f"no parked outbox row {row_id}")

    def details(self) -> dict[str, Any]:
        return {"id": self.row_id}


class Api:
    """Serves ``<prefix>.api.>``."""

    def __init__(
        self,
        manager: FlowManager,
        bus: NatsBus,
        metrics: Metrics,
        *,
        max_payload: int,
        concurrency: int = 64,
        owners: codec.Owners | None = None,
    ) -> None:
        self.manager = manager
        self.bus = bus
        self.metrics = metrics
        self.max_payload = max_payload
        self.owners = owners
        self.concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.bus.serve(self.bus.subjects.api_all, self.admit)

    async def admit(self, msg: Message) -> None:
        """Serve ``msg`` in a task of its own (a slow request delays no other), up to
        ``concurrency`` at once; beyond that, reply ``busy`` at once. Requests in flight
        wait for a PostgreSQL connection in the pool's queue: that is the queue."""
        if len(self._in_flight) >= self.concurrency:
            self.metrics.inc("api_busy_total")
            if msg.reply:
                body, headers = _error_reply(errors.Busy(self.concurrency))
                await self.bus.reply(msg, json.dumps(body, separators=(",", ":")).encode(), headers)
            return
        task = asyncio.create_task(self.handle(msg))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for the requests in flight, then cancel the rest."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        for task in list(self._in_flight):
            task.cancel()

    async def handle(self, msg: Message) -> None:
        tokens = self.bus.subjects.relative(msg.subject)[1:]  # after "api"
        try:
            result = await self._route(tokens, msg)
            body, headers = {"ok": True, "result": result}, None
        except errors.FlowError as exc:
            body, headers = _error_reply(exc)
        except Exception as exc:
            log.exception("api_crashed", subject=msg.subject)
            # The exception's type only: its text may quote the request or the database.
            what = type(exc).__name__
            error = {"code": "internal", "message": f"{what} (a bug, logged)", "details": {}}
            body = {"ok": False, "error": error}
            headers = {names.SERVICE_ERROR_CODE: "internal", names.SERVICE_ERROR: "internal"}
        self.metrics.inc("api_requests_total", ok=str(body["ok"]).lower())
        if msg.reply:
            data = json.dumps(body, separators=(",", ":")).encode()
            data, headers = _fitting(data, headers, int(self.bus.nc.max_payload))
            await self.bus.reply(msg, data, headers)

    async def _route(self, tokens: list[str], msg: Message) -> Any:
        op = tokens[0] if tokens else ""
        if op in ("cmd", "obs"):
            return await self._mutate(op, tokens[1:], msg)
        data = _parse(msg.data, self.max_payload)
        if op == "get":
            req = _valid(GetRequest, data)
            return snapshot(await self.manager.require(req.flow_id))
        if op == "list":
            lst = _valid(ListRequest, data)
            flows = await self.manager.store.list_flows(
                owner=lst.owner, status=lst.status, limit=lst.limit, after=lst.after
            )
            nxt = str(flows[-1].id) if len(flows) == lst.limit else None
            return {"flows": [snapshot(f) for f in flows], "next": nxt}
        if op == "steps":
            req = _valid(GetRequest, data)
            steps = await self.manager.list_steps(req.flow_id)
            return {"steps": [s.model_dump(mode="json") for s in steps]}
        if op == "events":
            ev = _valid(EventsRequest, data)
            events = await self.manager.list_events(
                ev.flow_id, after_revision=ev.after_revision, limit=ev.limit
            )
            return {"events": [e.model_dump(mode="json") for e in events]}
        if op == "outcome":
            oc = _valid(OutcomeRequest, data)
            first = await self.manager.store.get_first_use(oc.command_id)
            return {
                "outcome": await self.manager.store.get_outcome(oc.command_id),
                "first_use": None if first is None else {**first.as_json(), "digest": first.digest},
            }
        if op == "outbox" and len(tokens) == 2:
            return await self._outbox(tokens[1], data)
        raise errors.InvalidInput(f"unknown API operation {'.'.join(tokens)!r}")

    async def _outbox(self, action: str, data: object) -> Any:
        """Parked outbox rows: ``list``, ``retry`` (un-park: the relay tries it again),
        ``skip`` (copy it to ``P.dlq.evt`` with the reason, then remove it)."""
        store = self.manager.store
        if action == "list":
            rows = await store.outbox_parked(limit=_valid(ParkedListRequest, data).limit)
            return {"parked": [r.summary() for r in rows]}
        if action == "retry":
            retry = _valid(ParkedRetryRequest, data)
            row = await store.outbox_parked_row(retry.id)
            if row is None or not await store.outbox_unpark(retry.id):
                raise NotParked(retry.id)
            log.warning("outbox_row_retried", row=row.row_id, topic=row.topic, msg_id=row.msg_id)
            await self.bus.nudge_relay()  # whichever replica holds the relay tries it now
            return {"retried": row.summary()}
        if action == "skip":
            skip = _valid(ParkedSkipRequest, data)
            row = await store.outbox_parked_row(skip.id)
            if row is None or row.body is None:
                raise NotParked(skip.id)
            subject = self.bus.subjects.topic(row.topic)
            headers = {
                names.MSG_ID: f"dlq-evt-{row.msg_id}",
                names.DLQ_REASON: f"{skip.reason} (parked: {row.reason})"[:1000],
                names.DLQ_SUBJECT: subject,
            }
            if row.command_id is not None:
                headers[names.COMMAND_ID] = row.command_id
            letter = self.bus.subjects.dead_letter("evt")
            await self.bus.publish_letter(letter, row.body.encode(), headers)
            if not await store.outbox_remove_parked(skip.id):
                raise NotParked(skip.id)  # retried meanwhile: the relay has it again
            log.warning(
                "outbox_row_skipped",
                row=row.row_id,
                topic=row.topic,
                msg_id=row.msg_id,
                reason=skip.reason,
            )
            await self.bus.nudge_relay()  # its flow's later rows may go now
            return {"skipped": row.summary(), "dead_letter": letter}
        raise errors.InvalidInput(f"unknown API operation 'outbox.{action}'")

    async def _mutate(self, kind: str, tokens: list[str], msg: Message) -> Any:
        fallback = f"{codec.RESERVED}api:{uuid.uuid4().hex}"
        try:
            cmd = codec.decode(
                "cmd" if kind == "cmd" else "obs",
                tokens,
                msg.headers,
                msg.data,
                fallback_id=fallback,
                max_payload=self.max_payload,
                owners=self.owners,
            )
        except codec.Undecodable as exc:
            raise errors.InvalidInput(exc.reason) from None
        except codec.Rejected as exc:
            if isinstance(exc.error, errors.Forbidden):
                raise exc.error from None  # not recorded: it must not take the id
            if (repeat := await self._reject(exc.claim, exc.flow_id, exc.token, exc.error)) is None:
                raise exc.error from None
            return repeat
        try:
            result = await execute(self.manager, cmd)
        except errors.DuplicateCommand as dup:
            return await self._repeat(cmd.flow_id, dup)
        except (errors.StoreUnavailable, errors.IdempotencyConflict, errors.Forbidden):
            raise  # (not recorded: the id is its first use's, or its owner's to take)
        except errors.FlowError as exc:
            if (repeat := await self._reject(cmd.claim, cmd.flow_id, cmd.token, exc)) is None:
                raise
            return repeat
        stored_outcome = await self.manager.store.get_outcome(cmd.command_id)
        key = "step" if cmd.verb == "observe" else "flow"
        return {"outcome": stored_outcome, key: result_json(result)}

    async def _reject(
        self, command_id: Claim, flow_id: UUID | None, token: str, error: errors.FlowError
    ) -> JsonObject | None:
        """Record the rejection; None, or (the id was processed before, for this same
        request) the reply to a repeat."""
        try:
            await self.manager.record_rejection(command_id, flow_id, token, error)
        except errors.DuplicateCommand as dup:
            return await self._repeat(flow_id, dup)
        return None

    async def _repeat(self, flow_id: UUID | None, dup: errors.DuplicateCommand) -> JsonObject:
        """The reply to a repeated command id: its recorded outcome (a recorded rejection
        is answered again as the error it was)."""
        stored = dup.outcome
        if stored.get("status") == "rejected":
            raise _replayed(stored) from None
        reply: JsonObject = {"outcome": stored, "duplicate": True}
        if flow_id is not None or stored.get("flow_id"):
            flow = await self.manager.store.get(flow_id or UUID(str(stored["flow_id"])))
            if flow is not None:
                reply["flow"] = snapshot(flow)
        return reply


def _fitting(
    data: bytes, headers: dict[str, str] | None, limit: int
) -> tuple[bytes, dict[str, str] | None]:
    """The reply, or, if NATS would not carry it (``limit``: the server's max_payload),
    an ``invalid_input`` error saying so: the request asked for too much at once."""
    if wire_size(headers, len(data)) <= limit:
        return data, headers
    message = f"the reply of {len(data)} bytes exceeds the {limit} bytes NATS carries"
    error = {
        "code": "invalid_input",
        "message": message + ": ask for less (a smaller limit)",
        "details": {
            "errors": {"request": "reply too large"},
            "reason": "reply_too_large",
            "size": len(data),
            "limit": limit,
        },
    }
    data = json.dumps({"ok": False, "error": error}, separators=(",", ":")).encode()
    return data, {names.SERVICE_ERROR_CODE: "invalid_input", names.SERVICE_ERROR: message}


def _error(exc: errors.FlowError) -> JsonObject:
    return {"code": exc.code, "message": exc.message, "details": exc.details()}


def _error_reply(exc: errors.FlowError) -> tuple[JsonObject, dict[str, str]]:
    """The body and headers of an error reply."""
    body: JsonObject = {"ok": False, "error": _error(exc)}
    return body, {names.SERVICE_ERROR_CODE: exc.code, names.SERVICE_ERROR: exc.message[:200]}


class _Replayed(errors.FlowError):
    """A recorded rejection, answered again for a repeated command id."""

    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        self.code = code  # type: ignore[misc]
        self._details = details
        super().__init__(message)

    def details(self) -> dict[str, Any]:
        return self._details


def _replayed(stored: JsonObject) -> _Replayed:
    details = stored.get("details")
    return _Replayed(
        str(stored.get("code")),
        str(stored.get("message")),
        details if isinstance(details, dict) else {},
    )


def _parse(data: bytes, max_payload: int) -> object:
    try:
        return codec.parse_json(data, max_payload)
    except codec.Undecodable as exc:
        raise errors.InvalidInput(exc.reason) from None


def _valid(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise codec.invalid_input(exc, "request") from None
