"""NatsBus.publish_outbox against a real nats-server: every message of a batch is stored in
order with its ids; a message that can never be published is returned to be parked (the
later ones of its flow kept back); a batch JetStream does not take for a reason that may pass
fails as BusUnavailable (the relay then deletes nothing and sends the rows again)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats.js.errors
import pytest

from flowd.bus.nats import BusUnavailable, NatsBus, StreamLimits, connect
from flowd.bus.subjects import COMMAND_ID, MSG_ID
from flowd.core.outbox import OutboxMessage
from tests.support.daemon import Wire, wire

pytestmark = [pytest.mark.nats]


@pytest.fixture
async def w(nats_url: str, prefix: str) -> AsyncIterator[Wire]:
    async with wire(nats_url, prefix) as connected:
        yield connected


def message(n: int, body: str = '{"n": 1}') -> OutboxMessage:
    return OutboxMessage("evt.f.started", f"id-{n}", f"cmd-{n}" if n % 2 else None, body)


async def stored(w: Wire) -> list[tuple[str, bytes, dict[str, str]]]:
    info = await w.js.stream_info(w.s.evt_stream)
    out = []
    for seq in range(1, int(info.state.last_seq) + 1):
        m = await w.js.get_msg(w.s.evt_stream, seq)
        out.append((m.subject, m.data or b"", dict(m.headers or {})))
    return out


async def test_a_batch_is_stored_in_order_with_its_ids(w: Wire) -> None:
    bus = await NatsBus(w.nc, w.s, StreamLimits()).ensure()
    first = [message(n, f'{{"n": {n}}}') for n in range(1, 6)]
    await bus.publish_outbox(first)
    await bus.publish_outbox([message(6)])
    await bus.publish_outbox(first[:2])  # sent again: JetStream drops them by Nats-Msg-Id
    got = await stored(w)
    bodies = [f'{{"n": {n}}}'.encode() for n in range(1, 6)] + [b'{"n": 1}']
    assert [data for _, data, _ in got] == bodies
    assert {subject for subject, _, _ in got} == {f"{w.s.prefix}.evt.f.started"}
    assert [h[MSG_ID] for _, _, h in got] == [f"id-{n}" for n in range(1, 7)]
    assert [h.get(COMMAND_ID) for _, _, h in got] == ["cmd-1", None, "cmd-3", None, "cmd-5", None]


async def test_a_message_the_stream_refuses_for_good_is_returned_to_park(w: Wire) -> None:
    await NatsBus(w.nc, w.s, StreamLimits()).ensure()
    info = await w.js.stream_info(w.s.evt_stream)
    info.config.max_msg_size = 200  # the second message is bigger: the stream refuses it
    await w.js.update_stream(info.config)
    bus = NatsBus(w.nc, w.s, StreamLimits())  # has not read the limit: the server refuses
    big = message(2, '{"pad": "' + "x" * 300 + '"}')
    other = OutboxMessage("out.g", "id-9", "cmd-9", '{"n": 9}')
    drained = await bus.publish_outbox([message(1), big, other])
    assert list(drained.parked) == [1]
    assert "10054" in drained.parked[1]
    assert drained.kept == frozenset()
    assert bus.publish_limit() == 200  # read again after the refusal
    # Now foreseen: parked without being sent, and the same flow's later message kept back.
    drained = await bus.publish_outbox([message(3), big, message(4), other])
    assert dict(drained.parked) == {1: "message of 342 bytes exceeds the 200 byte limit of NATS"}
    assert drained.kept == frozenset({2})
    assert [h[MSG_ID] for _, _, h in await stored(w)] == ["id-1", "id-9", "id-3"]


async def test_a_message_over_max_payload_with_its_headers_is_never_sent(w: Wire) -> None:
    bus = await NatsBus(w.nc, w.s, StreamLimits()).ensure()
    limit = int(w.nc.max_payload)
    fits = OutboxMessage("evt.f.started", "id-1", None, "x" * (limit - 20))  # body fits...
    drained = await bus.publish_outbox([fits, message(2)])  # ...not with its headers
    assert list(drained.parked) == [0]
    assert drained.kept == frozenset({1})
    assert w.nc.is_connected  # nothing the server would close the connection for was sent
    await bus.publish_outbox([OutboxMessage("out.h", "id-3", None, "{}")])
    assert [h[MSG_ID] for _, _, h in await stored(w)] == ["id-3"]


async def test_a_subject_nats_refuses_is_returned_to_park(w: Wire) -> None:
    bus = await NatsBus(w.nc, w.s, StreamLimits()).ensure()
    drained = await bus.publish_outbox([OutboxMessage("out.a b", "id-1", None, "{}")])
    assert "subject" in drained.parked[0]


async def test_no_stream_for_the_subject_fails_the_batch(w: Wire) -> None:
    bus = NatsBus(w.nc, w.s, StreamLimits())  # ensure() never ran: no streams
    with pytest.raises(BusUnavailable, match="503"):
        await bus.publish_outbox([message(1)])


async def test_an_empty_batch_publishes_nothing(w: Wire) -> None:
    await NatsBus(w.nc, w.s, StreamLimits()).publish_outbox([])
    with pytest.raises(nats.js.errors.NotFoundError):
        await w.js.stream_info(w.s.evt_stream)


async def test_a_client_the_server_closes_for_good_calls_closed_cb(nats_url: str) -> None:
    """What the daemon hangs its exit on (``Daemon._nats_closed``): a message over the
    server's max_payload with its headers, which flowd itself never sends, closes the
    connection for good."""
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await connect(nats_url, closed_cb=on_closed)
    try:
        body = b"x" * (int(nc.max_payload) - 10)  # nats-py checks the body alone
        await nc.publish("flowd.test.too.big", body, headers={"A": "b" * 100})
        await asyncio.wait_for(closed.wait(), timeout=10)
        assert nc.is_closed
    finally:
        await nc.close()
