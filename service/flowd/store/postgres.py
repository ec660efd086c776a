"""PostgresFlowStore: the store port over an asyncpg pool. The only module holding SQL
outside ``migrations/``; every value is a bound parameter.

Driver errors are translated once, here (``_translated``): connection loss and transient
conflicts become ``StoreUnavailable``; nothing above this module sees an asyncpg type.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from uuid import UUID

import asyncpg

from flowd.core import errors, jsontext
from flowd.core.apply import Change
from flowd.core.models import Flow, FlowEvent, FlowStep, JsonObject
from flowd.core.outbox import (
    OutboxMessage,
    ParkedRow,
    Publish,
    applied_outcome,
    change_messages,
    outcome_message,
)
from flowd.core.requests import FirstUse, Request, reused
from flowd.core.status import FlowStatus, FlowStepStatus, SyncMode
from flowd.core.waits import Condition, Signal
from flowd.store import migrate
from flowd.store.port import MAX_PAGE, Due

if TYPE_CHECKING:
    _Conn: TypeAlias = asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]

MIGRATION_LOCK_KEY: Final = 0x666C6F7764  # "flowd"
OUTBOX_LOCK_KEY: Final = 0x666C6F7764_01
_NEG_INFINITY: Final = datetime.min.replace(tzinfo=UTC)
_NIL: Final = UUID(int=0)

# -- migrations -------------------------------------------------------------------------------
LOCK_MIGRATIONS: Final = "SELECT pg_advisory_lock($1)"
UNLOCK_MIGRATIONS: Final = "SELECT pg_advisory_unlock($1)"
CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS flowd_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
SELECT_MIGRATIONS: Final = "SELECT version, checksum FROM flowd_migrations ORDER BY version"
SELECT_MIGRATIONS_IF_ANY: Final = """
SELECT version, checksum FROM flowd_migrations
WHERE to_regclass('flowd_migrations') IS NOT NULL ORDER BY version"""
TABLE_EXISTS: Final = "SELECT to_regclass('flowd_migrations') IS NOT NULL"
RECORD_MIGRATION: Final = (
    "INSERT INTO flowd_migrations (version, name, checksum) VALUES ($1, $2, $3)"
)
# The subject prefix a database belongs to (the table: migration 0007), written by the first
# daemon that starts on the database.
BIND_PREFIX: Final = "INSERT INTO flowd_deployment (prefix) VALUES ($1) ON CONFLICT DO NOTHING"
BOUND_PREFIX: Final = "SELECT prefix FROM flowd_deployment"
CURRENT_SCHEMA: Final = "SELECT current_schema()"
# Schemas of this database (other than the one in use) holding flowd's tables: advisory locks
# (migrations, the outbox relay, partition leases) are per database, so two deployments in two
# schemas of one database would take each other's locks.
OTHER_FLOWD_SCHEMAS: Final = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = 'flowd_migrations' AND c.relkind = 'r' AND n.nspname <> current_schema()
ORDER BY 1"""

# -- flows ------------------------------------------------------------------------------------
SELECT_FLOW: Final = """
SELECT id, controller_id, goal, owner_session_key, requester_origin, sync_mode, status,
       current_step, state_json, wait_json, cancel_requested_at, revision, created_at, updated_at
FROM flows WHERE id = $1"""
UPDATE_FLOW: Final = """
UPDATE flows SET status = $3, current_step = $4, state_json = $5, wait_json = $6,
    cancel_requested_at = $7, revision = $8, updated_at = $9
WHERE id = $1 AND revision = $2"""
SELECT_REVISION: Final = "SELECT revision FROM flows WHERE id = $1"
# The common change (one flow row, its event, its outbox row, its command id, maybe the
# end of a wait) as ONE statement: one round trip and one implicit transaction instead of
# six. Every part hangs off the row the UPDATE returned, so a lost compare-and-set or an
# already processed command id writes nothing at all. The trailing SELECT reads the
# statement's snapshot: the revision before the change, and whether the id was known.
# The event and the message are scalar parameters (a NULL topic: no outbox message, for a
# store without one); a change of several events takes the general path (_commit_tx).
# Encoding one-element arrays instead cost the daemon ~8 us of CPU per change (asyncpg).
COMMIT_UPDATE: Final = """
WITH upd AS (
    UPDATE flows SET status = $4, current_step = $5, state_json = $6, wait_json = $7,
        cancel_requested_at = $8, revision = $9, updated_at = $10
    WHERE id = $1 AND revision = $2
      AND ($3::text IS NULL
           OR NOT EXISTS (SELECT 1 FROM processed_commands WHERE command_id = $3))
    RETURNING id
), claim AS (
    INSERT INTO processed_commands (command_id, flow_id, outcome, verb, request_digest)
    SELECT $3, upd.id, $11, $23::text, $24::text FROM upd WHERE $3::text IS NOT NULL
), ev AS (
    INSERT INTO flow_events (id, flow_id, revision, kind, payload, at)
    SELECT $12::uuid, $13::uuid, $14::bigint, $15::text, $16::jsonb, $17::timestamptz FROM upd
), ob AS (
    INSERT INTO outbox (topic, msg_id, command_id, body)
    SELECT $18::text, $19::text, $20::text, $21::json FROM upd WHERE $18::text IS NOT NULL
), wc AS (
    DELETE FROM wait_conditions WHERE flow_id = $1 AND $22::bool
        AND EXISTS (SELECT 1 FROM upd)
)
SELECT (SELECT count(*) FROM upd) AS written,
       (SELECT revision FROM flows WHERE id = $1) AS seen,
       ($3::text IS NOT NULL
        AND EXISTS (SELECT 1 FROM processed_commands WHERE command_id = $3)) AS duplicate"""
# COMMIT_UPDATE plus the step a mirrored flow's observation upserts (same rules: written
# only if the flow row was).
COMMIT_STEP: Final = COMMIT_UPDATE.replace(
    "\n), wc AS (",
    """
), st AS (
    INSERT INTO flow_steps (id, flow_id, run_id, task, status, child_session_key, result_json,
                            created_at, updated_at)
    SELECT $25, upd.id, $26, $27, $28, $29, $30, $31, $32 FROM upd
    ON CONFLICT (flow_id, run_id) DO UPDATE SET task = EXCLUDED.task,
        status = EXCLUDED.status, child_session_key = EXCLUDED.child_session_key,
        result_json = EXCLUDED.result_json, updated_at = EXCLUDED.updated_at
), wc AS (""",
    1,
)
COMMIT_INSERT: Final = """
WITH ins AS (
    INSERT INTO flows (id, controller_id, goal, owner_session_key, requester_origin,
                       sync_mode, status, current_step, state_json, wait_json,
                       cancel_requested_at, revision, created_at, updated_at)
    SELECT $1, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16
    WHERE $3::text IS NULL
       OR NOT EXISTS (SELECT 1 FROM processed_commands WHERE command_id = $3)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), claim AS (
    INSERT INTO processed_commands (command_id, flow_id, outcome, verb, request_digest)
    SELECT $3, ins.id, $2, $27::text, $28::text FROM ins WHERE $3::text IS NOT NULL
), ev AS (
    INSERT INTO flow_events (id, flow_id, revision, kind, payload, at)
    SELECT e.* FROM unnest($17::uuid[], $18::uuid[], $19::bigint[], $20::text[],
                           $21::jsonb[], $22::timestamptz[]) AS e, ins
), ob AS (
    INSERT INTO outbox (topic, msg_id, command_id, body)
    SELECT o.* FROM unnest($23::text[], $24::text[], $25::text[], $26::json[]) AS o, ins
)
SELECT (SELECT count(*) FROM ins) AS written,
       (SELECT revision FROM flows WHERE id = $1) AS seen,
       ($3::text IS NOT NULL
        AND EXISTS (SELECT 1 FROM processed_commands WHERE command_id = $3)) AS duplicate"""


def _swap(sql: str, *pairs: tuple[str, str]) -> str:
    """``sql`` with each ``old`` fragment (present exactly once) replaced by ``new``."""
    for old, new in pairs:
        assert sql.count(old) == 1, f"not once in the statement: {old!r}"
        sql = sql.replace(old, new)
    return sql


# COMMIT_INSERT for a create of one event (a managed flow; a mirrored one has two): the
# event and the message as scalars, as in COMMIT_UPDATE.
COMMIT_INSERT_ONE: Final = _swap(
    COMMIT_INSERT,
    (
        """SELECT e.* FROM unnest($17::uuid[], $18::uuid[], $19::bigint[], $20::text[],
                           $21::jsonb[], $22::timestamptz[]) AS e, ins""",
        "SELECT $17::uuid, $18::uuid, $19::bigint, $20::text, $21::jsonb, $22::timestamptz "
        "FROM ins",
    ),
    (
        "SELECT o.* FROM unnest($23::text[], $24::text[], $25::text[], $26::json[]) AS o, ins",
        "SELECT $23::text, $24::text, $25::text, $26::json FROM ins WHERE $23::text IS NOT NULL",
    ),
)
INSERT_EVENTS: Final = """
INSERT INTO flow_events (id, flow_id, revision, kind, payload, at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::jsonb[],
                     $6::timestamptz[])"""
UPSERT_STEP: Final = """
INSERT INTO flow_steps (id, flow_id, run_id, task, status, child_session_key, result_json,
                        created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (flow_id, run_id) DO UPDATE SET task = EXCLUDED.task, status = EXCLUDED.status,
    child_session_key = EXCLUDED.child_session_key, result_json = EXCLUDED.result_json,
    updated_at = EXCLUDED.updated_at"""
SELECT_STEP: Final = """
SELECT id, flow_id, run_id, task, status, child_session_key, result_json, created_at, updated_at
FROM flow_steps WHERE flow_id = $1 AND run_id = $2"""
SELECT_STEPS: Final = """
SELECT id, flow_id, run_id, task, status, child_session_key, result_json, created_at, updated_at
FROM flow_steps WHERE flow_id = $1 ORDER BY created_at, id"""
SELECT_EVENTS: Final = """
SELECT id, flow_id, revision, kind, payload, at FROM flow_events
WHERE flow_id = $1 AND revision > $2 ORDER BY revision LIMIT $3"""
# Keyset pagination in (created_at, id) order: $3/$4 are the cursor flow's created_at and id
# ('-infinity' and the nil uuid for a first page), so every page is one index range scan.
# The filter column leads the ORDER BY (a constant, so the order is the same): it makes the
# (filter, created_at, id) index the plan's natural order, where a custom plan for a frequent
# status would otherwise scan flows_created_idx and filter (bench/: p99 6.4 ms at 1M flows).
SELECT_CURSOR: Final = "SELECT created_at, id FROM flows WHERE id = $1"
LIST_BY_OWNER: Final = """
SELECT id, controller_id, goal, owner_session_key, requester_origin, sync_mode, status,
       current_step, state_json, wait_json, cancel_requested_at, revision, created_at, updated_at
FROM flows WHERE owner_session_key = $1 AND (created_at, id) > ($3, $4)
ORDER BY owner_session_key, created_at, id LIMIT $2"""
LIST_BY_STATUS: Final = """
SELECT id, controller_id, goal, owner_session_key, requester_origin, sync_mode, status,
       current_step, state_json, wait_json, cancel_requested_at, revision, created_at, updated_at
FROM flows WHERE status = $1 AND (created_at, id) > ($3, $4)
ORDER BY status, created_at, id LIMIT $2"""
LIST_BY_OWNER_STATUS: Final = """
SELECT id, controller_id, goal, owner_session_key, requester_origin, sync_mode, status,
       current_step, state_json, wait_json, cancel_requested_at, revision, created_at, updated_at
FROM flows WHERE owner_session_key = $1 AND status = $5 AND (created_at, id) > ($3, $4)
ORDER BY created_at, id LIMIT $2"""
LIST_ALL: Final = """
SELECT id, controller_id, goal, owner_session_key, requester_origin, sync_mode, status,
       current_step, state_json, wait_json, cancel_requested_at, revision, created_at, updated_at
FROM flows WHERE $1::text IS NULL AND (created_at, id) > ($3, $4)
ORDER BY created_at, id LIMIT $2"""
# -- idempotency and outbox -------------------------------------------------------------------
INSERT_PROCESSED: Final = """
INSERT INTO processed_commands (command_id, flow_id, outcome, verb, request_digest)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (command_id) DO NOTHING"""
SELECT_OUTCOME: Final = "SELECT outcome FROM processed_commands WHERE command_id = $1"
SELECT_PROCESSED: Final = """
SELECT outcome, verb, request_digest, flow_id, created_at FROM processed_commands
WHERE command_id = $1"""
INSERT_OUTBOX: Final = """
INSERT INTO outbox (topic, msg_id, command_id, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::json[])"""
# The relay, one statement per round: delete what the previous round published (JetStream
# acked it), read the next rows in order. It runs on a connection of its own that holds a
# session advisory lock (one drainer across all replicas, so per-flow order holds) and
# commits without waiting for the WAL flush (synchronous_commit off): should PostgreSQL
# crash and lose a delete, those rows come back, and the relay (taking the lock again) finds
# them stored in JetStream and deletes them unsent (daemon/relay.py). A publish that fails
# deletes nothing.
# Parked rows, and the rows of a flow with a parked row (the partial index, empty unless
# something is parked), are left out.
NEXT_OUTBOX: Final = """
WITH sent AS (DELETE FROM outbox WHERE id = ANY($1::bigint[]))
SELECT id, topic, msg_id, command_id, body FROM outbox o
WHERE id <> ALL($1::bigint[]) AND parked_at IS NULL
  AND NOT EXISTS (
      SELECT FROM outbox p
      WHERE p.parked_at IS NOT NULL
        AND lower(split_part(p.topic, '.', 2)) = lower(split_part(o.topic, '.', 2)))
ORDER BY id LIMIT $2"""
PARK: Final = """
UPDATE outbox SET parked_at = now(), parked_reason = r.reason
FROM unnest($1::bigint[], $2::text[]) AS r (id, reason) WHERE outbox.id = r.id"""
HOLDING: Final = "SELECT msg_id FROM outbox WHERE msg_id = ANY($1::text[])"
LIST_PARKED: Final = """
SELECT id, topic, msg_id, command_id, octet_length(body::text) AS size, parked_reason,
       parked_at, NULL::text AS body
FROM outbox WHERE parked_at IS NOT NULL ORDER BY id LIMIT $1"""
COUNT_PARKED: Final = "SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL"
PARKED_ROW: Final = """
SELECT id, topic, msg_id, command_id, octet_length(body::text) AS size, parked_reason,
       parked_at, body::text AS body
FROM outbox WHERE id = $1 AND parked_at IS NOT NULL"""
UNPARK: Final = """
UPDATE outbox SET parked_at = NULL, parked_reason = NULL WHERE id = $1 AND parked_at IS NOT NULL"""
REMOVE_PARKED: Final = "DELETE FROM outbox WHERE id = $1 AND parked_at IS NOT NULL"
DELETE_SENT: Final = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
TRY_DRAIN_LOCK: Final = "SELECT pg_try_advisory_lock($1)"
DRAIN_UNLOCK: Final = "SELECT pg_advisory_unlock($1)"
ASYNC_COMMIT: Final = "SET synchronous_commit = off"
COUNT_OUTBOX: Final = """
SELECT count(*) FROM outbox o
WHERE parked_at IS NULL
  AND NOT EXISTS (
      SELECT FROM outbox p
      WHERE p.parked_at IS NOT NULL
        AND lower(split_part(p.topic, '.', 2)) = lower(split_part(o.topic, '.', 2)))"""

# -- the wait engine --------------------------------------------------------------------------
DELETE_CONDITIONS: Final = "DELETE FROM wait_conditions WHERE flow_id = $1"
INSERT_CONDITIONS: Final = """
INSERT INTO wait_conditions (flow_id, kind, due_at, subject, correlation_id, name, on_timeout)
SELECT $1, * FROM unnest($2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                         $7::text[])"""
INSERT_SIGNAL: Final = """
INSERT INTO flow_signals (flow_id, name, payload, created_at) VALUES ($1, $2, $3, $4)"""
CONSUME_SIGNAL: Final = "UPDATE flow_signals SET consumed_at = $2 WHERE id = $1"
SELECT_SIGNALS: Final = """
SELECT id, flow_id, name, payload, created_at FROM flow_signals
WHERE flow_id = $1 AND consumed_at IS NULL ORDER BY id"""
# Due rows only (partial index on due_at); rows another engine holds are skipped, not waited
# for; a claim is a lease, so a crashed claimer's rows come back when it expires.
CLAIM_DUE: Final = """
WITH due AS (
    SELECT id FROM wait_conditions
    WHERE due_at <= $1 AND (claimed_until IS NULL OR claimed_until < $1)
    ORDER BY due_at LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE wait_conditions w SET claimed_until = $2
FROM due, flows f
WHERE w.id = due.id AND f.id = w.flow_id
RETURNING w.flow_id, f.revision, w.kind, w.due_at, w.subject, w.correlation_id, w.name,
          w.on_timeout"""
SELECT_WAITING_ON: Final = """
SELECT DISTINCT flow_id FROM wait_conditions WHERE subject = $1 AND correlation_id = $2"""
SELECT_WAIT_SUBJECTS: Final = """
SELECT DISTINCT subject FROM wait_conditions WHERE subject IS NOT NULL ORDER BY subject"""

# -- partition ownership (several replicas) -----------------------------------------------
# Session advisory locks on a dedicated connection: they vanish with the connection, so a
# dead replica's partitions are free again at once. (class, key) pairs keep them apart from
# the migration and outbox locks.
MEMBER_LOCK_CLASS: Final = 0x666C6F01
PARTITION_LOCK_CLASS: Final = 0x666C6F02
TRY_LOCK_PAIR: Final = "SELECT pg_try_advisory_lock($1::int, $2::int)"
UNLOCK_PAIR: Final = "SELECT pg_advisory_unlock($1::int, $2::int)"
JOIN_MEMBERS: Final = "SELECT pg_try_advisory_lock($1::int, pg_backend_pid())"
COUNT_MEMBERS: Final = """
SELECT count(DISTINCT pid) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::bigint::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""

PING: Final = "SELECT 1"
PRUNE: Final = """
DELETE FROM flows WHERE status IN ('cancelled', 'finished', 'failed') AND updated_at < $1"""


async def _init_connection(conn: _Conn) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=jsontext.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Pool release hook: flowd sets no session state and holds no session locks on pool
    connections (advisory locks here are transaction-scoped, the migration lock is released
    explicitly), so the default reset query is a round trip per release for nothing."""
    return None


# SQLSTATEs that say "not now" rather than "not this": whatever the message, the same
# statement can pass later (the connection is back, the database writable again, resources
# freed, the operator done), so the caller waits and retries (StoreUnavailable). By class:
# 08 connection exception, 28 invalid authorization, 3D invalid catalog (database gone or
# renamed), 53 insufficient resources (disk full, out of memory, too many connections),
# 57 operator intervention (admin shutdown, cannot connect now, query canceled), 58 system
# error (I/O error). By code: read-only transaction (a standby, or
# default_transaction_read_only), idle-in-transaction timeout, serialization failure,
# deadlock, statement completion unknown, lock not available, insufficient privilege (a
# revoked grant refuses every message alike).
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "28", "3D", "53", "57", "58"})
_UNAVAILABLE_CODES: Final = frozenset(
    {"25006", "25P03", "40001", "40P01", "40003", "55P03", "42501"}
)
# SQLSTATE classes that say "not this value": 22 data exception (untranslatable character,
# numeric value out of range, invalid text representation; asyncpg reports a parameter it
# cannot encode as 22000 too) and 54 program limit exceeded (a value too large to store).
# The input is refused (InvalidInput), never retried and never a crash.
_REFUSED_CLASSES: Final = frozenset({"22", "54"})


def classify(exc: BaseException) -> errors.FlowError | None:
    """The flowd error a driver failure stands for, or None for a bug (left to propagate)."""
    if isinstance(
        exc,
        asyncpg.InterfaceError
        # "cannot switch to state …; another operation is in progress": seen on a pooled
        # connection while PostgreSQL was terminating it (tests/faults, PostgreSQL restart)
        | asyncpg.InternalClientError
        | ConnectionError
        | OSError
        | TimeoutError,
    ):
        return errors.StoreUnavailable(f"database unavailable: {exc}")
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    state = str(getattr(exc, "sqlstate", "") or "")
    if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_CODES:
        return errors.StoreUnavailable(f"database unavailable ({state}): {exc}")
    if state[:2] in _REFUSED_CLASSES:
        # The condition's name, not the driver's text (which may quote the value).
        words = re.sub(r"(?<!^)(?=[A-Z])", " ", type(exc).__name__.removesuffix("Error"))
        condition = words.lower() if words != "Data" else "data exception"
        message = f"the database cannot store this input ({condition}, SQLSTATE {state})"
        return errors.InvalidInput(message, {"_": message})
    return None


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """Map driver failures to flowd errors (``classify``); anything else is a bug and
    propagates as it is."""
    try:
        yield
    except Exception as exc:
        translated = classify(exc)
        if translated is None:
            raise
        raise translated from exc


class PostgresFlowStore:
    """A FlowStore in PostgreSQL, through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool[Any], *, outbox: bool = False, dsn: str = "") -> None:
        self._pool = pool
        self._outbox = outbox
        self._drainer = _Drainer(dsn)
        self._updates = _GroupCommit(pool, COMMIT_UPDATE)  # see _GroupCommit
        self._inserts = _GroupCommit(pool, COMMIT_INSERT_ONE)
        self._inserts_many = _GroupCommit(pool, COMMIT_INSERT)  # a mirrored flow's two events
        self._steps = _GroupCommit(pool, COMMIT_STEP)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        run_migrations: bool = False,
        outbox: bool = False,
    ) -> PostgresFlowStore:
        """Open a pool on ``dsn``; with ``run_migrations`` apply pending migrations first.
        With ``outbox`` every change also queues its event messages (the daemon's mode)."""
        # Refused at the first connect: misconfigured, fail fast. (Refused later, e.g. while a
        # password is rotated, the same errors are StoreUnavailable: commands wait.)
        async with _translated():
            try:
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    init=_init_connection,
                    reset=_keep_session,
                )
            except (
                asyncpg.InvalidAuthorizationSpecificationError,  # no such role, wrong password
                asyncpg.InvalidCatalogNameError,  # no such database
            ) as exc:
                raise errors.Misconfigured(f"PostgreSQL refused flowd: {exc}") from exc
        store = cls(pool, outbox=outbox, dsn=dsn)
        if run_migrations:
            await store.migrate()
        return store

    # -- migrations ---------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock; returns the names applied.

        Safe to run concurrently and repeatedly: one runner at a time holds the lock, each
        file runs in its own transaction together with its record.
        """
        migrations = migrate.load()
        done: list[str] = []
        async with _translated(), self._pool.acquire() as conn:
            await _sole_deployment(conn)
            await conn.execute(LOCK_MIGRATIONS, MIGRATION_LOCK_KEY)
            try:
                if not await conn.fetchval(TABLE_EXISTS):  # (no write when there is one:
                    try:  # a read-only database starts)
                        await conn.execute(CREATE_MIGRATIONS_TABLE)
                    except asyncpg.InsufficientPrivilegeError as exc:
                        raise errors.Misconfigured(
                            f"cannot create flowd_migrations ({exc}): run `flowd migrate` "
                            "as the schema's owner"
                        ) from exc
                applied = {r["version"]: r["checksum"] for r in await conn.fetch(SELECT_MIGRATIONS)}
                for m in migrate.pending(migrations, applied):
                    try:
                        async with conn.transaction():
                            await conn.execute(m.sql)
                            await conn.execute(RECORD_MIGRATION, m.version, m.name, m.checksum)
                    except asyncpg.InsufficientPrivilegeError as exc:
                        raise errors.Misconfigured(
                            f"migration {m.version:04d}_{m.name} needs the schema owner's "
                            f"rights ({exc}): run `flowd migrate` as the owner"
                        ) from exc
                    except asyncpg.PostgresError as exc:
                        if isinstance(classify(exc), errors.StoreUnavailable):
                            raise  # not this migration's fault: _translated, wait and retry
                        raise migrate.MigrationError(
                            f"migration {m.version:04d}_{m.name} failed: {exc}"
                        ) from exc
                    done.append(f"{m.version:04d}_{m.name}")
            finally:
                await conn.execute(UNLOCK_MIGRATIONS, MIGRATION_LOCK_KEY)
        return done

    async def pending_migrations(self) -> list[str]:
        """Names of migrations not applied yet (raises MigrationError on a mismatch)."""
        async with _translated(), self._pool.acquire() as conn:
            applied: dict[int, str] = {}
            if await conn.fetchval(TABLE_EXISTS):
                applied = {r["version"]: r["checksum"] for r in await conn.fetch(SELECT_MIGRATIONS)}
        return [f"{m.version:04d}_{m.name}" for m in migrate.pending(migrate.load(), applied)]

    async def bind_prefix(self, prefix: str) -> str:
        """Bind the database to ``prefix`` if it is not bound yet (under the migration lock),
        and return it; errors.Misconfigured if it belongs to another prefix, or if another
        schema of the database holds a flowd deployment too (one deployment per database)."""
        async with _translated(), self._pool.acquire() as conn:
            await _sole_deployment(conn)
            bound = await conn.fetchval(BOUND_PREFIX)  # (the table: migration 0007)
            if bound is None:
                await conn.execute(LOCK_MIGRATIONS, MIGRATION_LOCK_KEY)
                try:
                    await conn.execute(BIND_PREFIX, prefix)
                    bound = await conn.fetchval(BOUND_PREFIX)
                except asyncpg.InsufficientPrivilegeError as exc:
                    raise errors.Misconfigured(
                        f"cannot bind this database to prefix {prefix!r} ({exc}): run "
                        "`flowd migrate` as the schema's owner, and grant this role INSERT "
                        "on flowd_deployment"
                    ) from exc
                finally:
                    await conn.execute(UNLOCK_MIGRATIONS, MIGRATION_LOCK_KEY)
        if bound != prefix:
            raise errors.Misconfigured(
                f"this database belongs to prefix {bound!r}, not to this daemon's {prefix!r}: "
                "give each deployment (prefix) its own database"
            )
        return prefix

    # -- the port -----------------------------------------------------------------------------

    async def get(self, flow_id: UUID) -> Flow | None:
        async with _translated():
            row = await self._pool.fetchrow(SELECT_FLOW, flow_id)
        return None if row is None else _flow(row)

    async def get_step(self, flow_id: UUID, run_id: str) -> FlowStep | None:
        async with _translated():
            row = await self._pool.fetchrow(SELECT_STEP, flow_id, run_id)
        return None if row is None else _step(row)

    async def commit(
        self, change: Change, *, command_id: str | None = None, request: Request | None = None
    ) -> None:
        if change.signal is None and change.consumed_signal is None:
            if change.expected_revision is None and change.step is None:
                await self._commit_insert(change, command_id, request)
                return
            if (
                change.expected_revision is not None
                and not change.conditions
                and len(change.events) == 1
            ):
                # conditions None (untouched) or () (cleared); maybe a step
                await self._commit_update(change, command_id, request)
                return
        await self._commit_tx(change, command_id, request)

    @asynccontextmanager
    async def _first_claim(
        self, command_id: str | None, request: Request | None
    ) -> AsyncIterator[None]:
        """Two statements claiming one command id at once: the loser's whole statement is
        rolled back by the unique violation; it is a reuse of the winner's id."""
        try:
            yield
        except asyncpg.UniqueViolationError as exc:
            if command_id is None or exc.constraint_name != "processed_commands_pkey":
                raise
            raise await self._reused(self._pool, command_id, request) from exc

    @staticmethod
    async def _reused(
        conn: _Conn | asyncpg.Pool[Any], command_id: str, request: Request | None
    ) -> errors.FlowError:
        """What a command whose id is recorded gets (``core.requests.reused``)."""
        row = await conn.fetchrow(SELECT_PROCESSED, command_id)
        if row is None:  # pruned meanwhile: nothing to compare with
            return errors.DuplicateCommand(command_id, None)
        first = FirstUse(row["verb"], row["request_digest"], row["flow_id"], row["created_at"])
        return reused(command_id, row["outcome"], first, request)

    def _event_and_outbox_args(
        self, change: Change, command_id: str | None
    ) -> tuple[bool, list[Any]]:
        """The events' and outbox messages' parameters, and whether they are scalars (one
        event: COMMIT_UPDATE, COMMIT_STEP, COMMIT_INSERT_ONE) or arrays (COMMIT_INSERT). One
        answer to both, so a statement and its parameters cannot disagree."""
        ev = change.events
        msgs = change_messages(change, command_id) if self._outbox else []
        if len(ev) == 1:
            e = ev[0]
            m = msgs[0] if msgs else None
            outbox = [None] * 4 if m is None else [m.topic, m.msg_id, m.command_id, m.text()]
            return True, [e.id, e.flow_id, e.revision, e.kind, e.payload, e.at, *outbox]
        return False, [
            [e.id for e in ev],
            [e.flow_id for e in ev],
            [e.revision for e in ev],
            [e.kind for e in ev],
            [e.payload for e in ev],
            [e.at for e in ev],
            [m.topic for m in msgs],
            [m.msg_id for m in msgs],
            [m.command_id for m in msgs],
            [m.text() for m in msgs],
        ]

    async def _commit_update(
        self, change: Change, command_id: str | None, request: Request | None
    ) -> None:
        f, expected = change.flow, change.expected_revision
        assert expected is not None
        step: list[Any] = []
        if (st := change.step) is not None:
            step = [
                st.id,
                st.run_id,
                st.task,
                st.status.value,
                st.child_session_key,
                st.result_json,
                st.created_at,
                st.updated_at,
            ]
        statement = self._steps if step else self._updates
        scalar, event_args = self._event_and_outbox_args(change, command_id)
        assert scalar, "commit() routes changes of several events to _commit_tx"
        async with _translated(), self._first_claim(command_id, request):
            row = await statement.fetchrow(
                f.id,
                expected,
                command_id,
                f.status.value,
                f.current_step,
                f.state_json,
                f.wait_json,
                f.cancel_requested_at,
                f.revision,
                f.updated_at,
                applied_outcome(change),
                *event_args,
                change.conditions == (),
                *_request_args(request),
                *step,
            )
        if await self._written(row, command_id, request):
            return
        assert row is not None
        if row["seen"] is None:
            raise errors.FlowNotFound(f.id)
        raise errors.RevisionMismatch(f.id, expected, row["seen"])

    async def _commit_insert(
        self, change: Change, command_id: str | None, request: Request | None
    ) -> None:
        f = change.flow
        scalar, event_args = self._event_and_outbox_args(change, command_id)
        inserts = self._inserts if scalar else self._inserts_many
        async with _translated(), self._first_claim(command_id, request):
            row = await inserts.fetchrow(
                f.id,
                applied_outcome(change),
                command_id,
                f.controller_id,
                f.goal,
                f.owner_session_key,
                f.requester_origin,
                f.sync_mode.value,
                f.status.value,
                f.current_step,
                f.state_json,
                f.wait_json,
                f.cancel_requested_at,
                f.revision,
                f.created_at,
                f.updated_at,
                *event_args,
                *_request_args(request),
            )
        if not await self._written(row, command_id, request):
            raise errors.FlowExists(f.id)

    async def _written(
        self, row: Mapping[str, Any] | None, command_id: str | None, request: Request | None
    ) -> bool:
        """Whether a one-statement commit wrote; raises DuplicateCommand (or
        IdempotencyConflict) for a known id."""
        assert row is not None
        if row["written"]:
            return True
        if row["duplicate"]:
            assert command_id is not None
            async with _translated():
                raise await self._reused(self._pool, command_id, request)
        return False

    async def _commit_tx(
        self, change: Change, command_id: str | None, request: Request | None
    ) -> None:
        """The general path: several statements in one explicit transaction."""
        f = change.flow
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            if command_id is not None:
                await self._claim(conn, command_id, f.id, applied_outcome(change), request)
            assert change.expected_revision is not None  # creates take _commit_insert
            status = await conn.execute(
                UPDATE_FLOW,
                f.id,
                change.expected_revision,
                f.status.value,
                f.current_step,
                f.state_json,
                f.wait_json,
                f.cancel_requested_at,
                f.revision,
                f.updated_at,
            )
            if status == "UPDATE 0":
                actual = await conn.fetchval(SELECT_REVISION, f.id)
                if actual is None:
                    raise errors.FlowNotFound(f.id)
                raise errors.RevisionMismatch(f.id, change.expected_revision, actual)
            ev = change.events
            await conn.execute(
                INSERT_EVENTS,
                [e.id for e in ev],
                [e.flow_id for e in ev],
                [e.revision for e in ev],
                [e.kind for e in ev],
                [e.payload for e in ev],
                [e.at for e in ev],
            )
            if (s := change.step) is not None:
                await conn.execute(
                    UPSERT_STEP,
                    s.id,
                    s.flow_id,
                    s.run_id,
                    s.task,
                    s.status.value,
                    s.child_session_key,
                    s.result_json,
                    s.created_at,
                    s.updated_at,
                )
            await self._index_waits(conn, change)
            if self._outbox:
                await self._queue(conn, change_messages(change, command_id))

    @staticmethod
    async def _index_waits(conn: _Conn, change: Change) -> None:
        f = change.flow
        if (conds := change.conditions) is not None:
            await conn.execute(DELETE_CONDITIONS, f.id)
            if conds:
                await conn.execute(
                    INSERT_CONDITIONS,
                    f.id,
                    [c.kind for c in conds],
                    [c.due_at for c in conds],
                    [c.subject for c in conds],
                    [c.correlation_id for c in conds],
                    [c.name for c in conds],
                    [c.on_timeout for c in conds],
                )
        if (sig := change.signal) is not None:
            await conn.execute(INSERT_SIGNAL, f.id, sig.name, sig.payload, sig.created_at)
        if change.consumed_signal is not None:
            await conn.execute(CONSUME_SIGNAL, change.consumed_signal, f.updated_at)

    async def _claim(
        self,
        conn: _Conn,
        command_id: str,
        flow_id: UUID | None,
        outcome: Any,
        request: Request | None,
    ) -> None:
        # A concurrent holder of the same id blocks this insert until it commits or rolls
        # back, so exactly one transaction records (and applies) a command.
        args = (command_id, flow_id, outcome, *_request_args(request))
        if await conn.execute(INSERT_PROCESSED, *args) == "INSERT 0 0":
            raise await self._reused(conn, command_id, request)

    @staticmethod
    async def _queue(conn: _Conn, messages: list[OutboxMessage]) -> None:
        await conn.execute(
            INSERT_OUTBOX,
            [m.topic for m in messages],
            [m.msg_id for m in messages],
            [m.command_id for m in messages],
            [m.text() for m in messages],
        )

    async def record_outcome(
        self,
        command_id: str,
        flow_id: UUID | None,
        token: str,
        outcome: JsonObject,
        *,
        request: Request | None = None,
    ) -> None:
        async with _translated(), self._pool.acquire() as conn, conn.transaction():
            await self._claim(conn, command_id, flow_id, outcome, request)
            if self._outbox:
                await self._queue(conn, [outcome_message(command_id, token, outcome)])

    async def get_outcome(self, command_id: str) -> JsonObject | None:
        async with _translated():
            outcome: JsonObject | None = await self._pool.fetchval(SELECT_OUTCOME, command_id)
        return outcome

    async def get_first_use(self, command_id: str) -> FirstUse | None:
        async with _translated():
            row = await self._pool.fetchrow(SELECT_PROCESSED, command_id)
        if row is None:
            return None
        return FirstUse(row["verb"], row["request_digest"], row["flow_id"], row["created_at"])

    async def drain_outbox(self, publish: Publish, *, limit: int = 256) -> int:
        """Publish the next rows (deleting those the last call published); 0 when there
        are none, or another relay (this process's or another's) is draining."""
        return await self._drainer.drain(publish, limit)

    def outbox_drained_elsewhere(self) -> bool:
        return self._drainer.elsewhere

    def outbox_turns(self) -> int:
        return self._drainer.turns

    async def outbox_holding(self, msg_ids: list[str]) -> set[str]:
        async with _translated():
            rows = await self._pool.fetch(HOLDING, msg_ids)
        return {r["msg_id"] for r in rows}

    async def outbox_parked(self, *, limit: int = MAX_PAGE) -> list[ParkedRow]:
        async with _translated():
            rows = await self._pool.fetch(LIST_PARKED, min(limit, MAX_PAGE))
        return [_parked(r) for r in rows]

    async def outbox_parked_count(self) -> int:
        async with _translated():
            count: int = await self._pool.fetchval(COUNT_PARKED)
        return count

    async def outbox_parked_row(self, row_id: int) -> ParkedRow | None:
        async with _translated():
            row = await self._pool.fetchrow(PARKED_ROW, row_id)
        return None if row is None else _parked(row)

    async def outbox_unpark(self, row_id: int) -> bool:
        async with _translated():
            status = await self._pool.execute(UNPARK, row_id)
        return bool(status == "UPDATE 1")

    async def outbox_remove_parked(self, row_id: int) -> bool:
        async with _translated():
            status = await self._pool.execute(REMOVE_PARKED, row_id)
        return bool(status == "DELETE 1")

    async def outbox_backlog(self) -> int:
        async with _translated():
            count: int = await self._pool.fetchval(COUNT_OUTBOX)
        return count

    async def list_flows(
        self,
        *,
        owner: str | None = None,
        status: FlowStatus | None = None,
        limit: int = 100,
        after: UUID | None = None,
    ) -> list[Flow]:
        limit = min(limit, MAX_PAGE)
        async with _translated():
            cursor: tuple[Any, ...] = (_NEG_INFINITY, _NIL)
            if after is not None:
                row = await self._pool.fetchrow(SELECT_CURSOR, after)
                if row is None:
                    return []
                cursor = (row["created_at"], row["id"])
            if owner is not None and status is not None:
                rows = await self._pool.fetch(
                    LIST_BY_OWNER_STATUS, owner, limit, *cursor, status.value
                )
            elif owner is not None:
                rows = await self._pool.fetch(LIST_BY_OWNER, owner, limit, *cursor)
            elif status is not None:
                rows = await self._pool.fetch(LIST_BY_STATUS, status.value, limit, *cursor)
            else:
                rows = await self._pool.fetch(LIST_ALL, None, limit, *cursor)
        return [_flow(r) for r in rows]

    async def list_steps(self, flow_id: UUID) -> list[FlowStep]:
        async with _translated():
            rows = await self._pool.fetch(SELECT_STEPS, flow_id)
        return [_step(r) for r in rows]

    async def list_events(
        self, flow_id: UUID, *, after_revision: int = -1, limit: int = MAX_PAGE
    ) -> list[FlowEvent]:
        async with _translated():
            rows = await self._pool.fetch(
                SELECT_EVENTS, flow_id, after_revision, min(limit, MAX_PAGE)
            )
        return [FlowEvent.model_validate(dict(r)) for r in rows]

    async def prune(self, older_than: datetime) -> int:
        async with _translated():
            status = await self._pool.execute(PRUNE, older_than)
        return int(status.split()[-1])

    async def pending_signals(self, flow_id: UUID) -> list[Signal]:
        async with _translated():
            rows = await self._pool.fetch(SELECT_SIGNALS, flow_id)
        return [
            Signal(r["id"], r["flow_id"], r["name"], r["payload"], r["created_at"]) for r in rows
        ]

    async def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[Due]:
        async with _translated():
            rows = await self._pool.fetch(CLAIM_DUE, now, lease_until, limit)
        due = [
            Due(
                r["flow_id"],
                r["revision"],
                Condition(
                    r["kind"],
                    due_at=_aware(r["due_at"]),
                    subject=r["subject"],
                    correlation_id=r["correlation_id"],
                    name=r["name"],
                    on_timeout=r["on_timeout"],
                ),
            )
            for r in rows
        ]
        return sorted(due, key=lambda d: d.condition.due_at or now)

    async def flows_waiting_on(self, subject: str, correlation_id: str) -> list[UUID]:
        async with _translated():
            rows = await self._pool.fetch(SELECT_WAITING_ON, subject, correlation_id)
        return [r["flow_id"] for r in rows]

    async def wait_subjects(self) -> list[str]:
        async with _translated():
            rows = await self._pool.fetch(SELECT_WAIT_SUBJECTS)
        return [r["subject"] for r in rows]

    async def ping(self) -> None:
        async with _translated():
            await self._pool.fetchval(PING)

    async def close(self) -> None:
        await self._drainer.close()
        await self._pool.close()


def _aware(at: datetime | None) -> datetime | None:
    """asyncpg reads -infinity and infinity as naive datetime.min / datetime.max (a due time
    year 1 became -infinity before waits refused it): as UTC, they compare with the rest."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def _request_args(request: Request | None) -> tuple[str | None, str | None]:
    """The verb and digest columns of a processed-command record."""
    return (None, None) if request is None else (request.verb, request.digest)


def _parked(row: Mapping[str, Any]) -> ParkedRow:
    return ParkedRow(
        row["id"],
        row["topic"],
        row["msg_id"],
        row["command_id"],
        row["size"],
        row["parked_reason"],
        row["parked_at"],
        row["body"],
    )


async def _sole_deployment(conn: _Conn) -> None:
    """errors.Misconfigured if another schema of this database holds flowd's tables: two
    deployments in one database would take each other's advisory locks (migrations, the
    outbox relay, partition leases), which are database-wide."""
    others = [r["nspname"] for r in await conn.fetch(OTHER_FLOWD_SCHEMAS)]
    if others:
        schema = await conn.fetchval(CURRENT_SCHEMA)
        raise errors.Misconfigured(
            f"this database holds flowd tables in schema(s) {', '.join(others)}, and this "
            f"daemon uses schema {schema!r}: run one deployment per database (advisory locks "
            "are database-wide)"
        )


def _flow(row: Mapping[str, Any]) -> Flow:
    return Flow.model_construct(
        id=row["id"],
        controller_id=row["controller_id"],
        goal=row["goal"],
        owner_session_key=row["owner_session_key"],
        requester_origin=row["requester_origin"],
        sync_mode=SyncMode(row["sync_mode"]),
        status=FlowStatus(row["status"]),
        current_step=row["current_step"],
        state_json=row["state_json"],
        wait_json=row["wait_json"],
        cancel_requested_at=row["cancel_requested_at"],
        revision=row["revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _step(row: Mapping[str, Any]) -> FlowStep:
    return FlowStep.model_construct(
        id=row["id"],
        flow_id=row["flow_id"],
        run_id=row["run_id"],
        task=row["task"],
        status=FlowStepStatus(row["status"]),
        child_session_key=row["child_session_key"],
        result_json=row["result_json"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class _GroupCommit:
    """Group commit for one of the one-statement changes (COMMIT_UPDATE, COMMIT_INSERT,
    COMMIT_STEP).

    One transaction of the kind is in flight at a time. A change that finds none goes out at
    once, alone: no added latency when idle. Changes arriving meanwhile wait, then go out
    together: one pipelined round trip and one implicit transaction (asyncpg ``fetchmany``:
    a Bind/Execute per change, one Sync), so one commit and one WAL flush for up to
    ``max_batch`` changes. Each statement still decides for itself, as it does alone: a lost
    compare-and-set or a known command id writes nothing of *that* change and is reported to
    *its* caller. A batch is ordered by flow id, so two batches lock rows in one order.

    A statement that raises aborts its whole transaction; then each change of it is sent
    again alone, so one change's error is never another's. A transaction that has been in
    flight for ``stall`` seconds (say, waiting on a row lock someone else holds) stops
    counting: the next one may start beside it, up to ``max_open`` at once. The other
    changes of a stalled batch wait with it, though: a long lock on one flow's row (a big
    prune, a manual ``SELECT … FOR UPDATE``) delays the changes that shared its batch.
    A caller cancelled before its batch was sent is dropped from it.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        sql: str,
        *,
        max_batch: int = 64,
        stall: float = 0.05,
        max_open: int = 4,
    ) -> None:
        self._pool = pool
        self._sql = sql
        self._max_batch = max_batch
        self._stall = stall
        self._max_open = max_open
        self._started: list[float] = []  # start times of the transactions in flight
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        # The pool's loop, looked up once: on Python 3.11 every get_running_loop() is a
        # getpid() system call, and this runs once or twice per change.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # transactions of more than one change (tests, metrics)

    async def fetchrow(self, *args: Any) -> Any:
        """The statement's row for ``args``, committed; or its error."""
        loop = self._loop or self._bind_loop()
        if not self._waiting and self._free(loop.time()):
            started = self._begin(loop.time())
            try:
                return await self._on_connection(_fetchrow, args)
            finally:
                self._end(started)
        done: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, done))
        self._next()
        return await done

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _free(self, now: float) -> bool:
        """Whether another transaction may start: none in flight that is not stalled."""
        if len(self._started) >= self._max_open:
            return False
        return all(now - t >= self._stall for t in self._started)

    def _begin(self, now: float) -> float:
        self._started.append(now)
        return now

    def _end(self, started: float) -> None:
        self._started.remove(started)
        self._next()

    def _next(self) -> None:
        """Send what waits if a transaction may start, else make sure we look again."""
        if not self._waiting:
            return
        loop = self._loop or self._bind_loop()
        now = loop.time()
        if self._free(now):
            batch = [item for item in self._waiting[: self._max_batch] if not item[1].done()]
            del self._waiting[: self._max_batch]  # a done future here: its caller was cancelled
            if not batch:
                self._next()
                return
            task = loop.create_task(self._run(batch, self._begin(now)))
            _background.add(task)
            task.add_done_callback(_background.discard)
        elif self._timer is None and len(self._started) < self._max_open:
            youngest = max(self._started)
            self._timer = loop.call_at(youngest + self._stall, self._look_again)

    def _look_again(self) -> None:
        self._timer = None
        self._next()

    async def _run(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], started: float
    ) -> None:
        try:
            outcomes = await self._send(batch)
        finally:
            # Ended before its callers hear of it: the next batch's task is then scheduled
            # ahead of their resumption and goes out first, not after each of them ran on.
            self._end(started)
        for done, outcome in outcomes:
            _resolve(done, outcome)

    async def _send(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any]]:
        """Each caller's row or error, the batch sent as one transaction."""
        if len(batch) == 1:
            args, done = batch[0]
            return [(done, await self._outcome(args))]
        batch.sort(key=lambda item: item[0][0])  # $1 is the flow id in both statements
        try:
            rows = await self._on_connection(_fetchmany, [args for args, _ in batch])
        except asyncpg.PostgresError:
            # One statement failed, or one change's values could not be encoded (asyncpg
            # raises DataError, a PostgresError, for that too): nothing of the batch
            # landed; each change goes alone, so each gets only its own error.
            alone = await asyncio.gather(*(self._outcome(args) for args, _ in batch))
            return [(done, outcome) for (_, done), outcome in zip(batch, alone, strict=True)]
        except Exception as exc:  # the connection, not a statement: everyone's error
            return [(done, exc) for _, done in batch]
        self.batches += 1
        return [(done, row) for (_, done), row in zip(batch, rows, strict=True)]

    async def _outcome(self, args: tuple[Any, ...]) -> Any:
        """The statement's row for ``args`` sent alone, or its error."""
        try:
            return await self._on_connection(_fetchrow, args)
        except Exception as exc:
            return exc

    async def _on_connection(
        self,
        call: Callable[[_Conn, str, Any], Awaitable[Any]],
        args: Any,
    ) -> Any:
        """``call`` (the statement, ``args``) on a pool connection, given back after the
        caller has its answer.

        asyncpg's release runs under asyncio.shield, a task: awaited, it holds the answer
        back for two more turns of the event loop, and under load each turn is long. Released
        in the background instead (with the early end in ``_run``: commits at 3,100
        commands/s in bench/ 4.1 -> 3.0 ms median); after an error it is awaited, as the
        pool may have to replace the connection."""
        pool = self._pool
        con = await pool.acquire()
        try:
            result = await call(con, self._sql, args)
        except BaseException:
            await pool.release(con)
            raise
        loop = self._loop or self._bind_loop()
        task = loop.create_task(_give_back(pool, con))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return result


async def _give_back(pool: asyncpg.Pool[Any], con: asyncpg.pool.PoolConnectionProxy[Any]) -> None:
    """Release ``con`` in the background. A failure here means asyncpg has terminated the
    connection already and the pool opens a new one when needed: nobody to tell."""
    with contextlib.suppress(Exception):
        await pool.release(con)


async def _fetchrow(con: _Conn, sql: str, args: Any) -> Any:
    return await con.fetchrow(sql, *args)


async def _fetchmany(con: _Conn, sql: str, args: Any) -> Any:
    return await con.fetchmany(sql, args)


def _resolve(done: asyncio.Future[Any], outcome: Any) -> None:
    """Hand a waiting caller its row, or its error (unless it stopped waiting)."""
    if done.done():
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


_background: set[asyncio.Task[None]] = set()


class _Drainer:
    """The outbox relay's side of the store: its own connection, the drain lock, and the ids
    published but not yet deleted (the next round deletes them)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection[Any] | None = None
        self._locked = False
        self._sent: list[int] = []
        self._busy = asyncio.Lock()
        self.elsewhere = False  # the last try found the drain lock held by another session
        self.turns = 0  # times the drain lock was taken

    async def drain(self, publish: Publish, limit: int) -> int:
        if self._busy.locked():
            return 0
        async with self._busy:
            conn = await self._connection()
            if conn is None:
                return 0
            async with _translated():
                try:
                    rows = await conn.fetch(NEXT_OUTBOX, self._sent, limit)
                except BaseException:
                    await self._drop()
                    raise
            self._sent = []
            if not rows:
                return 0
            batch = [
                OutboxMessage(r["topic"], r["msg_id"], r["command_id"], r["body"], r["id"])
                for r in rows
            ]
            try:
                drained = await publish(batch)
            except BaseException:
                await self._let_go()  # another replica may publish them meanwhile
                raise
            if drained is None:
                self._sent = [r["id"] for r in rows]
                return len(rows)
            if drained.parked:
                parked = sorted(drained.parked.items())
                async with _translated():
                    try:
                        await conn.execute(
                            PARK, [rows[i]["id"] for i, _ in parked], [why for _, why in parked]
                        )
                    except BaseException:
                        await self._drop()  # the rest is re-read (and re-parked) next turn
                        raise
            settled = drained.parked.keys() | drained.kept
            self._sent = [r["id"] for i, r in enumerate(rows) if i not in settled]
            return len(rows)

    async def _connection(self) -> asyncpg.Connection[Any] | None:
        """The drain connection if it holds the drain lock (taking it if free), else None."""
        async with _translated():
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn, self._locked = await asyncpg.connect(self._dsn), False
                    await self._conn.execute(ASYNC_COMMIT)
                if not self._locked:
                    self._locked = await self._conn.fetchval(TRY_DRAIN_LOCK, OUTBOX_LOCK_KEY)
                    self.elsewhere = not self._locked
                    self.turns += self._locked
            except BaseException:
                await self._drop()
                raise
        return self._conn if self._locked else None

    async def _let_go(self) -> None:
        if self._conn is not None and self._locked:
            try:
                await self._conn.fetchval(DRAIN_UNLOCK, OUTBOX_LOCK_KEY)
                self._locked = False
            except Exception:
                await self._drop()

    async def _drop(self) -> None:
        conn, self._conn, self._locked, self.elsewhere = self._conn, None, False, False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def close(self) -> None:
        """Delete what the last round published (else it would be sent again), disconnect."""
        conn, locked, self._conn, self._locked = self._conn, self._locked, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                if locked and self._sent:
                    await asyncio.wait_for(conn.execute(DELETE_SENT, self._sent), 5)
                    self._sent = []
                await asyncio.wait_for(conn.close(), 5)


class PartitionLeases:
    """Which partitions this process owns, as PostgreSQL session advisory locks held on one
    dedicated connection. ``lost`` is set when that connection dies: every lease is then
    gone and the owner must stop applying its partitions' messages."""

    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self._conn = conn
        self.lost = asyncio.Event()
        conn.add_termination_listener(lambda _: self.lost.set())

    @classmethod
    async def open(cls, dsn: str) -> PartitionLeases:
        """Connect and join the members (counted by ``members``)."""
        async with _translated():
            conn = await asyncpg.connect(dsn)
            leases = cls(conn)
            await conn.fetchval(JOIN_MEMBERS, MEMBER_LOCK_CLASS)
        return leases

    async def members(self) -> int:
        """How many processes hold leases on this database now (this one included)."""
        async with _translated():
            count: int = await self._conn.fetchval(COUNT_MEMBERS, MEMBER_LOCK_CLASS)
        return max(count, 1)

    async def try_acquire(self, partition: int) -> bool:
        async with _translated():
            got: bool = await self._conn.fetchval(TRY_LOCK_PAIR, PARTITION_LOCK_CLASS, partition)
        return got

    async def release(self, partition: int) -> None:
        async with _translated():
            await self._conn.fetchval(UNLOCK_PAIR, PARTITION_LOCK_CLASS, partition)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()
