"""A deployment owns its names (issue 17, Seen 1 and 2): its streams and its database.

Two prefixes that map to one set of stream names (``x-t`` and ``x_t`` -> ``X_T_*``), or two
prefixes on one database, must not mix: the second daemon refuses to start with one line
naming both prefixes, and the first keeps working.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.support.daemon import DaemonProcess, Wire, wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

# How a stream names its owner (subjects.md): metadata and, for nats-server 2.9, description.
OWNER_KEY, OWNER_TAG = "flowd_prefix", "flowd prefix="
CREATE = {"controller_id": "ctl", "goal": "test", "owner_session_key": "owner"}


def refused(d: DaemonProcess) -> str:
    """The daemon exits 1 by itself, with one error line: its text."""
    assert d.proc is not None
    assert d.proc.wait(60) == 1, d.logs()
    errors = [e for e in d.log_events() if e.get("level") == "error"]
    assert len(errors) == 1, d.logs()
    assert "Traceback" not in d.logs()
    return str(errors[0]["error"])


@asynccontextmanager
async def second_refused(
    nats_url: str, tmp_path: Path, first: tuple[str, str], second: tuple[str, str]
) -> AsyncIterator[tuple[DaemonProcess, Wire, str]]:
    """A daemon of ``first`` (prefix, database URL) serving, then one of ``second`` refused:
    yields the first, a wire to it and the refusal (which names both prefixes)."""
    a = DaemonProcess(nats_url, first[1], first[0], tmp_path).start()
    b = DaemonProcess(nats_url, second[1], second[0], tmp_path)
    try:
        a.wait_ready()
        async with wire(nats_url, first[0]) as w, wire(nats_url, second[0]):
            b.start()
            message = refused(b)
            assert_names(message, repr(first[0]), repr(second[0]))
            yield a, w, message
    finally:
        a.kill()
        b.kill()


def assert_names(message: str, *names: str) -> None:
    for name in names:
        assert name in message, message


async def still_works(d: DaemonProcess, w: Wire) -> None:
    """A create published to ``d``'s prefix becomes ``d``'s event and flow."""
    fid = str(uuid.uuid4())
    await w.publish(w.s.create(), {**CREATE, "id": fid})

    async def created() -> bool:
        return any(e["flow_id"] == fid for e in await w.events())

    await w.wait_for(created)
    got = await w.request("get", {"flow_id": fid})
    assert got["ok"], got


async def test_prefixes_mapping_to_one_stream_name_are_refused(
    nats_url: str, database_url: str, empty_database_url: str, tmp_path: Path
) -> None:
    """Seen 1: ``x-t`` and ``x_t`` both map to streams ``X_T_*``; the second daemon used to
    rewrite the first's streams (A's publishes then got no stream; B's creates split)."""
    tag = uuid.uuid4().hex[:10]
    first, second = f"x-{tag}", f"x_{tag}"
    async with second_refused(
        nats_url, tmp_path, (first, database_url), (second, empty_database_url)
    ) as (a, w, message):
        assert f"X_{tag.upper()}_" in message
        info = await w.js.stream_info(w.s.cmd_stream)
        assert info.config.subjects == [f"{first}.cmd.>"]
        assert info.config.description == OWNER_TAG + first
        assert (info.config.metadata or {}).get(OWNER_KEY) == _metadata_kept(w.nc, first)
        await still_works(a, w)


async def test_untagged_stream_of_another_prefix_is_not_adopted(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    """A stream with flowd's name but another prefix's subjects and no tag (made by hand, or
    by a flowd from before tags) is left alone; one with this prefix's subjects is adopted
    and tagged (the upgrade path of an existing deployment)."""
    tag = uuid.uuid4().hex[:10]
    mine, theirs = f"y_{tag}", f"y-{tag}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"Y_{tag.upper()}_CMD"
    d = DaemonProcess(nats_url, database_url, mine, tmp_path)
    try:
        await js.add_stream(name=name, subjects=[f"{theirs}.cmd.>"])
        d.start()
        message = refused(d)
        assert_names(message, repr(mine), repr(theirs))
        assert (await js.stream_info(name)).config.subjects == [f"{theirs}.cmd.>"]
        # the same stream with this prefix's own subjects: adopted, and tagged
        await js.delete_stream(name)
        await js.add_stream(name=name, subjects=[f"{mine}.cmd.>"])
        d.start()
        d.wait_ready()
        config = (await js.stream_info(name)).config
        assert config.description == OWNER_TAG + mine
        assert (config.metadata or {}).get(OWNER_KEY) == _metadata_kept(nc, mine)
    finally:
        d.kill()
        async with wire(nats_url, mine):
            pass
        await nc.close()


async def test_a_database_belongs_to_one_prefix(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    """Seen 2: two prefixes on one DATABASE_URL used to mix (one's API read and cancelled the
    other's flows). The database is bound to the first prefix; the second refuses."""
    tag = uuid.uuid4().hex[:10]
    first, second = f"a{tag}", f"b{tag}"
    async with second_refused(
        nats_url, tmp_path, (first, database_url), (second, database_url)
    ) as (a, w, _):
        await still_works(a, w)
        # restarting the first is fine: the binding is its own
        assert a.stop() == 0
        a.start()
        a.wait_ready()
        await still_works(a, w)


async def test_one_deployment_per_database_not_per_schema(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    """A second deployment in another schema of the same database (search_path in the DSN)
    would share its advisory locks (the outbox relay's, the partitions'): refused before it
    writes anything, with the schemas named."""
    import asyncpg

    schema = f"tenant_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')  # a generated name, not input
        dsn = database_url + ("&" if "?" in database_url else "?") + f"search_path={schema}"
        d = DaemonProcess(nats_url, dsn, f"s{uuid.uuid4().hex[:10]}", tmp_path).start()
        try:
            message = refused(d)
        finally:
            d.kill()
        assert_names(message, "public", schema)
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema)
        assert tables == 0
    finally:
        await conn.close()


def _metadata_kept(nc: Any, prefix: str) -> str | None:
    """The owner tag in stream metadata: nats-server >= 2.10 keeps it, 2.9 drops it."""
    v = nc.connected_server_version
    return prefix if (v.major, v.minor) >= (2, 10) else None
