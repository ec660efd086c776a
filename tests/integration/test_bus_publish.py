"""NatsBus.publish_outbox against a real nats-server: every message of a batch is stored in
order with its ids, and a batch JetStream does not take whole fails as BusUnavailable (the
relay then deletes nothing and sends the rows again)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats.js.errors
import pytest

from flowd.bus.nats import BusUnavailable, NatsBus, StreamLimits
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


async def test_a_refused_message_fails_its_batch(w: Wire) -> None:
    await NatsBus(w.nc, w.s, StreamLimits()).ensure()
    info = await w.js.stream_info(w.s.evt_stream)
    info.config.max_msg_size = 64  # the second message is bigger: the stream refuses it
    await w.js.update_stream(info.config)
    bus = NatsBus(w.nc, w.s, StreamLimits())
    with pytest.raises(BusUnavailable, match="refused"):
        await bus.publish_outbox([message(1), message(2, '{"pad": "' + "x" * 100 + '"}')])
    await bus.publish_outbox([message(3)])  # the bus is still usable
    assert [h[MSG_ID] for _, _, h in await stored(w)] == ["id-1", "id-3"]


async def test_no_stream_for_the_subject_fails_the_batch(w: Wire) -> None:
    bus = NatsBus(w.nc, w.s, StreamLimits())  # ensure() never ran: no streams
    with pytest.raises(BusUnavailable, match="503"):
        await bus.publish_outbox([message(1)])


async def test_an_empty_batch_publishes_nothing(w: Wire) -> None:
    await NatsBus(w.nc, w.s, StreamLimits()).publish_outbox([])
    with pytest.raises(nats.js.errors.NotFoundError):
        await w.js.stream_info(w.s.evt_stream)
