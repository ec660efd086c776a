"""Small asyncio helpers shared by the bus and the daemon (no flowd imports)."""

from __future__ import annotations

import asyncio


class Wakeup:
    """A wait that ends when ``wake()`` is called or after a timeout.

    One future and one timer per wait, not an ``asyncio.Event`` and the task a timed wait on
    it costs: the pull consumer and the outbox relay wait once or more per command. A wake
    with nobody waiting is not remembered; callers check their own condition (a queue, a
    flag) before they wait.
    """

    __slots__ = ("_loop", "_waiter")

    def __init__(self) -> None:
        # Bound at the first wait: on Python 3.11 every get_running_loop() is a getpid()
        # system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """End the wait in progress, if any."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until woken, or ``seconds`` passed."""
        loop = self._loop or self._bind()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(seconds, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop
