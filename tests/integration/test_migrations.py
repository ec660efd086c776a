"""Migrations: well-formed files, concurrent and repeated runs, failure records nothing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import pytest

from flowd import FlowManager
from flowd.core.errors import StoreUnavailable
from flowd.store import migrate
from flowd.store.postgres import PostgresFlowStore
from tests.support.factories import create_input

pytestmark = pytest.mark.postgres

REPO_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def test_migration_files_are_numbered_contiguously() -> None:
    files = sorted(p.name for p in REPO_MIGRATIONS.glob("*"))
    assert all(re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", f) for f in files), files
    assert [m.version for m in migrate.load(REPO_MIGRATIONS)] == list(range(1, len(files) + 1))


def test_loader_rejects_gaps_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("select 1")
    (tmp_path / "0003_c.sql").write_text("select 1")
    with pytest.raises(migrate.MigrationError, match="0002 is missing"):
        migrate.load(tmp_path)
    (tmp_path / "2_bad.sql").write_text("select 1")
    with pytest.raises(migrate.MigrationError, match="badly named"):
        migrate.load(tmp_path)


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM flowd_migrations")]
    finally:
        await conn.close()


async def test_ten_concurrent_runners_apply_each_migration_once(empty_database_url: str) -> None:
    stores = [await PostgresFlowStore.connect(empty_database_url) for _ in range(10)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
    finally:
        for s in stores:
            await s.close()
    applied = [name for r in results for name in r]
    expected = [f"{m.version:04d}_{m.name}" for m in migrate.load()]
    assert sorted(applied) == sorted(expected)  # each applied by exactly one runner
    assert await _versions(empty_database_url) == [m.version for m in migrate.load()]


async def test_migrate_twice_is_a_no_op_and_check_agrees(empty_database_url: str) -> None:
    store = await PostgresFlowStore.connect(empty_database_url)
    try:
        assert await store.pending_migrations() == [
            f"{m.version:04d}_{m.name}" for m in migrate.load()
        ]
        assert await store.migrate()
        assert await store.migrate() == []
        assert await store.pending_migrations() == []
    finally:
        await store.close()


async def test_changed_applied_migration_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE flowd_migrations SET checksum = 'x' WHERE version = 1")
    finally:
        await conn.close()
    store = await PostgresFlowStore.connect(database_url)
    try:
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await store.migrate()
    finally:
        await store.close()


async def test_failed_migration_records_nothing(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for m in migrate.load():
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    broken = len(migrate.load()) + 1
    (tmp_path / f"{broken:04d}_broken.sql").write_text(
        "CREATE TABLE half_done (x int); SELECT no_such_function();"
    )
    monkeypatch.setattr(migrate, "directory", lambda: tmp_path)
    store = await PostgresFlowStore.connect(empty_database_url)
    try:
        with pytest.raises(migrate.MigrationError, match="no_such_function"):
            await store.migrate()
        assert await store.pending_migrations() == [f"{broken:04d}_broken"]
        conn = await asyncpg.connect(empty_database_url)
        try:
            assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        finally:
            await conn.close()
    finally:
        await store.close()


def test_flowd_migrate_cli(empty_database_url: str) -> None:
    import subprocess
    import sys

    def flowd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowd", *args, "--database-url", empty_database_url],
            capture_output=True,
            text=True,
            check=False,
        )

    check = flowd("check")
    assert (check.returncode, check.stdout.startswith("pending: 0001_flows")) == (1, True)
    applied = flowd("migrate")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.startswith("applied: 0001_flows")
    assert flowd("migrate").stdout.strip() == "schema is up to date"
    assert flowd("check").returncode == 0


async def test_a_read_only_database_is_unavailable_not_a_schema_error(
    database_url: str, pg_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = database_url.partition("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server)
    # (the name is the fixture's, never user input: identifiers cannot be bound)
    await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    store = await PostgresFlowStore.connect(database_url)
    try:
        assert await store.migrate() == []  # nothing pending: nothing written, it starts
        with pytest.raises(StoreUnavailable):  # a write waits for the database
            await FlowManager(store).create_managed(create_input())
        known = migrate.load()
        extra = migrate.Migration(len(known) + 1, "extra", "CREATE TABLE extra (a int)")
        monkeypatch.setattr(migrate, "load", lambda path=None: [*known, extra])
        with pytest.raises(StoreUnavailable):  # not MigrationError: flowd waits, not exits
            await store.migrate()
    finally:
        await store.close()
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()
