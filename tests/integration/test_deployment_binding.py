"""A database belongs to one prefix (``PostgresFlowStore.bind_prefix``), also for a daemon
that runs with a role that may only read and write rows (``FLOWD_MIGRATE=0``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowd.core.errors import Misconfigured
from flowd.store.postgres import PostgresFlowStore

pytestmark = pytest.mark.postgres


@pytest.fixture
async def dml_role_url(database_url: str) -> AsyncIterator[str]:
    """``database_url`` as a role with row privileges only (no CREATE): what a
    least-privilege daemon gets after ``flowd migrate`` ran as the owner."""
    role = f"flowd_dml_{uuid.uuid4().hex[:8]}"  # generated, not input
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        await admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
        head, _, tail = database_url.partition("://")
        yield f"{head}://{role}@{tail.split('@', 1)[-1]}"
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.close()
        server = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await server.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await server.close()


async def test_migrate_makes_the_table_a_row_only_role_binds(dml_role_url: str) -> None:
    store = await PostgresFlowStore.connect(dml_role_url, max_size=2)
    try:
        await store.bind_prefix("tenant_a")
        await store.bind_prefix("tenant_a")  # again: its own
        with pytest.raises(Misconfigured, match="'tenant_a', not to this daemon's 'tenant_b'"):
            await store.bind_prefix("tenant_b")
    finally:
        await store.close()


async def test_a_role_that_may_not_bind_gets_one_clear_error(
    database_url: str, dml_role_url: str
) -> None:
    """The daemon's role may not write the binding (INSERT not granted on the table that
    migration 0007 makes): it says what to do, not a traceback."""
    role = dml_role_url.partition("://")[2].split("@", 1)[0]
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"REVOKE INSERT ON flowd_deployment FROM {role}")  # generated name
    await admin.close()
    store = await PostgresFlowStore.connect(dml_role_url, max_size=2)
    try:
        with pytest.raises(Misconfigured, match="run `flowd migrate`"):
            await store.bind_prefix("tenant_a")
    finally:
        await store.close()
