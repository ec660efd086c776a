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
from typing import Any, TypeVar
from uuid import UUID

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowd.bus import codec
from flowd.bus import subjects as names
from flowd.bus.nats import Message, NatsBus
from flowd.core import errors
from flowd.core.models import JsonObject
from flowd.core.outbox import snapshot
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
    ) -> None:
        self.manager = manager
        self.bus = bus
        self.metrics = metrics
        self.max_payload = max_payload
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
            body = {"ok": False, "error": {"code": "internal", "message": repr(exc), "details": {}}}
            headers = {names.SERVICE_ERROR_CODE: "internal", names.SERVICE_ERROR: "internal"}
        self.metrics.inc("api_requests_total", ok=str(body["ok"]).lower())
        if msg.reply:
            await self.bus.reply(msg, json.dumps(body, separators=(",", ":")).encode(), headers)

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
            return {"outcome": await self.manager.store.get_outcome(oc.command_id)}
        raise errors.InvalidInput(f"unknown API operation {'.'.join(tokens)!r}")

    async def _mutate(self, kind: str, tokens: list[str], msg: Message) -> Any:
        fallback = f"api-{uuid.uuid4().hex}"
        try:
            cmd = codec.decode(
                "cmd" if kind == "cmd" else "obs",
                tokens,
                msg.headers,
                msg.data,
                fallback_id=fallback,
                max_payload=self.max_payload,
            )
        except codec.Undecodable as exc:
            raise errors.InvalidInput(exc.reason) from None
        except codec.Rejected as exc:
            await self._reject(exc.command_id, exc.flow_id, exc.token, exc.error)
            raise exc.error from None
        try:
            result = await execute(self.manager, cmd)
        except errors.DuplicateCommand as dup:
            stored = dup.outcome
            if stored.get("status") == "rejected":
                raise _replayed(stored) from None
            reply: JsonObject = {"outcome": stored, "duplicate": True}
            if cmd.flow_id is not None or stored.get("flow_id"):
                flow_id = cmd.flow_id or UUID(str(stored["flow_id"]))
                reply["flow"] = snapshot(await self.manager.require(flow_id))
            return reply
        except errors.StoreUnavailable:
            raise
        except errors.FlowError as exc:
            await self._reject(cmd.command_id, cmd.flow_id, cmd.token, exc)
            raise
        stored_outcome = await self.manager.store.get_outcome(cmd.command_id)
        key = "step" if cmd.verb == "observe" else "flow"
        return {"outcome": stored_outcome, key: result_json(result)}

    async def _reject(
        self, command_id: str, flow_id: UUID | None, token: str, error: errors.FlowError
    ) -> None:
        try:
            await self.manager.record_rejection(command_id, flow_id, token, error)
        except errors.DuplicateCommand as dup:
            if dup.outcome.get("status") == "rejected":
                raise _replayed(dup.outcome) from None
            raise


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
