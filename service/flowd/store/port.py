"""The store port: what FlowManager needs from storage, as a Protocol.

Every adapter (``InMemoryFlowStore``, ``PostgresFlowStore``) passes the same contract suite
(``tests/contract``). No connection or transaction object crosses this port: ``commit`` writes
one ``Change`` (flow row, events, step) atomically or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from flowd.core.apply import Change
from flowd.core.models import Flow, FlowEvent, FlowStep, JsonObject
from flowd.core.outbox import ParkedRow, Publish
from flowd.core.requests import FirstUse, Request
from flowd.core.status import FlowStatus
from flowd.core.waits import Condition, Signal

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed due condition: which flow, at which revision, and why."""

    flow_id: UUID
    revision: int
    condition: Condition


class FlowStore(Protocol):
    """Storage of flows, steps and events with compare-and-set writes."""

    async def get(self, flow_id: UUID) -> Flow | None:
        """The flow, or None."""
        ...

    async def get_step(self, flow_id: UUID, run_id: str) -> FlowStep | None:
        """The step of ``flow_id`` with ``run_id``, or None."""
        ...

    async def commit(
        self, change: Change, *, command_id: str | None = None, request: Request | None = None
    ) -> None:
        """Write ``change`` atomically.

        An insert (``expected_revision is None``) raises ``FlowExists`` if the id is taken.
        An update lands only if the row still has ``expected_revision``; otherwise it raises
        ``RevisionMismatch`` (or ``FlowNotFound``) and writes nothing.
        With ``command_id``, the id is recorded as processed in the same transaction, with
        ``request`` (what the command asked); an id seen before writes nothing and raises
        ``core.requests.reused``: ``IdempotencyConflict`` if both uses have a request and
        they differ, else ``DuplicateCommand``. With the outbox on, one outbox message per
        event is written in the same transaction too.
        """
        ...

    async def record_outcome(
        self,
        command_id: str,
        flow_id: UUID | None,
        token: str,
        outcome: JsonObject,
        *,
        request: Request | None = None,
    ) -> None:
        """Record the outcome of a command that changed no flow (rejected, unchanged) and,
        with the outbox on, queue its ``out.<token>`` message; atomically. A known
        ``command_id`` raises as in ``commit``."""
        ...

    async def get_outcome(self, command_id: str) -> JsonObject | None:
        """The recorded outcome of a processed command, or None."""
        ...

    async def get_first_use(self, command_id: str) -> FirstUse | None:
        """What the record of a processed command says about its first use, or None."""
        ...

    async def drain_outbox(self, publish: Publish, *, limit: int = 256) -> int:
        """Hand the oldest unsent outbox messages (in write order) to ``publish``; returns how
        many. Rows that are parked, and every row of a flow (``core.outbox.flow_key``) that
        has a parked row, are not handed out. Once ``publish`` returns, the rows its
        ``Drained`` parks are parked, those it kept stay as they are, and the rest are not
        handed out again: deleted at once, or (PostgreSQL) by the next call or ``close``. If
        ``publish`` raises, they all stay. Only one drainer at a time across all processes
        (others get 0), so order holds."""
        ...

    def outbox_turns(self) -> int:
        """How many times this store took the drain lock. A new turn means rows published by
        an earlier holder (or by this one before a failure) may not have been deleted."""
        ...

    async def outbox_holding(self, msg_ids: list[str]) -> set[str]:
        """Which of ``msg_ids`` are message ids of rows still in the outbox (rarely asked:
        it may read the whole outbox)."""
        ...

    async def outbox_parked(self, *, limit: int = MAX_PAGE) -> list[ParkedRow]:
        """Parked rows, oldest first (without their bodies)."""
        ...

    async def outbox_parked_count(self) -> int:
        """How many rows are parked."""
        ...

    async def outbox_parked_row(self, row_id: int) -> ParkedRow | None:
        """The parked row ``row_id`` with its body, or None (no such row, or not parked)."""
        ...

    async def outbox_unpark(self, row_id: int) -> bool:
        """Un-park row ``row_id`` (the relay tries it again); False if it is not parked."""
        ...

    async def outbox_remove_parked(self, row_id: int) -> bool:
        """Delete the parked row ``row_id`` (its flow's later rows go out then); False if it
        is not parked."""
        ...

    def outbox_drained_elsewhere(self) -> bool:
        """Whether the last ``drain_outbox`` found another process holding the drain lock:
        that process publishes this one's rows too (and should be told there are some)."""
        ...

    async def outbox_backlog(self) -> int:
        """How many outbox messages wait to be published (not counting parked rows and the
        rows of their flows, which wait for an operator)."""
        ...

    async def list_flows(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | None = None,
        limit: int = 100,
        after: UUID | None = None,
    ) -> list[Flow]:
        """Flows matching the filters, ordered by (created_at, id), after the cursor flow."""
        ...

    async def list_steps(self, flow_id: UUID) -> list[FlowStep]:
        """The steps of a flow, oldest first."""
        ...

    async def list_events(
        self, flow_id: UUID, *, after_revision: int = -1, limit: int = MAX_PAGE
    ) -> list[FlowEvent]:
        """Events of a flow with revision > ``after_revision``, in revision order."""
        ...

    async def prune(self, older_than: datetime) -> int:
        """Delete terminal flows last updated before ``older_than`` (with steps and events)."""
        ...

    # -- the wait engine -----------------------------------------------------------------------

    async def pending_signals(self, flow_id: UUID) -> list[Signal]:
        """Signals kept for ``flow_id`` and not consumed yet, oldest first."""
        ...

    async def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[Due]:
        """Claim up to ``limit`` conditions due at ``now`` (timers, timeouts, cancels) that
        nobody holds, leasing them until ``lease_until``; soonest first. Any number of
        claimers at once each get different rows (PostgreSQL: FOR UPDATE SKIP LOCKED)."""
        ...

    async def flows_waiting_on(self, subject: str, correlation_id: str) -> list[UUID]:
        """Flows with a subject condition on ``subject`` with ``correlation_id``."""
        ...

    async def wait_subjects(self) -> list[str]:
        """Every subject some waiting flow has a condition on."""
        ...

    async def ping(self) -> None:
        """Return if the store answers; raise StoreUnavailable if not."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...
