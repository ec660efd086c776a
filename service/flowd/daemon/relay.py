"""OutboxRelay: publishes outbox rows to JetStream, in order, and deletes them once acked.

Woken right after local commits (low latency) and polling every ``interval`` for rows left
by a crash. Only one relay publishes at a time across replicas (the store's drain lock). A
replica whose relay does not hold the lock does not try it after each commit (a wasted round
trip); it nudges the holder over NATS (``P.relay``) instead, so its rows leave at once too,
and tries the lock again once per ``interval`` however often it is woken (taking over
within it if the holder died or let go). A nudge is core NATS: one lost in a reconnect
leaves those rows for the holder's next poll. A failed publish deletes nothing: the rows
are re-sent later with the same ``Nats-Msg-Id``, and one whose first send had landed is
dropped by JetStream or, past its duplicate window, not sent (below).

A message that can never be published (too big for the NATS server or the events stream, a
subject NATS refuses) is *parked*: its row stays, marked, and its flow's later rows wait
behind it (per-flow order stays gapless) while every other flow's rows go on; ``flowctl
outbox`` retries or skips it. Transient failures (no responders, timeouts, a lost
connection) are retried as before.

No double publish. A row JetStream stored may still be in the outbox: published, and its
delete lost (the process died first, the delete failed, PostgreSQL crashed before flushing
it). Re-sent after the duplicate window, JetStream would store it again. So whenever the
relay is *uncertain* (it has just taken the drain lock, or its last round failed), it asks
JetStream, before publishing a batch, for the last message stored on each subject of the
batch. A subject's rows are published in outbox order and deleted only once acked, so of
the rows still in the outbox for one subject the stored ones come first: every row up to
the one whose ``Nats-Msg-Id`` is the last stored message's is deleted unsent (and if that
id is a row beyond this batch, all of this batch's rows of that subject are). That holds for
events (``_in_commit_order``); on an outcome subject only the named row is. It stays
uncertain until a checked batch holds no stored row and none is known further on; a certain
relay asks nothing.
"""

from __future__ import annotations

import asyncio

import structlog

from flowd.aio import Wakeup
from flowd.bus.nats import BusUnavailable, NatsBus
from flowd.core import errors
from flowd.core.outbox import Drained, OutboxMessage
from flowd.daemon.health import Metrics
from flowd.store.port import FlowStore

log = structlog.get_logger("flowd.relay")


class OutboxRelay:
    """Drains the outbox into NATS until stopped, then flushes what is left."""

    def __init__(
        self,
        store: FlowStore,
        bus: NatsBus,
        metrics: Metrics,
        *,
        interval: float = 0.2,
        batch: int = 256,
    ) -> None:
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.interval = interval
        self.batch = batch
        # A wake since the last drain began, and what a sleeping relay waits on (this runs
        # after every commit).
        self._woken = False
        self._wakeup = Wakeup()
        self._turns = -1  # the store's drain-lock turn this relay last saw
        self._uncertain = True  # rows JetStream stored may still be in the outbox

    def wake(self) -> None:
        """Ask for a drain now (called after local commits)."""
        self._woken = True
        self._wakeup.wake()

    def nudged(self) -> None:
        """Another replica committed outbox rows: drain now, unless another replica holds
        the drain lock (then it was nudged too, and this relay has nothing to do)."""
        if not self.store.outbox_drained_elsewhere():
            self.wake()

    async def start(self) -> None:
        """Listen for other replicas' nudges."""
        await self.bus.on_relay_nudge(self.nudged)

    async def _publish(self, batch: list[OutboxMessage]) -> Drained:
        if (turns := self.store.outbox_turns()) != self._turns:
            self._turns, self._uncertain = turns, True
        stored, later = await self._already_stored(batch) if self._uncertain else (set(), False)
        try:
            drained = await self.bus.publish_outbox(batch, skip=stored)
        except BusUnavailable:
            self._uncertain = True
            raise
        self._uncertain = bool(stored) or later
        if stored:
            self.metrics.inc("outbox_already_stored_total", len(stored))
            log.info("outbox_rows_already_stored", count=len(stored))
        for i, reason in drained.parked.items():
            m = batch[i]
            self.metrics.inc("outbox_parked_total")
            log.error(
                "outbox_row_parked",
                flow=m.flow_key,
                topic=m.topic,
                msg_id=m.msg_id,
                row=m.row_id,
                reason=reason,
            )
        done = len(batch) - len(stored) - len(drained.parked) - len(drained.kept)
        self.metrics.inc("outbox_published_total", done)
        return drained

    async def _already_stored(self, batch: list[OutboxMessage]) -> tuple[set[int], bool]:
        """The rows of ``batch`` that JetStream stored already (see the module's text), and
        whether a row of a later batch is known to be stored (stay uncertain then)."""
        by_subject: dict[str, list[int]] = {}
        for i, m in enumerate(batch):
            by_subject.setdefault(self.bus.subjects.topic(m.topic), []).append(i)
        last = await self.bus.stored_ids(by_subject)
        stored: set[int] = set()
        beyond: dict[str, str] = {}  # a last stored id that is no row of the batch -> subject
        for subject, msg_id in last.items():
            rows = by_subject[subject]
            at = next((n for n, i in enumerate(rows) if batch[i].msg_id == msg_id), None)
            if at is None:
                beyond[msg_id] = subject
            elif _in_commit_order(batch[rows[0]]):
                stored.update(rows[: at + 1])
            else:
                stored.add(rows[at])
        later = False
        if beyond:
            for msg_id in await self.store.outbox_holding(list(beyond)):
                rows = by_subject[beyond[msg_id]]
                if _in_commit_order(batch[rows[0]]):  # then so were all of this batch's
                    stored.update(rows)
                later = True
        return stored, later

    async def drain_once(self) -> int:
        """Publish until the outbox is empty (or another relay holds it); returns the count."""
        total = 0
        while n := await self.store.drain_outbox(self._publish, limit=self.batch):
            total += n
            if n < self.batch:  # a short batch emptied it: no extra empty transaction
                break
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set, then flush for up to 10 s."""
        loop = asyncio.get_running_loop()
        backoff = self.interval
        woken = False
        tried = -float("inf")  # when this relay last tried to drain (and so the lock)
        stopping = loop.create_task(self._wake_on(stop))
        while not stop.is_set():
            # Cleared before draining, not after: a commit landing during the drain sets it
            # again, and its rows leave right after this drain, not at the next poll.
            self._woken = False
            try:
                # Without the lock, drain (try the lock) only once per interval: a holder that
                # died or let go is taken over within it, however busy this replica is.
                if not self.store.outbox_drained_elsewhere() or loop.time() - tried >= backoff:
                    tried = loop.time()
                    await self.drain_once()
                if woken and self.store.outbox_drained_elsewhere():
                    await self.bus.nudge_relay()  # the holder drains our rows now
                backoff = self.interval
            except (errors.StoreUnavailable, BusUnavailable) as exc:
                self.metrics.inc("outbox_errors_total")
                log.warning("outbox_relay_failed", error=str(exc), retry_in=backoff)
                backoff = min(backoff * 2, 5.0)
            if not self._woken:
                await self._wakeup.wait(backoff)
            woken = self._woken
        stopping.cancel()
        await self.flush(seconds=10)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wake()

    async def flush(self, seconds: float) -> None:
        """Drain what is left, giving up after ``seconds`` (rows stay for later)."""
        try:
            async with asyncio.timeout(seconds):
                nudged = False
                while True:
                    try:
                        await self.drain_once()
                        if not nudged and self.store.outbox_drained_elsewhere():
                            await self.bus.nudge_relay()  # our last commits, if not yet
                            nudged = True
                        if await self.store.outbox_backlog() == 0:
                            return
                    except (errors.StoreUnavailable, BusUnavailable):
                        pass
                    await asyncio.sleep(0.05)  # another replica may hold the drain lock
        except TimeoutError:
            log.warning("outbox_flush_incomplete")


def _in_commit_order(m: OutboxMessage) -> bool:
    """Whether the rows of ``m``'s subject were committed in id order, so that they were
    published in the order they are stored: events, written under their flow's row lock. An
    outcome subject may be shared by commands applied at once (``out.create``, a token
    that is not a flow id, an API request next to a stream command): of those, only the row
    whose id JetStream names is known to be stored."""
    return m.topic.startswith("evt.")
