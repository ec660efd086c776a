"""The values flowd keeps: flows, their steps and their audit events, plus the creation inputs.

Stored values (``Flow``, ``FlowStep``, ``FlowEvent``) are frozen; inputs are strict pydantic
models that reject unknown fields and wrong types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from flowd.core.status import FlowStatus, FlowStepStatus, SyncMode

JsonObject = dict[str, JsonValue]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
# Inputs: unknown fields are errors; strings must be strings (fields say strict=True), while
# enums and UUIDs are also accepted in their JSON spelling.
_INPUT = ConfigDict(frozen=True, extra="forbid")


class Flow(BaseModel):
    """A long-running job: status, JSON state, current step and revision."""

    model_config = _FROZEN

    id: UUID
    controller_id: str
    goal: str
    owner_session_key: str
    requester_origin: str | None = None
    sync_mode: SyncMode
    status: FlowStatus
    current_step: str | None = None
    state_json: JsonObject = Field(default_factory=dict)
    wait_json: JsonObject | None = None
    cancel_requested_at: datetime | None = None
    revision: int
    created_at: datetime
    updated_at: datetime

    def evolve(self, **changes: Any) -> Flow:
        """A copy with ``changes`` applied (no validation: core callers pass valid values)."""
        return self.model_copy(update=changes)


class FlowStep(BaseModel):
    """One step of a flow; for mirrored flows one run of an external job, keyed by run_id."""

    model_config = _FROZEN

    id: UUID
    flow_id: UUID
    run_id: str
    task: str
    status: FlowStepStatus
    child_session_key: str | None = None
    result_json: JsonValue = None
    created_at: datetime
    updated_at: datetime


class FlowEvent(BaseModel):
    """One entry of a flow's audit log; ``revision`` is the flow's revision after the change."""

    model_config = _FROZEN

    id: UUID
    flow_id: UUID
    revision: int
    kind: str
    payload: JsonObject = Field(default_factory=dict)
    at: datetime


class CreateManagedInput(BaseModel):
    """What a caller gives to create a flow (managed or mirrored)."""

    model_config = _INPUT

    id: UUID | None = Field(default=None, description="Optional client-chosen flow id.")
    controller_id: str = Field(strict=True, min_length=1, max_length=200)
    goal: str = Field(strict=True, max_length=10_000)
    owner_session_key: str = Field(strict=True, min_length=1, max_length=200)
    requester_origin: str | None = Field(default=None, strict=True, max_length=200)
    current_step: str | None = Field(default=None, strict=True, max_length=200)
    state_json: JsonObject = Field(default_factory=dict)


CreateMirroredInput = CreateManagedInput


class StepObservation(BaseModel):
    """A report about one run of an external job feeding a mirrored flow."""

    model_config = _INPUT

    flow_id: UUID
    run_id: str = Field(strict=True, min_length=1, max_length=200)
    task: str = Field(strict=True, min_length=1, max_length=200)
    status: FlowStepStatus
    child_session_key: str | None = Field(default=None, strict=True, max_length=200)
    result_json: JsonValue = None
