"""Wait conditions: what a waiting flow is blocked on, validated, and the rows that index them.

Accepted shapes (``set_waiting``'s ``wait_json``; anything else is ``InvalidInput``)::

    {"kind": "timer", "at": "<RFC 3339>"}
    {"kind": "subject", "subject": "<NATS subject>", "correlation_id": "<str>"}
    {"kind": "signal", "name": "<str>"}
    {"kind": "any", "of": [<timer|subject|signal|…>, …],
     "timeout_at"?: "<RFC 3339>", "on_timeout"?: "resume" | "fail"}
    {"kind": "manual"}                                   only an explicit resume wakes it
    {"kind": "external_event", "topic": …, "correlation_id": …}   the seed's spelling of subject

A wait becomes ``Condition`` rows (one per timer, subject, signal, timeout), stored with the
flow in the same transaction, so the engine finds due timers and matching messages by index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
)

from flowd.core import errors
from flowd.core.models import JsonObject

_CFG = ConfigDict(extra="forbid", frozen=True)
Str = Annotated[str, Field(strict=True, min_length=1, max_length=200)]
SubjectName = Annotated[
    str, Field(strict=True, min_length=1, max_length=255, pattern=r"^[^\s*>]+(\.[^\s*>]+)*$")
]


class TimerWait(BaseModel):
    model_config = _CFG
    kind: Literal["timer"]
    at: AwareDatetime


class SubjectWait(BaseModel):
    model_config = _CFG
    kind: Literal["subject"]
    subject: SubjectName
    correlation_id: Str


class ExternalEventWait(BaseModel):
    model_config = _CFG
    kind: Literal["external_event"]
    topic: SubjectName
    correlation_id: Str


class SignalWait(BaseModel):
    model_config = _CFG
    kind: Literal["signal"]
    name: Str


class ManualWait(BaseModel):
    model_config = _CFG
    kind: Literal["manual"]


Leaf = Annotated[
    TimerWait | SubjectWait | ExternalEventWait | SignalWait | ManualWait,
    Field(discriminator="kind"),
]


class AnyWait(BaseModel):
    model_config = _CFG
    kind: Literal["any"]
    of: list[Leaf] = Field(min_length=1, max_length=32)
    timeout_at: AwareDatetime | None = None
    on_timeout: Literal["resume", "fail"] = "resume"


Wait = Annotated[
    TimerWait | SubjectWait | ExternalEventWait | SignalWait | ManualWait | AnyWait,
    Field(discriminator="kind"),
]
_WAIT: TypeAdapter[Wait] = TypeAdapter(Wait)


@dataclass(frozen=True, slots=True)
class Condition:
    """One indexed thing a waiting flow can be woken by.

    ``kind`` is ``timer``, ``timeout`` (the ``any`` deadline), ``subject``, ``signal`` or
    ``cancel`` (a cancel requested while waiting: due at once, the engine cancels the flow).
    """

    kind: Literal["timer", "timeout", "subject", "signal", "cancel"]
    due_at: datetime | None = None
    subject: str | None = None
    correlation_id: str | None = None
    name: str | None = None
    on_timeout: Literal["resume", "fail"] = "resume"


def parse(wait_json: JsonObject) -> Wait:
    """The typed wait, or InvalidInput naming what is wrong."""
    try:
        return _WAIT.validate_python(wait_json)
    except ValidationError as exc:
        fields = {".".join(map(str, e["loc"])) or "kind": e["msg"] for e in exc.errors()}
        raise errors.InvalidInput(
            "wait_json is not a valid wait condition (kinds: timer, subject, signal, any, "
            "manual, external_event)",
            fields,
        ) from None


def _leaf(wait: Leaf) -> list[Condition]:
    match wait:
        case TimerWait(at=at):
            return [Condition("timer", due_at=at)]
        case (
            SubjectWait(subject=subject, correlation_id=cid)
            | ExternalEventWait(topic=subject, correlation_id=cid)
        ):
            return [Condition("subject", subject=subject, correlation_id=cid)]
        case SignalWait(name=name):
            return [Condition("signal", name=name)]
    return []  # manual: nothing to index


def conditions(wait: Wait) -> tuple[Condition, ...]:
    """The rows that index ``wait``."""
    if isinstance(wait, AnyWait):
        rows = [c for leaf in wait.of for c in _leaf(leaf)]
        if wait.timeout_at is not None:
            rows.append(Condition("timeout", due_at=wait.timeout_at, on_timeout=wait.on_timeout))
        return tuple(rows)
    return tuple(_leaf(wait))


def signal_names(wait: Wait) -> set[str]:
    """Names of the signals that would wake ``wait``."""
    return {c.name for c in conditions(wait) if c.kind == "signal" and c.name}


@dataclass(frozen=True, slots=True)
class Signal:
    """A named signal sent to a flow; kept until a wait consumes it (``id`` None: new)."""

    id: int | None
    flow_id: UUID
    name: str
    payload: JsonValue
    created_at: datetime


def wake(cause: str, now: datetime, **fields: JsonValue) -> JsonObject:
    """What woke a flow: merged into ``state_json["wake"]`` and recorded in the event."""
    return {"cause": cause, "at": now.isoformat(), **fields}
