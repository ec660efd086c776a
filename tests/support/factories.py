"""Small builders shared by tests."""

from __future__ import annotations

import asyncio
from typing import Any

from flowd import CreateManagedInput, FlowManager
from flowd.core.models import Flow


def create_input(**overrides: Any) -> CreateManagedInput:
    fields: dict[str, Any] = {
        "controller_id": "ctl-1",
        "goal": "ship the thing",
        "owner_session_key": "owner-1",
        "requester_origin": "tests",
        "current_step": "plan",
        "state_json": {"n": 0},
    }
    fields.update(overrides)
    return CreateManagedInput(**fields)


async def running_flow(manager: FlowManager, **overrides: Any) -> Flow:
    flow = await manager.create_managed(create_input(**overrides))
    return await manager.start_running(flow.id)


class YieldingStore:
    """Wraps a store so every read yields to the loop: concurrent writers really interleave
    (the in-memory store otherwise runs each coroutine to the end without a switch)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get(self, flow_id: Any) -> Any:
        flow = await self._inner.get(flow_id)
        await asyncio.sleep(0)
        return flow
