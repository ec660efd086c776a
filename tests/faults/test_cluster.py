"""A real cluster on this machine: three clustered nats-server processes with R3 streams,
one PostgreSQL, three partitioned flowd replicas. Under load one NATS node and one flowd
replica are killed with SIGKILL and restarted. At the end every command has exactly one
outcome, every flow's events are gapless by revision, and database and stream agree."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest

from flowd.embedded import nats_cluster
from tests.acceptance.test_daemon import CREATE, by_flow
from tests.support.daemon import DaemonProcess, Wire

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.nats]

MANAGED, MIRRORED = 1500, 500  # 2,000 flows
COMMANDS = MANAGED * 4 + MIRRORED * 3  # create/start/update/finish; create + 2 observations


async def publish(w: Wire, subject: str, body: dict[str, Any]) -> str:
    """JetStream publish that rides out a node loss: retried with the same id (deduped)."""
    cid = uuid.uuid4().hex
    data = json.dumps(body).encode()
    for _ in range(100):
        try:
            await w.js.publish(subject, data, headers={"Nats-Msg-Id": cid}, timeout=2)
            return cid
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"could not publish {subject}")


async def drive(w: Wire, managed: list[str], mirrored: list[str]) -> None:
    s = w.s
    for fid in managed:
        await publish(w, s.command(fid, "create"), CREATE)
    for fid in mirrored:
        await publish(w, s.command(fid, "create"), {**CREATE, "sync_mode": "mirrored"})
    for fid in managed:
        await publish(w, s.command(fid, "start"), {})
    for fid in managed:
        await publish(w, s.command(fid, "update"), {"patch": {"done": 1}})
    for fid in managed:
        await publish(w, s.command(fid, "finish"), {})
    # Observations travel in their own stream and may overtake a create that is still
    # waiting (e.g. for a killed replica's redeliveries); like a real client, wait until
    # the flows exist (subjects.md, "Step observations").
    await w.wait_for(lambda: _at_least(w, MANAGED * 4 + MIRRORED * 2), seconds=240, every=0.2)
    for fid in mirrored:
        await publish(w, s.observation(fid), {"run_id": "r1", "task": "t", "status": "running"})
        await publish(w, s.observation(fid), {"run_id": "r1", "task": "t", "status": "succeeded"})


async def stream_count(w: Wire, stream: str) -> int:
    for _ in range(50):
        try:
            return int((await w.js.stream_info(stream)).state.messages)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await asyncio.sleep(0.2)
    raise AssertionError("stream info unavailable")


async def _read_whole(w: Wire) -> list[Any] | None:
    """Every message of the events stream (events and rejections), or None while a read
    right after a node came back comes up short of the stream's own count."""
    count = await stream_count(w, w.s.evt_stream)
    msgs = await w.stream_msgs(w.s.evt_stream)
    return msgs if len(msgs) >= count else None


async def _at_least(w: Wire, n: int) -> bool:
    return await stream_count(w, w.s.evt_stream) >= n


@pytest.mark.timeout(600)
async def test_cluster_survives_a_nats_node_and_a_replica_kill(
    database_url: str, prefix: str, tmp_path: Path
) -> None:
    nodes = nats_cluster(tmp_path / "nats")
    for node in nodes:
        await asyncio.to_thread(node.start)
    urls = ",".join(n.url for n in nodes)
    replicas: list[DaemonProcess] = []
    nc = await nats.connect(urls.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    w = Wire(nc, prefix)
    try:
        env = {"FLOWD_STREAM_REPLICAS": "3", "FLOWD_PARTITIONS": "6", "FLOWD_ACK_WAIT": "3"}
        for _ in range(3):
            d = DaemonProcess(urls, database_url, prefix, tmp_path, **env)
            d.start()
            replicas.append(d)
        for d in replicas:
            await asyncio.to_thread(d.wait_ready, 90)
        managed = [str(uuid.uuid4()) for _ in range(MANAGED)]
        mirrored = [str(uuid.uuid4()) for _ in range(MIRRORED)]
        started = time.monotonic()
        load = asyncio.create_task(drive(w, managed, mirrored))
        await w.wait_for(lambda: _at_least(w, COMMANDS // 4), seconds=120, every=0.05)
        nodes[1].kill()  # SIGKILL one NATS node …
        replicas[0].kill()  # … and one flowd replica, mid-load
        await asyncio.sleep(2)
        await asyncio.to_thread(nodes[1].start)
        replicas[0].start()
        await load

        expected = MANAGED * 4 + MIRRORED * 4  # a mirrored create has two events
        deadline = time.monotonic() + 240
        while await stream_count(w, w.s.evt_stream) < expected:
            assert time.monotonic() < deadline, "not every command was applied"
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        await asyncio.sleep(2)  # a duplicate would show up now
        # The stream holds events and rejections (outcomes). Read all of it: first any
        # rejection (a command ran out of order), then the event count (a duplicate).
        msgs = await w.wait_for(lambda: _read_whole(w), seconds=180, every=2)
        out_head = w.s.out_all.removesuffix(">")
        outcomes = [json.loads(m.data) for m in msgs if m.subject.startswith(out_head)]
        events = [json.loads(m.data) for m in msgs if not m.subject.startswith(out_head)]
        assert outcomes == [], f"{len(outcomes)} command(s) rejected, first: {outcomes[:3]}"
        assert len(events) == expected, "an event is duplicated"
        flows = by_flow(events)
        assert set(flows) == set(managed) | set(mirrored)
        for fid, evs in flows.items():
            assert [e["revision"] for e in evs] == list(range(len(evs))), fid
        cids = Counter(e["command_id"] for e in events if e["final"])
        assert max(cids.values()) == 1  # each command: one outcome
        sample = managed[::50] + mirrored[::50]
        for fid in sample:  # database and stream agree
            got = await w.request("get", {"flow_id": fid})
            assert got["result"] == flows[fid][-1]["flow"]
        print(f"\n{COMMANDS} commands through the cluster with faults in {elapsed:.1f}s")
    finally:
        for d in replicas:
            d.kill()
        await w.delete_streams()
        await nc.close()
        for node in nodes:
            await asyncio.to_thread(node.stop)
