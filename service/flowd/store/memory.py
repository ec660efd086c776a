"""InMemoryFlowStore: the store port in dicts, for unit tests and embedding.

Same compare-and-set, atomicity and ordering as PostgresFlowStore, proved by the shared
contract suite. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from flowd.core import errors
from flowd.core.apply import Change
from flowd.core.models import Flow, FlowEvent, FlowStep, JsonObject
from flowd.core.outbox import (
    OutboxMessage,
    ParkedRow,
    Publish,
    applied_outcome,
    change_messages,
    outcome_message,
)
from flowd.core.requests import FirstUse, Request, reused
from flowd.core.status import FlowStatus
from flowd.core.waits import Signal
from flowd.store.port import MAX_PAGE, Due


class InMemoryFlowStore:
    """A FlowStore kept in process memory."""

    def __init__(self, *, outbox: bool = False) -> None:
        self._flows: dict[UUID, Flow] = {}
        self._events: dict[UUID, list[FlowEvent]] = {}
        self._steps: dict[UUID, dict[str, FlowStep]] = {}
        self._outcomes: dict[str, JsonObject] = {}
        self._first_uses: dict[str, FirstUse] = {}
        self._outbox: list[OutboxMessage] | None = [] if outbox else None
        self._parked: dict[int, tuple[str, datetime]] = {}  # row id -> (reason, since)
        self._rows = 0  # outbox row ids handed out
        self._turns = 0
        self._conditions: dict[UUID, list[list[Any]]] = {}  # [Condition, claimed_until]
        self._signals: dict[int, tuple[Signal, bool]] = {}  # id -> (signal, consumed)
        self._lock = asyncio.Lock()
        self._drain_lock = asyncio.Lock()

    async def get(self, flow_id: UUID) -> Flow | None:
        return self._flows.get(flow_id)

    async def get_step(self, flow_id: UUID, run_id: str) -> FlowStep | None:
        return self._steps.get(flow_id, {}).get(run_id)

    async def commit(
        self, change: Change, *, command_id: str | None = None, request: Request | None = None
    ) -> None:
        flow = change.flow
        async with self._lock:
            if command_id is not None:
                self._check_new(command_id, request)
            current = self._flows.get(flow.id)
            if change.expected_revision is None:
                if current is not None:
                    raise errors.FlowExists(flow.id)
            elif current is None:
                raise errors.FlowNotFound(flow.id)
            elif current.revision != change.expected_revision:
                raise errors.RevisionMismatch(flow.id, change.expected_revision, current.revision)
            self._flows[flow.id] = flow
            self._events.setdefault(flow.id, []).extend(change.events)
            if change.step is not None:
                self._steps.setdefault(flow.id, {})[change.step.run_id] = change.step
            if change.conditions is not None:
                self._conditions[flow.id] = [[c, None] for c in change.conditions]
            if change.signal is not None:
                sid = len(self._signals) + 1
                self._signals[sid] = (replace(change.signal, id=sid), False)
            if change.consumed_signal is not None:
                self._signals[change.consumed_signal] = (
                    self._signals[change.consumed_signal][0],
                    True,
                )
            if command_id is not None:
                self._record(command_id, applied_outcome(change), flow.id, request)
            if self._outbox is not None:
                self._queue(change_messages(change, command_id))

    def _check_new(self, command_id: str, request: Request | None) -> None:
        if command_id in self._outcomes:
            first = self._first_uses[command_id]
            raise reused(command_id, self._outcomes[command_id], first, request)

    def _record(
        self, command_id: str, outcome: JsonObject, flow_id: UUID | None, request: Request | None
    ) -> None:
        self._outcomes[command_id] = outcome
        self._first_uses[command_id] = FirstUse(
            None if request is None else request.verb,
            None if request is None else request.digest,
            flow_id,
            datetime.now(UTC),
        )

    async def record_outcome(
        self,
        command_id: str,
        flow_id: UUID | None,
        token: str,
        outcome: JsonObject,
        *,
        request: Request | None = None,
    ) -> None:
        async with self._lock:
            self._check_new(command_id, request)
            self._record(command_id, outcome, flow_id, request)
            if self._outbox is not None:
                self._queue([outcome_message(command_id, token, outcome)])

    async def get_outcome(self, command_id: str) -> JsonObject | None:
        return self._outcomes.get(command_id)

    async def get_first_use(self, command_id: str) -> FirstUse | None:
        return self._first_uses.get(command_id)

    def _queue(self, messages: list[OutboxMessage]) -> None:
        assert self._outbox is not None
        for m in messages:
            self._rows += 1
            self._outbox.append(replace(m, row_id=self._rows))

    async def drain_outbox(self, publish: Publish, *, limit: int = 256) -> int:
        if self._outbox is None or self._drain_lock.locked():
            return 0
        async with self._drain_lock:
            if not self._turns:
                self._turns = 1
            blocked = {m.flow_key for m in self._outbox if m.row_id in self._parked}
            batch = [m for m in self._outbox if m.flow_key not in blocked][:limit]
            # (rows of a parked flow stay for an operator, as on PostgreSQL)
            if not batch:
                return 0
            drained = await publish(batch)
            parked = {} if drained is None else drained.parked
            kept = frozenset() if drained is None else drained.kept
            now = datetime.now(UTC)
            for i, why in parked.items():
                self._parked[batch[i].row_id] = (why, now)
            sent = {m.row_id for i, m in enumerate(batch) if i not in parked and i not in kept}
            self._outbox[:] = [m for m in self._outbox if m.row_id not in sent]
            return len(batch)

    def outbox_drained_elsewhere(self) -> bool:
        return False  # one process: nobody else drains

    def outbox_turns(self) -> int:
        return self._turns

    async def outbox_holding(self, msg_ids: list[str]) -> set[str]:
        return {m.msg_id for m in self._outbox or ()} & set(msg_ids)

    async def outbox_parked(self, *, limit: int = MAX_PAGE) -> list[ParkedRow]:
        rows = [self._parked_row(m, body=False) for m in self._outbox or ()]
        return [r for r in rows if r is not None][: min(limit, MAX_PAGE)]

    async def outbox_parked_count(self) -> int:
        return len(self._parked)

    async def outbox_parked_row(self, row_id: int) -> ParkedRow | None:
        found = [m for m in self._outbox or () if m.row_id == row_id]
        return self._parked_row(found[0], body=True) if found else None

    async def outbox_unpark(self, row_id: int) -> bool:
        return self._parked.pop(row_id, None) is not None

    async def outbox_remove_parked(self, row_id: int) -> bool:
        if self._parked.pop(row_id, None) is None:
            return False
        assert self._outbox is not None
        self._outbox[:] = [m for m in self._outbox if m.row_id != row_id]
        return True

    def _parked_row(self, m: OutboxMessage, *, body: bool) -> ParkedRow | None:
        if m.row_id not in self._parked:
            return None
        reason, since = self._parked[m.row_id]
        text = m.text()
        size = len(text.encode())
        return ParkedRow(
            m.row_id, m.topic, m.msg_id, m.command_id, size, reason, since, text if body else None
        )

    async def outbox_backlog(self) -> int:
        blocked = {m.flow_key for m in self._outbox or () if m.row_id in self._parked}
        return sum(1 for m in self._outbox or () if m.flow_key not in blocked)

    async def list_flows(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | None = None,
        limit: int = 100,
        after: UUID | None = None,
    ) -> list[Flow]:
        flows = sorted(
            (
                f
                for f in self._flows.values()
                if (owner is None or f.owner_session_key == owner)
                and (status is None or f.status == status)
            ),
            key=_created_key,
        )
        if after is not None:
            cursor = self._flows.get(after)
            if cursor is None:
                return []
            flows = [f for f in flows if _created_key(f) > _created_key(cursor)]
        return flows[: min(limit, MAX_PAGE)]

    async def list_steps(self, flow_id: UUID) -> list[FlowStep]:
        steps = self._steps.get(flow_id, {}).values()
        return sorted(steps, key=lambda s: (s.created_at, str(s.id)))

    async def list_events(
        self, flow_id: UUID, *, after_revision: int = -1, limit: int = MAX_PAGE
    ) -> list[FlowEvent]:
        events = [e for e in self._events.get(flow_id, []) if e.revision > after_revision]
        return events[: min(limit, MAX_PAGE)]

    async def prune(self, older_than: datetime) -> int:
        async with self._lock:
            old = [
                f.id
                for f in self._flows.values()
                if f.status.terminal and f.updated_at < older_than
            ]
            for flow_id in old:
                del self._flows[flow_id]
                self._events.pop(flow_id, None)
                self._steps.pop(flow_id, None)
                self._conditions.pop(flow_id, None)
                for sid in [i for i, (sig, _) in self._signals.items() if sig.flow_id == flow_id]:
                    del self._signals[sid]
            return len(old)

    async def pending_signals(self, flow_id: UUID) -> list[Signal]:
        return [
            sig
            for _, (sig, consumed) in sorted(self._signals.items())
            if sig.flow_id == flow_id and not consumed
        ]

    async def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[Due]:
        async with self._lock:
            due = sorted(
                (
                    (row[0].due_at, flow_id, row)
                    for flow_id, rows in self._conditions.items()
                    for row in rows
                    if row[0].due_at is not None
                    and row[0].due_at <= now
                    and (row[1] is None or row[1] < now)
                ),
                key=lambda item: item[0],
            )[:limit]
            claimed = []
            for _, flow_id, row in due:
                row[1] = lease_until
                claimed.append(Due(flow_id, self._flows[flow_id].revision, row[0]))
            return claimed

    async def flows_waiting_on(self, subject: str, correlation_id: str) -> list[UUID]:
        return [
            flow_id
            for flow_id, rows in self._conditions.items()
            if any(r[0].subject == subject and r[0].correlation_id == correlation_id for r in rows)
        ]

    async def wait_subjects(self) -> list[str]:
        return sorted(
            {r[0].subject for rows in self._conditions.values() for r in rows if r[0].subject}
        )

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _created_key(flow: Flow) -> tuple[datetime, str]:
    return (flow.created_at, str(flow.id))
