"""Bytes + headers <-> typed commands: the wire models of subjects.md and their decoding.

Decoding sorts every message into exactly one of three results:

- ``Decoded``: a valid command or observation, ready for the manager;
- ``Rejected``: well-formed enough to answer (we know its command id and where to answer),
  but invalid (bad UUID, unknown verb, wrong field types, non-object patch, a value the door
  refuses: NUL, a lone surrogate, a number out of range, see ``core.door``; an unusable
  ``Nats-Msg-Id``, answered under the fallback id): it gets an ``invalid_input`` outcome;
- ``Undecodable``: not something we can even read (oversized, not UTF-8 JSON: also UTF-16,
  UTF-32 or a byte order mark, nested deeper than the limit, unroutable subject): it goes to
  the dead-letter subject with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Final, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from flowd.bus.subjects import MSG_ID, OWNER, OWNER_SIGNATURE, VERBS
from flowd.core import door, errors, owner, requests
from flowd.core.models import CreateManagedInput, JsonObject
from flowd.core.requests import Claim, Request
from flowd.core.status import FlowStepStatus, SyncMode

MAX_DEPTH: Final = door.MAX_DEPTH
MAX_ID_LENGTH: Final = 200
#: Every command id flowd makes starts with this (fallback ids ``flowd:seq:<stream>:<seq>``,
#: the wait engine's ``flowd:wake:…`` and ``flowd:msg:…``, API ``flowd:api:<uuid>``); a
#: publisher's id never may, so the two can never collide (subjects.md, Commands).
RESERVED: Final = "flowd:"

Revision = Annotated[int, Field(strict=True, ge=0)]
Text = Annotated[str, Field(strict=True, max_length=10_000)]
Name = Annotated[str, Field(strict=True, min_length=1, max_length=200)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateCommand(CreateManagedInput):
    """``<prefix>.cmd.create``: a managed flow, or a mirrored one with ``sync_mode``."""

    sync_mode: SyncMode = SyncMode.MANAGED

    def input(self) -> CreateManagedInput:
        return CreateManagedInput.model_validate(self.model_dump(exclude={"sync_mode"}))


class StartCommand(_Wire):
    expected_revision: Revision | None = None


class WaitCommand(_Wire):
    wait_json: JsonObject
    expected_revision: Revision | None = None


class ResumeCommand(_Wire):
    state_patch: JsonObject | None = None
    expected_revision: Revision | None = None


class FinishCommand(_Wire):
    final_state: JsonObject | None = None
    expected_revision: Revision | None = None


class FailCommand(_Wire):
    reason: Text
    expected_revision: Revision | None = None


class RequestCancelCommand(_Wire):
    expected_revision: Revision | None = None


class CancelCommand(_Wire):
    expected_revision: Revision | None = None


class UpdateCommand(_Wire):
    patch: JsonObject
    next_step: Name | None = None
    expected_revision: Revision | None = None


class SignalCommand(_Wire):
    name: Name
    payload: JsonValue = None
    expected_revision: Revision | None = None


class ObserveCommand(_Wire):
    """``<prefix>.obs.<flow_id>``: one report about one run of an external job."""

    flow_id: UUID | None = Field(default=None, description="Optional; must match the subject.")
    run_id: Name
    task: Name
    status: FlowStepStatus
    child_session_key: Name | None = None
    result_json: JsonValue = None


BODIES: Final[dict[str, type[BaseModel]]] = {
    "create": CreateCommand,
    "start": StartCommand,
    "wait": WaitCommand,
    "resume": ResumeCommand,
    "finish": FinishCommand,
    "fail": FailCommand,
    "request_cancel": RequestCancelCommand,
    "cancel": CancelCommand,
    "update": UpdateCommand,
    "signal": SignalCommand,
    "observe": ObserveCommand,
}
assert set(BODIES) == {*VERBS, "create", "observe"}


@dataclass(frozen=True, slots=True)
class Decoded:
    """A valid command: what to do, to which flow, under which idempotency key."""

    verb: str
    flow_id: UUID | None
    token: str
    command_id: str
    body: BaseModel
    kind: str = "cmd"
    owner: str | None = None  # the owner it proved it acts for (``Owners``)

    @property
    def request(self) -> Request:
        """What it asks, as its processed-command record keeps it (core.requests)."""
        body = self.body.model_dump(
            mode="json", exclude={"flow_id"} if self.kind == "obs" else None
        )
        return Request(self.verb, requests.digest(self.kind, self.verb, self.flow_id, body))

    @property
    def claim(self) -> Claim:
        """Its command id with its request (and proven owner), for the manager."""
        return Claim(self.command_id, self.request, self.owner)


@dataclass(frozen=True, slots=True)
class Owners:
    """``FLOWD_ENFORCE_OWNER``: every command must prove whom it acts for (core.owner) with
    a claim signed under one of ``masters``, over the command's subject under ``prefix``."""

    masters: tuple[bytes, ...]
    prefix: str

    def verify(
        self, kind: str, tokens: list[str], headers: dict[str, str] | None, data: bytes
    ) -> str:
        """The owner the command proves it acts for, or ``errors.Forbidden``."""
        cid = _header_id(headers)
        if not cid:  # (an unsigned id: a captured message could be replayed under new ones)
            raise errors.Forbidden(
                f"an owner claim needs the command's {MSG_ID}", reason="missing_claim"
            )
        return owner.verified_owner(
            self.masters,
            (headers or {}).get(OWNER),
            (headers or {}).get(OWNER_SIGNATURE),
            command_id=cid,
            subject=".".join([self.prefix, kind, *tokens]),
            body=data,
        )


class Undecodable(Exception):
    """Unreadable input: dead-letter it with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(Exception):
    """Readable but invalid input: answer ``error`` as the outcome of ``command_id``."""

    def __init__(
        self,
        command_id: str,
        token: str,
        flow_id: UUID | None,
        error: errors.FlowError,
        request: Request | None = None,
    ) -> None:
        super().__init__(error.message)
        self.command_id = command_id
        self.token = token
        self.flow_id = flow_id
        self.error = error
        self.request = request

    @property
    def claim(self) -> Claim:
        """Its command id with its request, for the manager."""
        return Claim(self.command_id, self.request)


def fallback_id(stream: str, sequence: int) -> str:
    """The id of a command that came without one: its place in its stream."""
    return f"{RESERVED}seq:{stream}:{sequence}"


def _header_id(headers: dict[str, str] | None) -> str:
    return (headers or {}).get(MSG_ID, "").strip()


def reserved(value: str) -> bool:
    """Whether ``value`` is in the namespace of ids flowd makes (never a publisher's)."""
    return value.startswith(RESERVED)


def command_id(headers: dict[str, str] | None, fallback: str) -> str:
    """The command's idempotency key: its ``Nats-Msg-Id``, else ``fallback``: when it is
    absent, unusable (``id_problem``) or in flowd's reserved namespace (``decode`` rejects
    the command then)."""
    value = _header_id(headers)
    return value if value and id_problem(headers) is None and not reserved(value) else fallback


def id_problem(headers: dict[str, str] | None) -> str | None:
    """What makes a present ``Nats-Msg-Id`` unusable as a command id (NUL, a control
    character, a lone surrogate, bytes that were not UTF-8, over MAX_ID_LENGTH), or None."""
    value = (headers or {}).get(MSG_ID, "").strip()
    return door.text_problem(value, MAX_ID_LENGTH) if value else None


def parse_json(data: bytes, max_payload: int) -> object:
    """JSON from ``data`` (empty means ``{}``): Undecodable if it cannot be read (size,
    encoding, syntax, depth), ``errors.InvalidInput`` if it holds what the door refuses
    (``core.door``)."""
    if len(data) > max_payload:
        raise Undecodable(f"payload of {len(data)} bytes exceeds the {max_payload} byte limit")
    if not data.strip():
        return {}
    try:
        return door.read_json(data)
    except door.Unreadable as exc:
        raise Undecodable(exc.reason) from None


def invalid_input(exc: ValidationError, what: str) -> errors.InvalidInput:
    """A pydantic error as InvalidInput with a field -> message map."""
    fields = {".".join(map(str, e["loc"])) or "_": e["msg"] for e in exc.errors()}
    return errors.InvalidInput(
        f"invalid {what}: " + "; ".join(f"{k}: {v}" for k, v in fields.items()), fields
    )


def decode(
    kind: Literal["cmd", "obs"],
    tokens: list[str],
    headers: dict[str, str] | None,
    data: bytes,
    *,
    fallback_id: str,
    max_payload: int,
    owners: Owners | None = None,
) -> Decoded:
    """Decode one command (``kind="cmd"``, tokens after ``cmd``) or observation (``"obs"``);
    with ``owners``, it must carry a valid owner claim (else rejected ``forbidden``)."""
    cid = command_id(headers, fallback_id)
    verb, token = _route(kind, tokens)
    if (problem := door.text_problem(token)) is not None:  # no outcome subject to keep
        raise Undecodable(f"subject token '{door.escaped(token)}' {problem}")
    flow_id: UUID | None = None

    def rejected(error: errors.FlowError) -> Rejected:
        request = Request(verb, requests.digest(kind, verb, flow_id, requests.invalid_body(data)))
        return Rejected(cid, token, flow_id, error, request)

    if token != "create" or verb != "create":
        try:
            flow_id = UUID(token)
        except ValueError:
            raise rejected(errors.InvalidInput(f"{token!r} is not a flow id (UUID)")) from None
    if (refusal := _id_refusal(headers)) is not None:
        raise rejected(refusal)  # (under the fallback id, before any effect)
    model = BODIES.get(verb)
    if model is None or (kind == "cmd" and verb == "observe"):
        raise rejected(
            errors.InvalidInput(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
        )
    try:
        value = _json_object(data, max_payload)
    except errors.InvalidInput as exc:
        raise rejected(exc) from None
    try:
        body = model.model_validate(value)
    except ValidationError as exc:
        raise rejected(invalid_input(exc, f"{verb} payload")) from None
    try:
        decoded = _reconcile_ids(Decoded(verb, flow_id, token, cid, body, kind))
    except Rejected as exc:
        raise rejected(exc.error) from None
    if owners is None:
        return decoded
    try:
        return replace(decoded, owner=owners.verify(kind, tokens, headers, data))
    except errors.Forbidden as exc:  # (answered where a create with an id is: out.<id>)
        raise Rejected(cid, decoded.token, decoded.flow_id, exc, decoded.request) from None


def _id_refusal(headers: dict[str, str] | None) -> errors.InvalidInput | None:
    """Why a present ``Nats-Msg-Id`` cannot be this command's id: unusable as an idempotency
    key (``id_problem``), or in flowd's reserved namespace; None if it can."""
    if (problem := id_problem(headers)) is not None:
        return errors.InvalidInput(f"{MSG_ID} {problem}", {MSG_ID: problem})
    if reserved(_header_id(headers)):
        return errors.InvalidInput(
            f"command ids starting with {RESERVED!r} are reserved for ids flowd makes",
            {MSG_ID: f"must not start with {RESERVED!r}"},
        )
    return None


def _json_object(data: bytes, max_payload: int) -> dict[str, object]:
    """The JSON object in ``data`` (``parse_json``); InvalidInput if it is another value."""
    value = parse_json(data, max_payload)
    if not isinstance(value, dict):
        raise errors.InvalidInput(f"payload must be a JSON object, got {type(value).__name__}")
    return value


def _route(kind: str, tokens: list[str]) -> tuple[str, str]:
    """(verb, flow id token) from the subject tokens after ``cmd`` / ``obs``."""
    if kind == "cmd" and tokens == ["create"]:
        return "create", "create"
    if kind == "cmd" and len(tokens) == 2:
        return tokens[1], tokens[0]
    if kind == "obs" and len(tokens) == 1:
        return "observe", tokens[0]
    raise Undecodable(f"no such {kind} subject: {'.'.join(tokens) or '<empty>'}")


def _reconcile_ids(cmd: Decoded) -> Decoded:
    """A flow id in the payload must agree with the subject's; a create's id becomes the
    command's flow id (and so its outcome token)."""
    body, flow_id = cmd.body, cmd.flow_id
    mismatch = None
    if isinstance(body, CreateCommand):
        if flow_id is not None:  # <prefix>.cmd.<flow_id>.create
            mismatch = body.id not in (None, flow_id)
            body = body.model_copy(update={"id": flow_id})
        elif body.id is not None:
            return Decoded(cmd.verb, body.id, str(body.id), cmd.command_id, body, cmd.kind)
    elif isinstance(body, ObserveCommand):
        mismatch = body.flow_id not in (None, flow_id)
    if mismatch:
        error = errors.InvalidInput("the flow id in the payload differs from the subject's")
        raise Rejected(cmd.command_id, cmd.token, flow_id, error)
    return Decoded(cmd.verb, flow_id, cmd.token, cmd.command_id, body, cmd.kind)
