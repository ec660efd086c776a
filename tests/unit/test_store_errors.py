"""Which driver failures the PostgreSQL store reports as "try again later"."""

from __future__ import annotations

import asyncpg
import pytest

from flowd.core.errors import StoreUnavailable
from flowd.store import postgres


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        ConnectionResetError(),
    ],
)
async def test_connection_trouble_is_store_unavailable(exc: Exception) -> None:
    with pytest.raises(StoreUnavailable):
        async with postgres._translated():
            raise exc


async def test_a_query_error_is_not_hidden() -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        async with postgres._translated():
            raise asyncpg.UndefinedTableError("relation does not exist")
