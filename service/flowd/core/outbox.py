"""What flowd announces about a change: outbox messages, built purely from the change.

A message has a *topic* relative to the deployment's subject prefix (``evt.<flow>.<kind>``
for events, ``out.<token>`` for command outcomes that are not events), a ``msg_id`` used as
``Nats-Msg-Id`` so JetStream drops a re-send, and a JSON body (documented in subjects.md).
Stores write these rows in the mutation's transaction; the relay publishes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from flowd.core import jsontext
from flowd.core.apply import Change
from flowd.core.models import Flow, FlowEvent, JsonObject

#: Bytes of an event besides its flow's state and the (at most two) bodies it carries: the goal
#: (10,000 characters, up to 6 bytes each JSON-escaped), eight short strings of up to 200
#: characters (controller, owner, origin, step, command id, next step, signal name, run id),
#: ids, timestamps, numbers, keys, and the NATS headers.
EVENT_OVERHEAD: Final = 72 * 1024


def largest_event_bytes(max_state: int, max_payload: int) -> int:
    """An upper bound of an event message's size (body and headers) with states of at most
    ``max_state`` bytes and command bodies of at most ``max_payload``: the snapshot's state,
    plus two copies of a body or of what it merges into the state (``waiting``: the wait in
    the payload and in the snapshot's ``wait_json``; ``resumed``: its patch and its cause,
    a wake that is also merged into the state; ``state_updated`` / ``finished``: the patch),
    plus ``EVENT_OVERHEAD``."""
    return max_state + 2 * max(max_state, max_payload) + EVENT_OVERHEAD


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message to publish, exactly once, in the order it was written. ``body`` is the
    JSON object, or its text as a store kept it (published as it is)."""

    topic: str
    msg_id: str
    command_id: str | None
    body: JsonObject | str
    row_id: int = 0  # the store's id of the row (0 until stored)

    def text(self) -> str:
        """The body as compact JSON text."""
        if isinstance(self.body, str):
            return self.body
        return jsontext.dumps(self.body)

    @property
    def flow_key(self) -> str:
        """Which flow the message is about (``flow_key``)."""
        return flow_key(self.topic)


def flow_key(topic: str) -> str:
    """The flow a topic is about: the token after ``evt.`` / ``out.``, lower-cased (an
    outcome's token echoes the flow id as published, maybe in upper case). A flow's messages
    go out in order: one the relay cannot publish holds back the later ones with its key.
    (The stores' SQL spells it ``lower(split_part(topic, '.', 2))``.)"""
    return topic.split(".", 2)[1].lower() if "." in topic else topic.lower()


@dataclass(frozen=True, slots=True)
class Drained:
    """What the relay made of a batch (``FlowStore.drain_outbox``): rows to *park* (batch
    index -> why: a refusal retrying will not cure), and rows it *kept* back unsent (a row
    of their flow was parked before them). Every other row was published, or found already
    stored by JetStream, and is deleted."""

    parked: Mapping[int, str] = field(default_factory=dict)
    kept: frozenset[int] = frozenset()


#: What ``drain_outbox`` hands a batch to; None means every row was published.
Publish = Callable[[list[OutboxMessage]], Awaitable[Drained | None]]


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """An outbox row the relay parked, as ``flowctl outbox`` lists it."""

    row_id: int
    topic: str
    msg_id: str
    command_id: str | None
    size: int  # of the body, bytes
    reason: str
    since: datetime
    body: str | None = None  # only when asked for (to copy it to a dead letter)

    def summary(self) -> JsonObject:
        """The row as JSON (without its body)."""
        return {
            "id": self.row_id,
            "topic": self.topic,
            "msg_id": self.msg_id,
            "command_id": self.command_id,
            "size": self.size,
            "reason": self.reason,
            "since": self.since.isoformat(),
        }


def snapshot(flow: Flow) -> JsonObject:
    """The flow as JSON, as it appears in event bodies and API replies."""
    data: dict[str, Any] = flow.model_dump(mode="json")
    return data


def event_message(
    event: FlowEvent, flow: Flow, command_id: str | None, *, final: bool
) -> OutboxMessage:
    """The message announcing ``event``; ``flow`` is the snapshot right after it."""
    body: JsonObject = {
        "event_id": str(event.id),
        "flow_id": str(event.flow_id),
        "kind": event.kind,
        "revision": event.revision,
        "at": event.at.isoformat(),
        "command_id": command_id,
        "final": final,
        "payload": event.payload,
        "flow": snapshot(flow),
    }
    return OutboxMessage(f"evt.{event.flow_id}.{event.kind}", str(event.id), command_id, body)


def change_messages(change: Change, command_id: str | None) -> list[OutboxMessage]:
    """One message per event of ``change``, each with the flow as it was after that event."""
    last = len(change.events) - 1
    return [
        event_message(
            event,
            change.flow if i == last else change.flow.evolve(**change.before_last),
            command_id,
            final=i == last,
        )
        for i, event in enumerate(change.events)
    ]


def outcome_token(flow_id: UUID | str | None) -> str:
    """The subject token outcomes of a command about ``flow_id`` are published under."""
    return "create" if flow_id is None else str(flow_id)


def outcome_message(command_id: str, token: str, outcome: JsonObject) -> OutboxMessage:
    """The message for an outcome that is not an event (rejected or unchanged)."""
    body: JsonObject = {"command_id": command_id, **outcome}
    return OutboxMessage(f"out.{token}", f"out-{command_id}", command_id, body)


def applied_outcome(change: Change) -> JsonObject:
    """The recorded outcome of a command whose change was committed."""
    return {
        "status": "applied",
        "flow_id": str(change.flow.id),
        "revision": change.flow.revision,
        "events": [str(e.id) for e in change.events],
    }
