"""What PostgreSQL cannot hold is refused as invalid_input by the store itself (SQLSTATE class
22), with a message of its own, and nothing is written: a last line behind the door's checks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from flowd import FlowManager
from flowd.core import apply
from flowd.core.errors import InvalidInput
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import running_flow

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800"])
async def test_a_value_postgres_cannot_hold_is_invalid_input_and_writes_nothing(
    pg_store: PostgresFlowStore, bad: str
) -> None:
    flow = await running_flow(FlowManager(pg_store))
    change = apply.update_state(flow, {"x": bad}, now=datetime.now(UTC), new_id=uuid.uuid4)
    with pytest.raises(InvalidInput) as refused:
        await pg_store.commit(change, command_id="c-1")  # past the core: the store itself
    assert "SQLSTATE 22" in refused.value.message
    assert bad not in refused.value.message
    with pytest.raises(InvalidInput):
        await pg_store.record_outcome(f"c-{bad}", flow.id, str(flow.id), {"status": "rejected"})
    assert await pg_store.get(flow.id) == flow  # nothing written
    assert await pg_store.get_outcome("c-1") is None
    assert await pg_store.outbox_backlog() == 0
