"""Broker: storage plus wake-ups; knows "notify after commit" and the long-poll loop."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

from linger import errors
from linger.queue.notifier import Notifier, Waiter
from linger.store.records import Message, Options
from linger.store.storage import Storage

logger = logging.getLogger(__name__)

# The ready-message query of the poller names at most this many channels at once.
_POLL_BATCH = 500
# Poll this long after a hidden message's visible_at, so that it is visible by then.
_VISIBLE_SLACK = 0.002
# A consumer waiting longer than this renews its channel's listing mark (listed 180 s).
_RELIST = 60.0


class Broker:
    """Adds, long-poll gets and publishes; counts this process's events in ``counters``."""

    def __init__(
        self,
        storage: Storage,
        notifier: Notifier,
        *,
        hlm: int = 0,
        poll_interval: float = 1.0,
        max_waiters: int = 20_000,
    ) -> None:
        self.storage = storage
        self.notifier = notifier
        self.hlm = hlm
        self.poll_interval = poll_interval
        self.max_waiters = max_waiters
        self.counters: Counter[str] = Counter()
        self._poll_soon = asyncio.Event()

    async def add(self, channel: str, body: bytes, content_type: str, options: Options) -> int:
        """Store a message and wake one consumer waiting on its channel."""
        message_id = await self.storage.messages.add(channel, body, content_type, options, self.hlm)
        self.counters["msg-add"] += 1
        self.notifier.notify(channel)
        return message_id

    async def publish(self, topic: str, body: bytes, content_type: str) -> dict[str, int]:
        """Copy a message to every subscribed channel and wake their consumers."""
        published = await self.storage.topics.publish(topic, body, content_type, self.hlm)
        self.counters["publish"] += 1
        if published.skipped:
            self.counters["publish-skipped"] += len(published.skipped)
            logger.warning(
                "publish to %r skipped channels at the high-level mark: %s",
                topic,
                ", ".join(sorted(published.skipped)),
            )
        for channel in published.ids:
            self.notifier.notify(channel)
        return published.ids

    async def get(self, channel: str, *, wait: float, alive: Callable[[], bool]) -> Message | None:
        """Deliver the next message of ``channel``, waiting up to ``wait`` seconds for one.

        Waiting holds no database connection: the waiter sleeps until an add in this
        process, the poller or shutdown wakes it, then claims again (another consumer may
        have been faster). A consumer whose client has gone claims nothing, not even
        before it waits. While the database is unreachable, a waiting consumer (a new one
        too) keeps waiting and tries again at each poll; beyond ``max_waiters`` waiting
        consumers, ``Overloaded`` is raised.
        """
        self.counters["msg-get"] += 1
        if not alive():
            return None
        if wait <= 0:
            return self._delivered(await self.storage.messages.claim_one(channel))
        if self.notifier.count() >= self.max_waiters:
            message = await self.storage.messages.claim_one(channel)
            if message is None:
                raise errors.Overloaded()
            return self._delivered(message)
        async with self.notifier.waiter(channel, alive) as waiter:
            message = await self._claim_while_waiting(channel)
            if message is None:
                message = await self._wait(channel, waiter, wait, alive)
        return self._delivered(message)

    async def _wait(
        self, channel: str, waiter: Waiter, wait: float, alive: Callable[[], bool]
    ) -> Message | None:
        """Wait for a wake-up, then claim, until a claim succeeds or the wait ends; the
        channel stays listed meanwhile, and for 180 s after a wait that ends empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        relist = loop.time() + _RELIST
        while (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(waiter.event.wait(), min(remaining, relist - loop.time()))
            except TimeoutError:
                if loop.time() >= relist and deadline - loop.time() > 0:
                    relist = loop.time() + _RELIST
                    await self._listed(channel)
                continue
            if self.notifier.closed or not alive():
                break
            waiter.event.clear()
            message = await self._claim_while_waiting(channel)
            if message is not None:
                return message
        await self._listed(channel)
        return None

    async def _listed(self, channel: str) -> None:
        try:
            await self.storage.messages.polled(channel)
        except errors.LingerError as error:  # only the channel list is late
            logger.debug("long-poll on %r: listing mark not written: %s", channel, error)

    async def _claim_while_waiting(self, channel: str) -> Message | None:
        try:
            return await self.storage.messages.claim_one(channel, listed=True)
        except errors.Unavailable as error:
            logger.warning("long-poll on %r: %s; waiting on", channel, error)
            return None

    def _delivered(self, message: Message | None) -> Message | None:
        if message is not None:
            self.counters["delivered"] += 1
            if message.deliveries > 1:
                self.counters["msg-timeouts"] += 1
        return message

    async def poll_once(self) -> float | None:
        """Wake waiters of channels where messages became ready without an add in this
        process (visibility timeouts ran out, other processes added), and drop waiters
        whose client disconnected. Return the clock time (s) at which the next hidden
        message of a waited-on channel becomes visible, if any."""
        self.notifier.prune()
        waiting = self.notifier.channels()
        names = list(waiting)
        soonest: int | None = None
        for start in range(0, len(names), _POLL_BATCH):
            state = await self.storage.messages.readiness(names[start : start + _POLL_BATCH])
            for channel, (ready, next_visible) in state.items():
                if ready:
                    self.notifier.notify(channel, min(ready, waiting[channel]))
                if next_visible is not None and (soonest is None or next_visible < soonest):
                    soonest = next_visible
        return None if soonest is None else soonest / 1000

    def poll_soon(self) -> None:
        """Run the poller now rather than at its next interval."""
        self._poll_soon.set()

    async def run_poller(self) -> None:
        """Poll every ``poll_interval``, and also right when a hidden message that a
        consumer waits for becomes visible again."""
        delay = self.poll_interval
        while not self.notifier.closed:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._poll_soon.wait(), delay)
            self._poll_soon.clear()
            delay = self.poll_interval
            try:
                next_visible = await self.poll_once()
            except errors.Unavailable as error:
                logger.warning("poller: %s", error)
                continue
            except Exception:
                logger.exception("poller failed")
                continue
            if next_visible is not None:
                until = next_visible - self.storage.now() / 1000 + _VISIBLE_SLACK
                delay = max(0.0, min(delay, until))

    async def release(self, message_id: int, lease: int | None, delay: int) -> None:
        """Give a delivered message back (ready now, or after ``delay`` s) and wake a
        consumer of its channel when it is ready now."""
        channel = await self.storage.leases.release(message_id, lease, delay)
        self.counters["msg-release"] += 1
        if channel is not None:
            self.notifier.notify(channel)

    async def reject(self, message_id: int, lease: int | None) -> None:
        """Move a delivered message to its dead channel now (or discard it) and wake a
        consumer of that channel."""
        dead = await self.storage.leases.reject(message_id, lease)
        self.counters["msg-reject"] += 1
        if dead is None:
            self.counters["msg-discarded"] += 1
            return
        self.counters["msg-dead"] += 1
        self.notifier.notify(dead)

    async def redrive(self, channel: str, to: str | None, limit: int | None) -> int:
        """Send dead letters of ``channel`` back; wake consumers where they went."""
        moved = await self.storage.dead_letters.redrive(channel, to, limit)
        for target, count in moved.items():
            self.notifier.notify(target, count)
        total = sum(moved.values())
        self.counters["msg-redriven"] += total
        return total

    async def sweep(self) -> None:
        swept = await self.storage.sweeper.sweep()
        self.counters["msg-retention"] += swept.retention
        self.counters["msg-discarded"] += swept.discarded
        self.counters["msg-dead"] += swept.dead
        for channel in swept.dead_channels:
            self.notifier.notify(channel)

    async def run_sweeper(self, interval: float) -> None:
        """Delete expired messages every ``interval`` seconds; a failed sweep is logged
        and the next one runs as usual."""
        while True:
            try:
                await self.sweep()
            except errors.Unavailable as error:
                logger.warning("sweeper: %s", error)
            except Exception:
                logger.exception("sweep failed")
            await asyncio.sleep(interval)
