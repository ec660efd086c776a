"""The flow lifecycle as a table of legal moves plus the one check every status change runs.

```mermaid
stateDiagram-v2
    [*] --> created
    created --> running : a start
    running --> waiting : b set_waiting
    waiting --> running : c resume
    running --> finished : d finish
    running --> failed : e fail
    waiting --> failed : f fail
    created --> cancelled : g cancel
    running --> cancelled : h cancel
    waiting --> cancelled : i cancel
```
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class FlowStatus(StrEnum):
    """Where a flow is in its lifecycle."""

    CREATED = "created"
    RUNNING = "running"
    WAITING = "waiting"
    CANCELLED = "cancelled"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True for finished, failed and cancelled: no further change of status."""
        return self in TERMINAL


class FlowStepStatus(StrEnum):
    """Status of one step (one run of an external job, for mirrored flows)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed and cancelled: a late non-terminal report is ignored."""
        return self in STEP_TERMINAL


class SyncMode(StrEnum):
    """Who drives a flow: its caller's commands, or observations of an external job."""

    MANAGED = "managed"
    MIRRORED = "mirrored"


TERMINAL: Final = frozenset({FlowStatus.CANCELLED, FlowStatus.FINISHED, FlowStatus.FAILED})
STEP_TERMINAL: Final = frozenset(
    {FlowStepStatus.SUCCEEDED, FlowStepStatus.FAILED, FlowStepStatus.CANCELLED}
)

MOVES: Final[Mapping[FlowStatus, frozenset[FlowStatus]]] = {
    FlowStatus.CREATED: frozenset({FlowStatus.RUNNING, FlowStatus.CANCELLED}),
    FlowStatus.RUNNING: frozenset(
        {FlowStatus.WAITING, FlowStatus.FINISHED, FlowStatus.FAILED, FlowStatus.CANCELLED}
    ),
    FlowStatus.WAITING: frozenset({FlowStatus.RUNNING, FlowStatus.FAILED, FlowStatus.CANCELLED}),
    FlowStatus.CANCELLED: frozenset(),
    FlowStatus.FINISHED: frozenset(),
    FlowStatus.FAILED: frozenset(),
}


def is_legal(from_status: FlowStatus, to_status: FlowStatus) -> bool:
    """Whether the table allows ``from_status -> to_status``."""
    return to_status in MOVES[from_status]
