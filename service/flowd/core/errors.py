"""The error tree of flowd, with the stable ``code`` each error carries on the wire.

::

    FlowError                       code "flow_error"
    ├── FlowNotFound                "not_found"            flow_id
    ├── FlowExists                  "already_exists"       flow_id
    ├── InvalidTransition           "invalid_transition"   flow_id, from_status, to_status, reason
    │   ├── AlreadyTerminal         (reason "already_terminal")
    │   └── CancelPending           (reason "cancel_pending")
    ├── RevisionMismatch            "revision_mismatch"    flow_id, expected, actual
    ├── InvalidInput                "invalid_input"        errors (field -> message)
    │   └── StateTooLarge           (reason "state_too_large", size, limit)
    ├── Forbidden                   "forbidden"            reason
    ├── DuplicateCommand            "duplicate_command"    command_id, outcome
    ├── IdempotencyConflict         "idempotency_conflict" command_id, first (verb, flow_id, at)
    └── Internal                    "internal"             error (the exception's type)
    StoreUnavailable                "store_unavailable"    transient; retry later
    Busy                            "busy"                 limit; transient (API only)

``StoreUnavailable`` is a ``FlowError`` too so callers can catch one base class, but it is the
only *transient* one the daemon meets: it retries it, every other code is final for that
input. ``Busy`` is an API reply only (too many requests in flight): the client retries it.
"""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

from flowd.core.status import FlowStatus


class FlowError(Exception):
    """A flow operation failed."""

    code: ClassVar[str] = "flow_error"
    transient: ClassVar[bool] = False

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        super().__init__(self.message)

    def details(self) -> dict[str, Any]:
        """Structured fields of the error, JSON-ready, for replies and logs."""
        return {}


class FlowNotFound(FlowError):
    """No flow has this id."""

    code = "not_found"

    def __init__(self, flow_id: UUID) -> None:
        self.flow_id = flow_id
        super().__init__(f"flow {flow_id} not found")

    def details(self) -> dict[str, Any]:
        return {"flow_id": str(self.flow_id)}


class FlowExists(FlowError):
    """A flow with this id already exists."""

    code = "already_exists"

    def __init__(self, flow_id: UUID) -> None:
        self.flow_id = flow_id
        super().__init__(f"flow {flow_id} already exists")

    def details(self) -> dict[str, Any]:
        return {"flow_id": str(self.flow_id)}


class InvalidTransition(FlowError):
    """The flow's status does not allow this operation."""

    code = "invalid_transition"
    reason: ClassVar[str] = "illegal_transition"

    def __init__(
        self,
        flow_id: UUID,
        from_status: FlowStatus,
        to_status: FlowStatus,
        message: str | None = None,
    ) -> None:
        self.flow_id = flow_id
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(
            message
            or f"flow {flow_id}: illegal transition {from_status.value} -> {to_status.value}"
        )

    def details(self) -> dict[str, Any]:
        return {
            "flow_id": str(self.flow_id),
            "from": self.from_status.value,
            "to": self.to_status.value,
            "reason": self.reason,
        }


class AlreadyTerminal(InvalidTransition):
    """The flow is terminal (finished, failed or cancelled) and accepts no mutation."""

    reason = "already_terminal"

    def __init__(self, flow_id: UUID, status: FlowStatus, to_status: FlowStatus) -> None:
        super().__init__(
            flow_id, status, to_status, f"flow {flow_id} is already terminal ({status.value})"
        )


class CancelPending(InvalidTransition):
    """Cancel was requested: only ``cancel`` is accepted now."""

    reason = "cancel_pending"

    def __init__(self, flow_id: UUID, status: FlowStatus, to_status: FlowStatus) -> None:
        super().__init__(
            flow_id,
            status,
            to_status,
            f"flow {flow_id} has a pending cancel request; only cancel is accepted",
        )


class RevisionMismatch(FlowError):
    """The flow changed since the revision the write was based on."""

    code = "revision_mismatch"

    def __init__(self, flow_id: UUID, expected: int, actual: int) -> None:
        self.flow_id = flow_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"flow {flow_id}: expected revision {expected}, found {actual}")

    def details(self) -> dict[str, Any]:
        return {"flow_id": str(self.flow_id), "expected": self.expected, "actual": self.actual}


class InvalidInput(FlowError):
    """The input is malformed; nothing was written."""

    code = "invalid_input"

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        """``errors`` maps each offending field (a dotted path) to what is wrong with it; ``_``
        stands for the input as a whole, and is the default."""
        self.errors = errors or {"_": message}
        super().__init__(message)

    def details(self) -> dict[str, Any]:
        return {"errors": self.errors}  # one shape, always


class StateTooLarge(InvalidInput):
    """The flow's state would exceed its size limit (``FLOWD_MAX_STATE_BYTES``)."""

    reason: ClassVar[str] = "state_too_large"

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"state_json would be {size} bytes, over the {limit} byte limit",
            {"state_json": f"{size} bytes exceeds the limit of {limit}"},
        )

    def details(self) -> dict[str, Any]:
        return {**super().details(), "reason": self.reason, "size": self.size, "limit": self.limit}


class Forbidden(FlowError):
    """The command does not prove it acts for the flow's owner (``FLOWD_ENFORCE_OWNER``)."""

    code = "forbidden"

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason}


class DuplicateCommand(FlowError):
    """This command id was already processed; nothing was applied again."""

    code = "duplicate_command"

    def __init__(self, command_id: str, outcome: dict[str, Any] | None) -> None:
        self.command_id = command_id
        self.outcome = outcome or {}
        super().__init__(f"command {command_id} was already processed")

    def details(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "outcome": self.outcome}


class IdempotencyConflict(FlowError):
    """This command id was first used for a different request; nothing was applied."""

    code = "idempotency_conflict"

    def __init__(self, command_id: str, first: dict[str, Any]) -> None:
        self.command_id = command_id
        self.first = first
        super().__init__(
            f"command id {command_id!r} was first used for {first.get('verb')} on flow "
            f"{first.get('flow_id')} at {first.get('at')}, a different request; use a new id"
        )

    def details(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "first": self.first}


class Internal(FlowError):
    """flowd failed on this input (a bug); nothing was applied."""

    code = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        self._details = details or {}
        super().__init__(message)

    def details(self) -> dict[str, Any]:
        return self._details


class StoreUnavailable(FlowError):
    """The store could not be reached; the operation may be retried."""

    code = "store_unavailable"
    transient = True


class Misconfigured(Exception):
    """flowd cannot run as configured and retrying will not help: NATS or PostgreSQL refused
    its credentials or TLS, or a name it would use (a stream, a database) belongs to another
    prefix. ``flowd run`` logs the one-line message and exits 1. Not a ``FlowError``: it never
    reaches the wire."""


class Busy(FlowError):
    """flowd is serving as many API requests as it may at once; retry shortly."""

    code = "busy"
    transient = True

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"{limit} API requests in flight already; retry shortly")

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit}
