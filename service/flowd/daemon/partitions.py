"""PartitionOwner: with ``FLOWD_PARTITIONS`` > 1, which partitions this replica consumes.

Commands and observations are split into N partitions by a hash of the flow id (a stream
subject transform), one durable consumer per partition. A partition is consumed by exactly
one replica at a time: ownership is a PostgreSQL session advisory lock held on a dedicated
connection, so it is released the moment a replica dies (its connection drops) and another
replica takes the partition over. Each replica aims at ceil(N / live replicas) partitions
and hands extra ones back after finishing their messages in flight, so the load spreads as
replicas come and go. One consumer per partition, one owner per consumer, a bounded
window of unacked messages per consumer: a flow's commands are applied in stream order
across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from flowd.core import errors
from flowd.store.postgres import PartitionLeases

log = structlog.get_logger("flowd.partitions")

# run(partition, release) consumes one partition until ``release`` is set (or stop).
RunPartition = Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]


class PartitionOwner:
    """Acquires, balances and releases partition leases; runs one task per owned one."""

    def __init__(
        self,
        dsn: str,
        partitions: int,
        run: RunPartition,
        stop: asyncio.Event,
        *,
        interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.partitions = partitions
        self.run_partition = run
        self.stop = stop
        self.interval = interval
        self.owned: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._order = list(range(partitions))
        random.shuffle(self._order)  # replicas starting together try different partitions first

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                leases = await PartitionLeases.open(self.dsn)
            except errors.StoreUnavailable as exc:
                log.warning("partition_leases_unavailable", error=str(exc))
                await self._pause(self.interval)
                continue
            try:
                await self._balance_until_lost(leases)
            except errors.StoreUnavailable as exc:
                log.warning("partition_leases_lost", error=str(exc))
            finally:
                await self._release_all(leases)
                await leases.close()

    async def _balance_until_lost(self, leases: PartitionLeases) -> None:
        while not self.stop.is_set() and not leases.lost.is_set():
            for p, (task, _) in list(self.owned.items()):
                if task.done():  # a partition loop died: give the partition back
                    await self._release(leases, p)
            target = math.ceil(self.partitions / await leases.members())
            if len(self.owned) < target:
                for p in self._order:
                    if len(self.owned) >= target:
                        break
                    if p not in self.owned and await leases.try_acquire(p):
                        release = asyncio.Event()
                        task = asyncio.create_task(self.run_partition(p, release))
                        self.owned[p] = (task, release)
                        log.info("partition_acquired", partition=p, target=target)
            while len(self.owned) > target:
                await self._release(leases, next(iter(self.owned)))
            await self._pause(self.interval, leases.lost)

    async def _release(self, leases: PartitionLeases, partition: int) -> None:
        task, release = self.owned.pop(partition)
        release.set()
        with contextlib.suppress(Exception):
            await task  # finishes (or hands back) its messages in flight first
        if not leases.lost.is_set():
            with contextlib.suppress(errors.StoreUnavailable):
                await leases.release(partition)
        log.info("partition_released", partition=partition)

    async def _release_all(self, leases: PartitionLeases) -> None:
        # When the lease connection is lost, the locks are already gone: the loops see
        # their release event, hand back unfinished messages in order, and stop.
        for p in list(self.owned):
            await self._release(leases, p)

    async def _pause(self, seconds: float, *extra: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.stop, *extra)]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
