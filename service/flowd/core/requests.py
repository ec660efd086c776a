"""What a command asked, kept with its processed-command record, so that a command id used
again is told apart: the same request is a repeat (no second effect, the recorded outcome),
a different one is an ``IdempotencyConflict`` naming the first use (subjects.md, Commands).

The digest is sha256 (hex) over the canonical JSON text (keys sorted, no whitespace, ASCII
only) of ``{"kind": "cmd" | "obs", "verb": <verb>, "flow_id": <id or null>, "body": …}``:
the flow id the command is about (the subject's, or a create's from its payload; canonical
lower-case form, null if the subject's token is not a UUID), and the
body as validated, with every default filled in (and an observation's ``flow_id`` left
out: it is the subject's). A body that was not valid is ``{"invalid": <sha256 hex of the
raw bytes>}``. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from flowd.core import errors


@dataclass(frozen=True, slots=True)
class Request:
    """A command's verb and the digest of what it asked."""

    verb: str
    digest: str


@dataclass(frozen=True, slots=True)
class Claim:
    """A command id with what the command asked (``request`` None: not known, e.g. an id
    the wait engine derived; such a reuse is always a repeat)."""

    command_id: str
    request: Request | None = None
    #: The owner the command proved it acts for (core.owner; ``FLOWD_ENFORCE_OWNER``): the
    #: manager refuses it on a flow another session owns. None: no check (internal commands,
    #: or enforcement off).
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class FirstUse:
    """What a processed-command record says about the first use of its id. ``verb`` and
    ``digest`` are None for ids recorded without a request (or before migration 0006)."""

    verb: str | None
    digest: str | None
    flow_id: UUID | None
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "flow_id": None if self.flow_id is None else str(self.flow_id),
            "at": self.at.isoformat(),
        }


def digest(kind: str, verb: str, flow_id: UUID | None, body: object) -> str:
    """The digest of a request (see the module docstring)."""
    canonical = json.dumps(
        {
            "kind": kind,
            "verb": verb,
            "flow_id": None if flow_id is None else str(flow_id),
            "body": body,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def invalid_body(data: bytes) -> dict[str, str]:
    """The body a digest covers for a request whose body was not valid."""
    return {"invalid": hashlib.sha256(data).hexdigest()}


def reused(
    command_id: str,
    outcome: dict[str, Any] | None,
    first: FirstUse | None,
    request: Request | None,
) -> errors.FlowError:
    """What a command whose id is already recorded gets: ``IdempotencyConflict`` if both
    uses say what they asked and it differs, else ``DuplicateCommand`` (today's rule)."""
    if (
        first is not None
        and first.digest is not None
        and request is not None
        and request.digest != first.digest
    ):
        return errors.IdempotencyConflict(command_id, first.as_json())
    return errors.DuplicateCommand(command_id, outcome)


def owner_of(command_id: str | Claim | None) -> str | None:
    """The proven owner a command id carries, if any."""
    return command_id.owner if isinstance(command_id, Claim) else None


def split(command_id: str | Claim | None) -> tuple[str | None, Request | None]:
    """(id, request) of a command id given either way."""
    if isinstance(command_id, Claim):
        return command_id.command_id, command_id.request
    return command_id, None
