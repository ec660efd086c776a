"""A flow's later message must not overtake an earlier one that JetStream will only redeliver
after its ack wait: one lost on its way to flowd (a NATS node died with it in transit), or
ones another process had fetched and never settled (it crashed; flowd took its partition
over), which come back in the order their ack waits run out, not in stream order.
Real nats-server. A loss is made by dropping one delivery as it reaches the client, which is
what a dead route or connection does to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

import flowd.bus.nats as bus_nats
from flowd.bus.nats import Gaps, _Pull

pytestmark = [pytest.mark.nats]

ACK_WAIT = 1.0
MESSAGES = 12
LOST = 4  # the stream sequence whose first delivery never arrives
CRASHED = 3  # messages a process fetched and never settled
IN_ORDER = list(range(1, MESSAGES + 1))


@pytest.fixture
async def nc(nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    monkeypatch.setattr(bus_nats, "REDELIVERY_GRACE", 1.0)
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await js.add_stream(api.StreamConfig(name=prefix, subjects=[f"{prefix}.>"]))
    await js.add_consumer(
        prefix,
        api.ConsumerConfig(
            durable_name="c",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_ack_pending=100,
        ),
    )
    for i in range(MESSAGES):
        await js.publish(f"{prefix}.m", str(i).encode())
    yield client
    await js.delete_stream(prefix)
    await client.close()


async def pull_of(nc: Client, prefix: str, gaps: Gaps) -> _Pull:
    return await _Pull(nc, nc.jetstream(), prefix, "c", gaps=gaps, ack_wait=ACK_WAIT).start()


async def taken(pull: _Pull) -> list[int]:
    """Stream sequences in the order ``pull`` hands them over (each acked), until all were."""
    order: list[int] = []
    try:
        async with asyncio.timeout(30):
            while len(set(order)) < MESSAGES:
                for msg in await pull.fetch(3, wait=0.2):
                    order.append(msg.metadata.sequence.stream)
                    await msg.ack()
    finally:
        await pull.close()
    return order


async def lossy_order(nc: Client, prefix: str, gaps: Gaps, *, reconnect: bool = False) -> list[int]:
    pull = await pull_of(nc, prefix, gaps)
    arrived = pull._arrived
    dropped: list[int] = []

    async def lossy(msg: Msg) -> None:
        if not msg.headers and msg.metadata.sequence.stream == LOST and not dropped:
            dropped.append(msg.metadata.sequence.consumer)
            if reconnect:  # the connection dropped with it (counted as nats-py does)
                nc.stats["reconnects"] += 1
            return  # lost on the way: the server counts it delivered
        await arrived(msg)

    pull._sub._cb = lossy
    order = await taken(pull)
    assert dropped, "the lossy delivery never happened"
    return order


async def takeover_order(nc: Client, prefix: str, gaps: Gaps) -> list[int]:
    """A process fetches the first three messages and dies; the first one had been kept in
    progress, so the other two run out their ack wait, and come back, first."""
    crashed = await nc.jetstream().pull_subscribe_bind("c", stream=prefix)
    got = await crashed.fetch(CRASHED, timeout=5)
    assert [m.metadata.sequence.stream for m in got] == IN_ORDER[:CRASHED]
    await asyncio.sleep(ACK_WAIT / 2)
    await got[0].in_progress()
    await crashed.unsubscribe()
    pull = await pull_of(nc, prefix, gaps)
    pull.resync()
    return await taken(pull)


async def test_a_lost_delivery_is_not_overtaken(nc: Client, prefix: str) -> None:
    # Every message once, in stream order: what followed the lost one waited for it.
    assert await lossy_order(nc, prefix, "any") == IN_ORDER


async def test_a_crashed_processs_messages_are_not_overtaken(nc: Client, prefix: str) -> None:
    assert await takeover_order(nc, prefix, "any") == IN_ORDER


async def test_without_the_checks_later_messages_overtake(nc: Client, prefix: str) -> None:
    """The hazard itself (what consumers whose order does not matter do): the owed message
    comes back after its ack wait, behind everything delivered meanwhile."""
    order = await lossy_order(nc, prefix, "ignore")
    assert order == [s for s in IN_ORDER if s != LOST] + [LOST]


async def test_without_the_checks_a_takeover_overtakes(nc: Client, prefix: str) -> None:
    order = await takeover_order(nc, prefix, "ignore")
    assert order.index(1) > order.index(2)  # the first one's extended ack wait ran out last
    assert order.index(2) > order.index(CRASHED + 1)  # the rest came before any came back


async def test_a_shared_consumer_resyncs_after_a_reconnect(nc: Client, prefix: str) -> None:
    """Other replicas may pull a shared consumer, so only a jump right after this process
    reconnected says deliveries were lost; then the same resync keeps the order."""
    assert await lossy_order(nc, prefix, "across_reconnect", reconnect=True) == IN_ORDER


async def test_a_shared_consumer_ignores_a_jump_without_a_reconnect(
    nc: Client, prefix: str
) -> None:
    """The documented limit: a loss with this process's connection intact (a dead route in a
    NATS cluster) goes unseen on a shared consumer; partitions catch it."""
    order = await lossy_order(nc, prefix, "across_reconnect")
    assert order == [s for s in IN_ORDER if s != LOST] + [LOST]
