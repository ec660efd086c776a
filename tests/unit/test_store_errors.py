"""Which driver failures the PostgreSQL store reports as "try again later"."""

from __future__ import annotations

import asyncio
import gc

import asyncpg
import pytest

from flowd.core.errors import InvalidInput, StoreUnavailable
from flowd.store import postgres


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        ConnectionResetError(),
        # the database turned read-only (default_transaction_read_only, a standby)
        asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.PostgresIOError("could not read block"),
        asyncpg.LockNotAvailableError("could not obtain lock"),
        asyncpg.InsufficientPrivilegeError("permission denied for table flows"),
        asyncpg.InvalidCatalogNameError('database "flowd" does not exist'),
        asyncpg.SerializationError("could not serialize access"),
    ],
)
async def test_connection_trouble_is_store_unavailable(exc: Exception) -> None:
    with pytest.raises(StoreUnavailable):
        async with postgres._translated():
            raise exc


@pytest.mark.parametrize(
    ("exc", "condition"),
    [
        (
            asyncpg.UntranslatableCharacterError('unsupported Unicode escape sequence "\\u0000"'),
            "untranslatable character",
        ),
        (
            asyncpg.NumericValueOutOfRangeError("value 1e400 out of range"),
            "numeric value out of range",
        ),
        (
            asyncpg.InvalidTextRepresentationError('invalid input syntax "secret"'),
            "invalid text representation",
        ),
        (asyncpg.DataError("invalid input for query argument $5: 'secret'"), "data exception"),
        (
            asyncpg.ProgramLimitExceededError("total size of jsonb array elements"),
            "program limit exceeded",
        ),
    ],
)
async def test_a_value_the_database_cannot_hold_is_invalid_input(
    exc: Exception, condition: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        async with postgres._translated():
            raise exc
    assert condition in refused.value.message
    assert "secret" not in refused.value.message  # the driver's text (maybe the value) stays out
    assert refused.value.details() == {"errors": {"_": refused.value.message}}


async def test_a_query_error_is_not_hidden() -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        async with postgres._translated():
            raise asyncpg.UndefinedTableError("relation does not exist")


class _Con:
    async def fetchrow(self, sql: str, *args: object) -> dict[str, object]:
        return {"args": args}


class _BrokenReleasePool:
    """Hands out a connection whose release fails (asyncpg terminated it meanwhile)."""

    def __init__(self) -> None:
        self.released = 0

    async def acquire(self) -> _Con:
        return _Con()

    async def release(self, con: _Con) -> None:
        self.released += 1
        raise asyncpg.InterfaceError("connection is closed")


async def test_a_failed_background_release_is_nobodys_error() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        pool = _BrokenReleasePool()
        commit = postgres._GroupCommit(pool, "SELECT $1")  # type: ignore[arg-type]
        assert await commit.fetchrow(7) == {"args": (7,)}  # the caller has its row at once
        for _ in range(5):
            await asyncio.sleep(0)  # the release runs in the background
        gc.collect()
        assert pool.released == 1
        assert reported == []  # no "Task exception was never retrieved"
    finally:
        loop.set_exception_handler(None)
