"""The shipped nats-server configuration (deploy/nats/accounts.conf) on a real nats-server:
clients can do their job, cannot forge events, and tenants cannot see each other (except
what one account exports and another imports)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from flowd.client import FlowClient
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]

CONFIG = Path(__file__).parents[2] / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {
    "ACME_FLOWD_PASSWORD": "acme-flowd-pw",
    "ACME_CLIENT_PASSWORD": "acme-client-pw",
    "GLOBEX_FLOWD_PASSWORD": "globex-flowd-pw",
    "GLOBEX_CLIENT_PASSWORD": "globex-client-pw",
}


@pytest.fixture
def accounts_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_with: Callable[[str], int]
) -> int:
    """A nats-server running the shipped configuration (its passwords and store from the
    environment, as the file says); its port."""
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLOWD_NATS_STORE_DIR", str(tmp_path / "js"))
    return nats_with(CONFIG.read_text())


def url(port: int, user: str) -> str:
    role, _, tenant = user.partition("-")
    password = PASSWORDS[f"{tenant.upper()}_{role.upper()}_PASSWORD"]
    return f"nats://{user}:{password}@127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def connection(port: int, user: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """A raw connection as ``user``; the list collects the server's async errors."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url(port, user), error_cb=on_error, max_reconnect_attempts=0)
    try:
        yield nc, errors
    finally:
        await nc.close()


@pytest.fixture
def acme_daemon(accounts_server: int, database_url: str, tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(url(accounts_server, "flowd-acme"), database_url, "acme", tmp_path)
    d.start()
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


async def test_a_client_does_its_job_and_cannot_forge_an_event(
    accounts_server: int, acme_daemon: DaemonProcess
) -> None:
    port = accounts_server
    async with await FlowClient.connect(url(port, "client-acme"), prefix="acme") as client:
        fid = str(uuid.uuid4())
        created = await client.create("ctl", "goal", "owner", flow_id=fid, wait=True)
        assert not isinstance(created, str)
        assert created.status == "applied"
        assert (await client.get(fid))["status"] == "created"
        replay = client.tail(fid, replay=True)
        try:
            first = await asyncio.wait_for(anext(replay), 10)
        finally:
            await replay.aclose()
        assert (first["kind"], first["command_id"]) == ("created", created.command_id)

    forged = {"event_id": str(uuid.uuid4()), "flow_id": fid, "kind": "finished", "revision": 1}
    async with connection(port, "client-acme") as (nc, errors):
        for subject in (f"acme.evt.{fid}.finished", f"acme.out.{fid}", "acme.dlq.cmd"):
            await nc.publish(subject, json.dumps(forged).encode())
        await nc.flush()
        await _until(lambda: len(errors) >= 3)
    assert all("permissions violation for publish" in e.lower() for e in errors), errors
    async with connection(port, "flowd-acme") as (nc, _):
        js = nc.jetstream()
        info = await js.stream_info("ACME_EVT")
        assert info.state.messages == 1  # only the real `created` event
        assert (await js.stream_info("ACME_DLQ")).state.messages == 0


async def test_a_client_cannot_take_commands_or_purge_streams(
    accounts_server: int, acme_daemon: DaemonProcess
) -> None:
    async with connection(accounts_server, "client-acme") as (nc, errors):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request("$JS.API.STREAM.PURGE.ACME_EVT", b"", timeout=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request("$JS.API.CONSUMER.MSG.NEXT.ACME_CMD.flowd-cmd", b"1", timeout=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request("$JS.API.STREAM.DELETE.ACME_CMD", b"", timeout=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request("acme.api.outbox.skip", b'{"id": 1, "reason": "x"}', timeout=1)
    assert len(errors) == 4
    assert all("permissions violation" in e.lower() for e in errors), errors


async def test_tenants_see_nothing_of_each_other_but_what_is_exported(
    accounts_server: int, acme_daemon: DaemonProcess
) -> None:
    port = accounts_server
    async with (
        connection(port, "flowd-globex") as (globex_flowd, _),
        connection(port, "client-globex") as (globex_client, _),
        connection(port, "client-acme") as (acme_client, acme_errors),
    ):
        seen_by_globex: list[str] = []
        imported: list[str] = []

        async def collect(msg: Any) -> None:
            seen_by_globex.append(msg.subject)

        async def collect_import(msg: Any) -> None:
            imported.append(msg.subject)

        # GLOBEX's trusted user listens to everything of its account
        await globex_flowd.subscribe(">", cb=collect)
        await globex_client.subscribe("partner.acme.evt.>", cb=collect_import)
        await globex_flowd.flush()
        await globex_client.flush()
        # ACME's client cannot reach GLOBEX's subjects, nor listen outside its own
        await acme_client.publish("globex.cmd.create", b"{}")
        await acme_client.subscribe("globex.evt.>")
        await acme_client.flush()
        await _until(lambda: len(acme_errors) >= 2)
        said = [e.lower() for e in acme_errors]
        assert any('publish to "globex.cmd.create"' in e for e in said), said
        assert any('subscription to "globex.evt.>"' in e for e in said), said

        async with await FlowClient.connect(url(port, "client-acme"), prefix="acme") as client:
            fid = str(uuid.uuid4())
            await client.create("ctl", "goal", "owner", flow_id=fid, wait=True)
        await _until(lambda: len(imported) >= 1)
        assert imported == [f"partner.acme.evt.{fid}.created"]
        # nothing of ACME's commands, events, outcomes or API reached GLOBEX's account
        assert [s for s in seen_by_globex if s.startswith("acme.")] == []


async def _until(predicate: Any, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")
