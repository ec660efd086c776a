"""FlowClient: the async Python client of a flowd deployment, over NATS only.

It publishes commands and observations to JetStream (each with a ``Nats-Msg-Id``, so a
re-publish never has a second effect), optionally waits for their outcome by correlating the
``Flowd-Command-Id`` header of events and outcome messages, asks queries over the
request/reply API, and follows the event stream. It never talks to PostgreSQL. The wire
contract it implements is subjects.md.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, Unpack
from uuid import UUID, uuid4

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from flowd.bus import codec
from flowd.bus.codec import MAX_ID_LENGTH
from flowd.bus.subjects import COMMAND_ID, MSG_ID, OWNER, OWNER_SIGNATURE, VERBS, Subjects
from flowd.core import owner
from flowd.core.errors import IdempotencyConflict

Json = dict[str, Any]
Page = tuple[list[Json], str | None]
FlowId = UUID | str
Status = Literal["applied", "rejected", "unchanged"]


class FlowdError(Exception):
    """flowd refused a request: ``code`` is the wire error code (``not_found``, ...)."""

    def __init__(self, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: Json = details or {}


class FlowdUnavailable(ConnectionError):
    """NATS is unreachable, no stream captures the subject, or nobody serves the API."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one command: ``applied`` (with its events), ``rejected`` or
    ``unchanged``.

    ``flow`` is the snapshot from the final event, or None when the outcome is not an event
    or was read back from ``P.api.outcome`` after a timeout (then ``events`` is empty too).
    """

    command_id: str
    status: Status
    flow_id: str | None = None
    revision: int | None = None
    flow: Json | None = None
    events: list[Json] = field(default_factory=list)
    code: str | None = None
    message: str | None = None
    details: Json = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True unless the command was rejected."""
        return self.status != "rejected"

    @classmethod
    def from_events(cls, command_id: str, events: list[Json]) -> Outcome:
        last = events[-1]
        return cls(command_id, "applied", last["flow_id"], last["revision"], last["flow"], events)

    @classmethod
    def from_record(cls, command_id: str, body: Json) -> Outcome:
        """From a ``P.out`` message body or a recorded outcome (``P.api.outcome``)."""
        return cls(
            command_id,
            body["status"],
            body.get("flow_id"),
            body.get("revision"),
            code=body.get("code"),
            message=body.get("message"),
            details=body.get("details") or {},
        )


class SendOptions(TypedDict, total=False):
    """How to publish: ``command_id`` (default a new uuid4 hex), ``wait`` for the outcome
    (default False) for up to ``timeout`` seconds (default 10)."""

    command_id: str | None
    wait: bool
    timeout: float


class CommandOptions(SendOptions, total=False):
    """SendOptions plus ``expected_revision``: apply only at exactly this revision."""

    expected_revision: int | None


@contextmanager
def _translated(subject: str) -> Iterator[None]:
    """NATS errors as FlowdUnavailable; timeouts stay TimeoutError."""
    try:
        yield
    except nats.errors.NoRespondersError:
        raise FlowdUnavailable(f"nobody serves {subject}: is flowd running?") from None
    except (nats.js.errors.NoStreamResponseError, nats.js.errors.NotFoundError):
        raise FlowdUnavailable(f"no stream captures {subject}: is flowd running?") from None
    except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
        raise FlowdUnavailable(f"NATS connection lost: {exc}") from None


def _token(flow_id: FlowId) -> str:
    """The subject token of a flow id; ValueError unless it is a UUID."""
    try:
        return str(flow_id if isinstance(flow_id, UUID) else UUID(flow_id))
    except ValueError:
        raise ValueError(f"not a flow id (UUID): {flow_id!r}") from None


def _command_id(chosen: str | None) -> str:
    """The command id to publish: ``chosen`` if it is one a publisher may choose."""
    cid = chosen or uuid4().hex
    if len(cid) > MAX_ID_LENGTH or cid != cid.strip():
        raise ValueError(f"a command id has at most {MAX_ID_LENGTH} characters, no padding")
    if codec.reserved(cid):
        raise ValueError(f"command ids starting with {codec.RESERVED!r} are reserved for flowd")
    return cid


@dataclass(frozen=True, slots=True)
class _Asked:
    """A published command, as the daemon reads it (for its request digest)."""

    command_id: str
    kind: Literal["cmd", "obs"]
    tokens: list[str]
    data: bytes

    def digest(self) -> str | None:
        """The digest the daemon records for it (core.requests), or None if unreadable."""
        try:
            decoded = codec.decode(
                self.kind,
                self.tokens,
                {MSG_ID: self.command_id},
                self.data,
                fallback_id=self.command_id,
                max_payload=len(self.data),
            )
        except codec.Rejected as exc:
            return None if exc.request is None else exc.request.digest
        except codec.Undecodable:
            return None
        return decoded.request.digest


def _final(outcome: Outcome) -> Outcome:
    """``outcome``, unless it is an ``idempotency_conflict``: an error, as subjects.md has it."""
    if outcome.code == IdempotencyConflict.code:
        raise FlowdError(outcome.code, outcome.message or "", outcome.details)
    return outcome


def _decode(msg: Msg) -> Json:
    try:
        value = json.loads(msg.data) if msg.data else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise FlowdError("internal", f"expected a JSON object on {msg.subject}")
    return value


class FlowClient:
    """A connection to one flowd deployment (one subject prefix).

    Commands return their command id, or with ``wait=True`` their ``Outcome``; queries return
    JSON and raise ``FlowdError`` on an error reply; ``tail`` follows events. Use as
    ``async with await FlowClient.connect(url) as flows: ...``.
    """

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "flows",
        request_timeout: float = 10.0,
        owner: str | None = None,
        owner_key: bytes | None = None,
    ):
        """``owner`` and ``owner_key`` (its key from ``flowctl owner-key``): sign every
        command as acting for that owner (a daemon with ``FLOWD_ENFORCE_OWNER`` needs it)."""
        if (owner is None) != (owner_key is None):
            raise ValueError("owner and owner_key go together")
        self.subjects = Subjects(prefix)
        self.request_timeout = request_timeout
        self._nc = nc
        self._js = nc.jetstream()
        self._owned = False
        self._owner = None if owner is None or owner_key is None else (owner, owner_key)

    @classmethod
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "flows",
        request_timeout: float = 10.0,
        owner: str | None = None,
        owner_key: bytes | None = None,
        **nats_options: Any,
    ) -> FlowClient:
        """Connect to NATS at ``url`` (several servers: comma-separated); ``nats_options`` go
        to ``nats.connect`` (e.g. ``user_credentials``, ``tls``)."""
        servers = [u.strip() for u in url.split(",") if u.strip()]
        try:
            nc = await nats.connect(servers, **nats_options)
        except (OSError, nats.errors.Error) as exc:
            raise FlowdUnavailable(f"cannot connect to NATS at {url}: {exc}") from None
        client = cls(
            nc, prefix=prefix, request_timeout=request_timeout, owner=owner, owner_key=owner_key
        )
        client._owned = True
        return client

    @classmethod
    def from_connection(cls, nc: Client, *, prefix: str = "flows") -> FlowClient:
        """A client over an existing connection (``close`` then leaves it open)."""
        return cls(nc, prefix=prefix)

    async def close(self) -> None:
        """Close the NATS connection if this client opened it."""
        if self._owned and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- commands -------------------------------------------------------------------------------
    async def command(
        self,
        verb: str,
        flow_id: FlowId | None,
        payload: Json,
        **opts: Unpack[CommandOptions],
    ) -> Outcome | str:
        """Publish one command (``verb`` is ``create``, ``observe`` or one of the flow verbs).

        Returns the command id, or with ``wait=True`` the ``Outcome``, waiting up to
        ``timeout`` seconds; after that the recorded outcome is asked for once, and if there
        is none yet ``TimeoutError`` is raised (the command may still be applied later).
        ``FlowdError`` ``idempotency_conflict``: ``command_id`` was first used for another
        request, nothing applied (without ``wait`` known only if JetStream dropped the
        publish as a duplicate; else the conflict is its ``P.out`` outcome); ``ValueError``:
        an id a publisher may not choose.
        """
        cid = _command_id(opts.get("command_id"))
        timeout = opts.get("timeout", 10.0)
        body = dict(payload)
        if opts.get("expected_revision") is not None:
            body["expected_revision"] = opts["expected_revision"]
        kind, tokens = self._route(verb, flow_id, body)
        token = tokens[0]
        subject = ".".join([self.subjects.prefix, kind, *tokens])
        data = _encode(body)
        asked = _Asked(cid, kind, tokens, data)
        if not opts.get("wait", False):
            if await self._publish(subject, data, cid, timeout):
                await self._reused(asked)  # raises if the id was first used otherwise
            return cid
        found: asyncio.Queue[Json] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            if (msg.headers or {}).get(COMMAND_ID) == cid:
                found.put_nowait(_decode(msg))

        subs = [
            await self._nc.subscribe(self.subjects.events(token), cb=take),
            await self._nc.subscribe(self.subjects.outcomes(token), cb=take),
        ]
        try:
            duplicate = await self._publish(subject, data, cid, timeout)
            if duplicate and (recorded := await self._reused(asked)) is not None:
                return _final(Outcome.from_record(cid, recorded))
            with suppress(TimeoutError):
                outcome = await asyncio.wait_for(self._collect(cid, found), timeout)
                if duplicate:  # processed meanwhile: as whose request?
                    await self._reused(asked)
                return _final(outcome)
        finally:
            for sub in subs:
                with suppress(nats.errors.Error):  # e.g. the connection is already closed
                    await sub.unsubscribe()
        if (recorded := await self._recorded(cid)) is None:
            raise TimeoutError(f"no outcome for command {cid} within {timeout:g} s")
        return _final(Outcome.from_record(cid, recorded))

    @staticmethod
    def _route(
        verb: str, flow_id: FlowId | None, body: Json
    ) -> tuple[Literal["cmd", "obs"], list[str]]:
        """("cmd" or "obs", the subject's tokens after it) of a command; a create's id is
        set in ``body``."""
        if verb == "create":
            body["id"] = _token(flow_id or body.get("id") or uuid4())
            # On the flow's own subject: same partition as its later commands, so they are
            # applied after it even with several daemon replicas.
            return "cmd", [body["id"], "create"]
        if flow_id is None or verb not in (*VERBS, "observe"):
            raise ValueError(f"unknown verb {verb!r} or no flow id")
        if verb == "observe":
            return "obs", [_token(flow_id)]
        return "cmd", [_token(flow_id), verb]

    async def _reused(self, asked: _Asked) -> Json | None:
        """JetStream dropped ``asked`` as a duplicate id: the recorded outcome of the id's
        first use (None if there is none yet, or nobody answers), or FlowdError
        ``idempotency_conflict`` if that use asked something else (subjects.md)."""
        try:
            result = await self._request("outcome", {"command_id": asked.command_id})
        except (TimeoutError, FlowdUnavailable):
            return None
        first = result.get("first_use") or {}
        if first.get("digest") and first["digest"] != asked.digest():
            conflict = IdempotencyConflict(
                asked.command_id, {k: first.get(k) for k in ("verb", "flow_id", "at")}
            )
            raise FlowdError(conflict.code, conflict.message, conflict.details())
        recorded = result.get("outcome")
        return None if recorded is None else dict(recorded)

    async def _recorded(self, cid: str) -> Json | None:
        """The recorded outcome, or None if there is none or nobody answers."""
        try:
            return await self.outcome(cid)
        except (TimeoutError, FlowdUnavailable):
            return None

    async def _publish(self, subject: str, data: bytes, cid: str, within: float) -> bool:
        """JetStream-publish (signed for its owner, if this client has one); True if
        JetStream dropped it as a duplicate id."""
        headers = {MSG_ID: cid}
        if self._owner is not None:
            who, key = self._owner
            headers[OWNER] = who
            headers[OWNER_SIGNATURE] = owner.sign(key, who, cid, subject, data)
        with _translated(subject):
            ack = await self._js.publish(subject, data, timeout=within, headers=headers)
        return bool(ack.duplicate)

    @staticmethod
    async def _collect(cid: str, found: asyncio.Queue[Json]) -> Outcome:
        events: list[Json] = []
        while True:
            body = await found.get()
            if "kind" not in body:  # a rejected/unchanged outcome
                return Outcome.from_record(cid, body)
            events.append(body)
            if body.get("final"):
                return Outcome.from_events(cid, events)

    async def create(
        self,
        controller_id: str,
        goal: str,
        owner_session_key: str,
        *,
        sync_mode: Literal["managed", "mirrored"] = "managed",
        flow_id: FlowId | None = None,
        requester_origin: str | None = None,
        current_step: str | None = None,
        state_json: Json | None = None,
        **opts: Unpack[SendOptions],
    ) -> Outcome | str:
        """Create a flow (its id is ``flow_id`` or a new uuid4, in the payload as ``id``)."""
        body: Json = {
            "controller_id": controller_id,
            "goal": goal,
            "owner_session_key": owner_session_key,
            "sync_mode": sync_mode,
        }
        extra = {"requester_origin": requester_origin, "current_step": current_step}
        body |= {k: v for k, v in extra.items() if v is not None}
        if state_json is not None:
            body["state_json"] = state_json
        return await self.command("create", flow_id or uuid4(), body, **opts)

    async def start(self, flow_id: FlowId, **opts: Unpack[CommandOptions]) -> Outcome | str:
        """created -> running."""
        return await self.command("start", flow_id, {}, **opts)

    async def wait(
        self, flow_id: FlowId, wait_json: Json, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """running -> waiting, recording what the flow waits for."""
        return await self.command("wait", flow_id, {"wait_json": wait_json}, **opts)

    async def resume(
        self, flow_id: FlowId, state_patch: Json | None = None, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """waiting -> running, shallow-merging ``state_patch`` into the state."""
        return await self.command("resume", flow_id, {"state_patch": state_patch}, **opts)

    async def finish(
        self, flow_id: FlowId, final_state: Json | None = None, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """running -> finished, merging ``final_state`` into the state."""
        return await self.command("finish", flow_id, {"final_state": final_state}, **opts)

    async def fail(
        self, flow_id: FlowId, reason: str, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """running/waiting -> failed with ``reason``."""
        return await self.command("fail", flow_id, {"reason": reason}, **opts)

    async def request_cancel(
        self, flow_id: FlowId, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """Record a sticky cancel intent (the status stays)."""
        return await self.command("request_cancel", flow_id, {}, **opts)

    async def cancel(self, flow_id: FlowId, **opts: Unpack[CommandOptions]) -> Outcome | str:
        """Any non-terminal status -> cancelled."""
        return await self.command("cancel", flow_id, {}, **opts)

    async def update(
        self,
        flow_id: FlowId,
        patch: Json,
        next_step: str | None = None,
        **opts: Unpack[CommandOptions],
    ) -> Outcome | str:
        """Merge ``patch`` into the state and maybe move ``current_step`` to ``next_step``."""
        body: Json = {"patch": patch} | ({"next_step": next_step} if next_step else {})
        return await self.command("update", flow_id, body, **opts)

    async def signal(
        self, flow_id: FlowId, name: str, payload: Any = None, **opts: Unpack[CommandOptions]
    ) -> Outcome | str:
        """Wake the flow if it waits for signal ``name``, else keep the signal for its wait."""
        body: Json = {"name": name} | ({"payload": payload} if payload is not None else {})
        return await self.command("signal", flow_id, body, **opts)

    async def observe(
        self,
        flow_id: FlowId,
        run_id: str,
        task: str,
        status: str,
        *,
        child_session_key: str | None = None,
        result_json: Any = None,
        **opts: Unpack[SendOptions],
    ) -> Outcome | str:
        """Report one run of an external job (``P.obs.<flow_id>``), upserted by run id."""
        body: Json = {"run_id": run_id, "task": task, "status": status}
        if child_session_key is not None:
            body["child_session_key"] = child_session_key
        if result_json is not None:
            body["result_json"] = result_json
        return await self.command("observe", flow_id, body, **opts)

    # -- queries --------------------------------------------------------------------------------
    async def _request(self, op: str, body: Json) -> Any:
        """One query; a ``busy`` reply (flowd serves FLOWD_API_CONCURRENCY requests already)
        is asked again after a growing pause, until ``request_timeout`` has passed."""
        subject = self.subjects.api(op)
        loop = asyncio.get_running_loop()
        give_up, pause = loop.time() + self.request_timeout, 0.01
        while True:
            with _translated(subject):
                msg = await self._nc.request(subject, _encode(body), timeout=self.request_timeout)
            reply = _decode(msg)
            if reply.get("ok"):
                return reply.get("result")
            error = reply.get("error") or {}
            code = error.get("code", "internal")
            if code != "busy" or loop.time() + pause >= give_up:
                raise FlowdError(code, error.get("message", "error reply"), error.get("details"))
            await asyncio.sleep(pause * (0.5 + random.random()))  # (jitter: not all at once)
            pause = min(pause * 2, 1.0)

    async def get(self, flow_id: FlowId) -> Json:
        """The flow (raises FlowdError ``not_found``)."""
        result: Json = await self._request("get", {"flow_id": str(flow_id)})
        return result

    async def steps(self, flow_id: FlowId) -> list[Json]:
        """The flow's steps, oldest first."""
        result = await self._request("steps", {"flow_id": str(flow_id)})
        return list(result["steps"])

    async def events(
        self, flow_id: FlowId, after_revision: int = -1, limit: int = 1000
    ) -> list[Json]:
        """The flow's audit events after ``after_revision``, in revision order."""
        body = {"flow_id": str(flow_id), "after_revision": after_revision, "limit": limit}
        return list((await self._request("events", body))["events"])

    async def outcome(self, command_id: str) -> Json | None:
        """The recorded outcome of a processed command, or None if not (yet) processed."""
        result = await self._request("outcome", {"command_id": command_id})
        return None if result["outcome"] is None else dict(result["outcome"])

    async def outbox_parked(self, limit: int = 1000) -> list[Json]:
        """Outbox rows the relay parked (``id, topic, msg_id, command_id, size, reason,
        since``), oldest first."""
        return list((await self._request("outbox.list", {"limit": limit}))["parked"])

    async def outbox_retry(self, row_id: int) -> Json:
        """Un-park outbox row ``row_id``: the relay tries it again."""
        result: Json = await self._request("outbox.retry", {"id": row_id})
        return result

    async def outbox_skip(self, row_id: int, reason: str) -> Json:
        """Copy parked row ``row_id`` to ``P.dlq.evt`` with ``reason`` and remove it: its
        flow's later events go out."""
        result: Json = await self._request("outbox.skip", {"id": row_id, "reason": reason})
        return result

    async def list(
        self,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> Page:
        """One page of flows and the ``after`` of the next page (None on the last)."""
        filters = {"owner": owner, "status": status, "after": after}
        body: Json = {"limit": limit} | {k: v for k, v in filters.items() if v is not None}
        result = await self._request("list", body)
        return list(result["flows"]), result.get("next")

    # -- live events ----------------------------------------------------------------------------
    async def tail(
        self,
        flow_id: FlowId | None = None,
        kinds: Sequence[str] | None = None,
        *,
        replay: bool = False,
        since: datetime | None = None,
        include_outcomes: bool = False,
    ) -> AsyncGenerator[Json, None]:
        """Yield event bodies as they are published (of one flow, or all; of ``kinds``, or all).

        Starts with new events, or with every retained one (``replay``), or with those
        published at or after ``since``. ``include_outcomes`` also yields the rejected and
        unchanged outcome bodies (``P.out``; not ordered relative to events). Uses ephemeral
        ordered push consumers on the events stream; close the iterator (``aclose``, or
        ``contextlib.aclosing``) to stop them.
        """
        token = "*" if flow_id is None else _token(flow_id)
        wanted = set(kinds or ())
        only = next(iter(wanted)) if len(wanted) == 1 else "*"
        filters = [self.subjects.events(token, only)]
        if include_outcomes:
            filters.append(self.subjects.outcomes(token))
        policy = DeliverPolicy.ALL if replay else DeliverPolicy.NEW
        if since is not None:
            policy = DeliverPolicy.BY_START_TIME
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        subs = []
        try:
            for subject in filters:
                config = ConsumerConfig(deliver_policy=policy, opt_start_time=since)
                with _translated(subject):
                    sub = await self._js.subscribe(
                        subject,
                        stream=self.subjects.evt_stream,
                        cb=queue.put,
                        ordered_consumer=True,
                        config=config,
                    )
                subs.append(sub)
            while True:
                body = _decode(await queue.get())
                if not wanted or "kind" not in body or body["kind"] in wanted:
                    yield body
        finally:
            for sub in subs:
                with suppress(nats.errors.Error):  # e.g. the connection is already closed
                    await sub.unsubscribe()


def _encode(body: Json) -> bytes:
    """``body`` as JSON; NaN and infinities raise ValueError here (JSON has no spelling for
    them: sent as NaN/Infinity, flowd could only dead-letter the body, with no outcome)."""
    return json.dumps(body, allow_nan=False).encode()
