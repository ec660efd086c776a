"""Several replicas with partitioned consumers: per-flow order holds while replicas share
the load, and survives a replica's kill -9 (its partitions move to the others)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.faults.test_crashes import FLOWS, PER_FLOW, assert_all_applied_once, publish_load
from tests.support.daemon import Wire

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.nats]


async def needs_transforms(w: Wire) -> None:
    v = w.nc.connected_server_version
    version = (v.major, v.minor)
    if version < (2, 10):
        pytest.skip(f"stream subject transforms need nats-server >= 2.10, this is {version}")


async def _events(w: Wire) -> int:
    return int((await w.js.stream_info(w.s.evt_stream)).state.messages)


async def test_three_replicas_share_partitions_and_keep_order(
    make_daemon: Any, nats_wire: Wire
) -> None:
    await needs_transforms(nats_wire)
    env = {"FLOWD_PARTITIONS": 6, "FLOWD_ACK_WAIT": 2, "FLOWD_BATCH": 16}
    replicas = [make_daemon(**env) for _ in range(3)]
    flows = [str(uuid.uuid4()) for _ in range(FLOWS)]
    load = asyncio.create_task(publish_load(nats_wire, flows))
    await nats_wire.wait_for(lambda: _at_least(nats_wire, 80), every=0.01)
    replicas[0].kill()  # its partitions must move to the two others
    sent = await load
    await assert_all_applied_once(nats_wire, sent)
    owners = [
        {e["partition"] for e in d.log_events() if e.get("event") == "partition_acquired"}
        for d in replicas[1:]
    ]
    assert all(owners), f"a surviving replica owned nothing: {owners}"
    assert len(owners[0] | owners[1]) == 6  # every partition ended up owned


async def _at_least(w: Wire, n: int) -> bool:
    return await _events(w) >= n


async def test_id_less_creates_go_to_the_shared_consumer(make_daemon: Any, nats_wire: Wire) -> None:
    await needs_transforms(nats_wire)
    make_daemon(FLOWD_PARTITIONS=3)
    await nats_wire.publish(
        nats_wire.s.create(), {"controller_id": "c", "goal": "g", "owner_session_key": "o"}
    )
    events = await nats_wire.wait_for(nats_wire.events)
    assert events[0]["kind"] == "created"
    assert FLOWS * PER_FLOW > 0
