"""FlowClient and flowctl against the real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest

from flowd.client import FlowClient, FlowdError, Outcome
from tests.support.daemon import DaemonProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]


async def test_client_drives_a_flow_and_tails_it(daemon: DaemonProcess) -> None:
    async with await FlowClient.connect(daemon.nats_url, prefix=daemon.prefix) as fc:
        created = await fc.create("ci", "ship", "alice", state_json={"n": 0}, wait=True)
        assert isinstance(created, Outcome)
        assert (created.status, created.flow["status"]) == ("applied", "created")  # type: ignore[index]
        fid = str(created.flow_id)
        started = await fc.start(fid, wait=True)
        assert isinstance(started, Outcome)
        assert started.revision == 1
        refused = await fc.finish(fid, expected_revision=0, wait=True)
        assert isinstance(refused, Outcome)
        assert (refused.status, refused.code) == ("rejected", "revision_mismatch")
        cid = await fc.update(fid, {"n": 1})
        assert isinstance(cid, str)  # without wait: the command id
        await fc.finish(fid, {"done": True}, wait=True)
        assert (await fc.get(fid))["state_json"] == {"n": 1, "done": True}
        flows, nxt = await fc.list(owner="alice")
        assert ([f["id"] for f in flows], nxt) == ([fid], None)
        assert (await fc.outcome(cid))["status"] == "applied"  # type: ignore[index]
        with pytest.raises(FlowdError) as info:
            await fc.get(str(uuid.uuid4()))
        assert info.value.code == "not_found"

        seen: list[str] = []

        async def follow() -> None:
            async for event in fc.tail(fid, replay=True):
                seen.append(event["kind"])
                if event["kind"] == "finished":
                    return

        await asyncio.wait_for(follow(), timeout=10)
        assert seen == ["created", "started", "state_updated", "finished"]


def flowctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": daemon.nats_url, "FLOWD_PREFIX": daemon.prefix}
    return subprocess.run(
        [sys.executable, "-m", "flowd.cli.flowctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_flowctl_exit_codes_and_json(daemon: DaemonProcess) -> None:
    fid = str(uuid.uuid4())
    made = flowctl(
        daemon, "--json", "create", "--id", fid, "--controller", "c", "--goal", "g", "--owner", "o"
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["flow"]["id"] == fid
    assert flowctl(daemon, "start", fid).returncode == 0
    again = flowctl(daemon, "start", fid)
    assert again.returncode == 1
    assert again.stderr.startswith("invalid_transition:")
    got = flowctl(daemon, "--json", "get", fid)
    assert json.loads(got.stdout)["status"] == "running"
    tail = flowctl(daemon, "tail", fid, "--replay", "--count", "2", "--json")
    assert [json.loads(line)["kind"] for line in tail.stdout.splitlines()] == ["created", "started"]
    assert flowctl(daemon, "update", fid, "--patch", "[1]").returncode == 2


async def test_client_refuses_numbers_json_cannot_spell(daemon: DaemonProcess) -> None:
    """float("inf") was sent as Infinity: a dead letter, and a wait=True caller got no outcome."""
    async with await FlowClient.connect(daemon.nats_url, prefix=daemon.prefix) as fc:
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValueError, match="Out of range float"):
                await fc.update(str(uuid.uuid4()), {"x": bad}, wait=True)
            with pytest.raises(ValueError, match="Out of range float"):
                await fc.list(owner={"x": bad})  # type: ignore[arg-type]
