"""flowd: durable multi-step flows in PostgreSQL, driven over NATS.

The public names are listed in ``__all__``. Adapters that need a driver (PostgreSQL) are
imported on first use, so ``import flowd.core`` pulls in no I/O library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowd.core.errors import (
    AlreadyTerminal,
    CancelPending,
    FlowError,
    FlowExists,
    FlowNotFound,
    InvalidInput,
    InvalidTransition,
    RevisionMismatch,
    StateTooLarge,
    StoreUnavailable,
)
from flowd.core.models import (
    CreateManagedInput,
    CreateMirroredInput,
    Flow,
    FlowEvent,
    FlowStep,
    StepObservation,
)
from flowd.core.status import FlowStatus, FlowStepStatus, SyncMode
from flowd.manager import FlowManager
from flowd.store.memory import InMemoryFlowStore
from flowd.store.port import FlowStore

if TYPE_CHECKING:
    from flowd.store.postgres import PostgresFlowStore

__all__ = [
    "AlreadyTerminal",
    "CancelPending",
    "CreateManagedInput",
    "CreateMirroredInput",
    "Flow",
    "FlowError",
    "FlowEvent",
    "FlowExists",
    "FlowManager",
    "FlowNotFound",
    "FlowStatus",
    "FlowStep",
    "FlowStepStatus",
    "FlowStore",
    "InMemoryFlowStore",
    "InvalidInput",
    "InvalidTransition",
    "PostgresFlowStore",
    "RevisionMismatch",
    "StateTooLarge",
    "StepObservation",
    "StoreUnavailable",
    "SyncMode",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresFlowStore":
        from flowd.store.postgres import PostgresFlowStore

        return PostgresFlowStore
    raise AttributeError(f"module 'flowd' has no attribute {name!r}")
