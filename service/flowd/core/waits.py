"""Wait conditions: what a waiting flow is blocked on, validated, and the rows that index them.

Accepted shapes (``set_waiting``'s ``wait_json``; anything else is ``InvalidInput``)::

    {"kind": "timer", "at": "<RFC 3339>"}
    {"kind": "subject", "subject": "<NATS subject>", "correlation_id": "<str>"}
    {"kind": "signal", "name": "<str>"}
    {"kind": "any", "of": [<timer|subject|signal|…>, …],
     "timeout_at"?: "<RFC 3339>", "on_timeout"?: "resume" | "fail"}
    {"kind": "manual"}                                   only an explicit resume wakes it
    {"kind": "external_event", "topic": …, "correlation_id": …}   the seed's spelling of subject

Rules (``invalid_input`` naming the field, e.g. ``wait_json.of.0.at``, otherwise):

- times (``at``, ``timeout_at``) carry an offset and lie in [``EARLIEST``, ``LATEST``);
- subjects are one literal NATS subject (``subject_problem``): printable ASCII, no
  wildcards, no empty token, at most 255 characters, not a system subject (``$…``,
  ``_INBOX.…``) and not under flowd's own subjects (``reserved``, given by the daemon);
- strings (``correlation_id``, ``name``) are 1-200 characters and hold nothing the door
  refuses (NUL, lone surrogates: ``core.door``).

A wait becomes ``Condition`` rows (one per timer, subject, signal, timeout), stored with the
flow in the same transaction, so the engine finds due timers and matching messages by index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Final, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
)

from flowd.core import door, errors
from flowd.core.models import JsonObject

EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(9999, 1, 1, tzinfo=UTC)
MAX_SUBJECT: Final = 255
_SUBJECT_CHARS = re.compile(r"[!-~]+")  # printable ASCII, no space


def subject_problem(subject: str, reserved: Sequence[str] = ()) -> str | None:
    """What keeps ``subject`` from being a subject a flow may wait on, or None. ``reserved``:
    subjects that are not for waits, with everything under them (flowd's own)."""
    if not subject:
        return "is empty"
    if len(subject) > MAX_SUBJECT:
        return f"is longer than {MAX_SUBJECT} characters"
    if not _SUBJECT_CHARS.fullmatch(subject):
        bad = next(c for c in subject if not _SUBJECT_CHARS.fullmatch(c))
        return f"contains '{door.escaped(bad)}': only printable ASCII without spaces"
    if "*" in subject or ">" in subject:
        return "contains a wildcard (* or >): a wait names one literal subject"
    tokens = subject.split(".")
    if "" in tokens:
        return "has an empty token (two dots in a row, or a leading or trailing dot)"
    if tokens[0].startswith("$") or tokens[0] == "_INBOX":
        return f"is a NATS system or inbox subject ({tokens[0]}.…)"
    for own in reserved:
        if subject == own or subject.startswith(own + "."):
            return f"is one of flowd's own subjects ({own}, {own}.>)"
    return None


def _subject(value: object) -> object:
    problem = subject_problem(value) if isinstance(value, str) else None
    if problem is not None:
        raise ValueError(f"subject {problem}")
    return value


def _sane_time(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError(
            f"time must lie from {EARLIEST.isoformat()} up to {LATEST.isoformat()} (excluded)"
        )
    return value


def _clean(value: object) -> object:
    problem = door.value_problem(value) if isinstance(value, str) else None
    if problem is not None:
        raise ValueError(problem)
    return value


_CFG = ConfigDict(extra="forbid", frozen=True)
# Before pydantic's own str check, which refuses a lone surrogate without saying so.
Str = Annotated[str, Field(strict=True, min_length=1, max_length=200), BeforeValidator(_clean)]
SubjectName = Annotated[str, Field(strict=True), BeforeValidator(_subject)]
Time = Annotated[AwareDatetime, AfterValidator(_sane_time)]


class TimerWait(BaseModel):
    model_config = _CFG
    kind: Literal["timer"]
    at: Time


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
    timeout_at: Time | None = None
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


KINDS: Final = ("timer", "subject", "signal", "any", "manual", "external_event")


def parse(wait_json: JsonObject, *, reserved: Sequence[str] = ()) -> Wait:
    """The typed wait, or InvalidInput naming what is wrong (``wait_json.<field>``).
    ``reserved``: subjects no wait may name (``subject_problem``)."""
    try:
        wait = _WAIT.validate_python(wait_json)
    except ValidationError as exc:
        fields = {_path(e["loc"]): _message(e["msg"]) for e in exc.errors()}
        raise _invalid(fields) from None
    fields = {
        f"wait_json{at}.{field}": f"subject {problem}"
        for at, field, subject in _subjects(wait)
        if (problem := subject_problem(subject, reserved)) is not None
    }
    if fields:
        raise _invalid(fields)
    return wait


def _invalid(fields: dict[str, str]) -> errors.InvalidInput:
    listed = "; ".join(f"{k}: {v}" for k, v in fields.items())
    return errors.InvalidInput(
        f"wait_json is not a valid wait condition (kinds: {', '.join(KINDS)}): {listed}", fields
    )


def _path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a path under ``wait_json``, without the union's tags
    (``("any", "of", 0, "timer", "at")`` -> ``wait_json.of.0.at``)."""
    kept = [
        str(p)
        for i, p in enumerate(loc)
        if not (p in KINDS and (i == 0 or isinstance(loc[i - 1], int)))
    ]
    return ".".join(["wait_json", *kept])


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _subjects(wait: Wait) -> Iterator[tuple[str, str, str]]:
    """(path under wait_json, field, subject) for every subject ``wait`` names."""
    leaves = enumerate(wait.of) if isinstance(wait, AnyWait) else [(None, wait)]
    for i, leaf in leaves:
        at = "" if i is None else f".of.{i}"
        if isinstance(leaf, SubjectWait):
            yield at, "subject", leaf.subject
        elif isinstance(leaf, ExternalEventWait):
            yield at, "topic", leaf.topic


def stored_signal_names(wait_json: JsonObject) -> set[str]:
    """Names of the signals a stored wait names, read leniently: a wait stored before a
    rule was added must still be woken by its signals."""
    leaves = wait_json.get("of") if wait_json.get("kind") == "any" else [wait_json]
    names = set()
    for leaf in leaves if isinstance(leaves, list) else []:
        if isinstance(leaf, dict) and leaf.get("kind") == "signal":
            name = leaf.get("name")
            if isinstance(name, str):
                names.add(name)
    return names


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
