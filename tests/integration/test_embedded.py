"""The embedded PostgreSQL / NATS servers start, serve, restart with their data, and stop."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import nats
import pytest

from flowd.embedded import EmbeddedNats, EmbeddedPostgres


@pytest.mark.postgres
async def test_embedded_postgres_restart_keeps_data(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg", fast=True) as pg:
        assert pg.dsn.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')")
        finally:
            await conn.close()
        port = pg.port
        pg.stop()
        pg.stop()  # idempotent
        assert pg.start() == pg.dsn
        assert pg.port == port
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT v FROM kept") == "x"
        finally:
            await conn.close()


@pytest.mark.nats
async def test_embedded_nats_jetstream(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "nats") as srv:
        nc = await nats.connect(srv.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"])
            ack = await js.publish("t.x", b"hello")
            assert (await js.get_msg("T", ack.seq)).data == b"hello"
        finally:
            await nc.close()
        srv.stop()
        srv.start()  # same port, JetStream state kept on disk
        nc = await nats.connect(srv.url)
        try:
            assert (await nc.jetstream().get_msg("T", ack.seq)).data == b"hello"
        finally:
            await nc.close()
    assert (tmp_path / "nats" / "jetstream").is_dir()


@pytest.mark.nats
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("2", "2")])
def test_embedded_nats_runs_one_go_scheduler_thread_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    if given is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", given)
    with EmbeddedNats(tmp_path / "nats") as srv:
        assert srv._proc is not None
        environ = Path(f"/proc/{srv._proc.pid}/environ").read_bytes().split(b"\0")
    assert f"GOMAXPROCS={expected}".encode() in environ
