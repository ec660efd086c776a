"""Wakeup: a wait ends when woken or timed out, and a wake nobody waits for is not kept."""

from __future__ import annotations

import asyncio

from flowd.aio import Wakeup


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_wake_ends_the_wait_in_progress() -> None:
    w = Wakeup()
    waiting = asyncio.create_task(w.wait(60))
    await _turns()
    assert not waiting.done()
    w.wake()
    await asyncio.wait_for(waiting, 5)  # long before its 60 s


async def test_a_wait_ends_by_itself_after_its_timeout() -> None:
    await asyncio.wait_for(Wakeup().wait(0.01), 5)


async def test_a_wake_with_nobody_waiting_is_not_kept() -> None:
    w = Wakeup()
    w.wake()
    waiting = asyncio.create_task(w.wait(60))
    await _turns()
    assert not waiting.done()
    w.wake()
    await asyncio.wait_for(waiting, 5)


async def test_a_second_wake_and_a_cancelled_wait_leave_it_usable() -> None:
    w = Wakeup()
    waiting = asyncio.create_task(w.wait(60))
    await _turns()
    w.wake()
    w.wake()  # the future is done already: no InvalidStateError
    await waiting
    cancelled = asyncio.create_task(w.wait(60))
    await _turns()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    again = asyncio.create_task(w.wait(60))
    await _turns()
    assert not again.done()
    w.wake()
    await asyncio.wait_for(again, 5)
