"""Broker: storage plus wake-ups; knows "notify after commit" and the long-poll loop."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress

from linger import errors
from linger.auth.scopes import Patterns
from linger.queue.notifier import Notifier, Waiter
from linger.store.batches import Named
from linger.store.records import DONE, Message, NewMessage, Options
from linger.store.storage import Storage
from linger.store.topics import Published

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
        max_copies: int = 0,
        poll_interval: float = 1.0,
        max_waiters: int = 20_000,
    ) -> None:
        self.storage = storage
        self.notifier = notifier
        self.hlm = hlm
        self.max_copies = max_copies
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

    async def add_many(self, channel: str, batch: Sequence[NewMessage]) -> list[int]:
        """Store a batch of messages (all or none) and wake as many consumers."""
        ids = await self.storage.batches.add(channel, batch, self.hlm)
        self.counters["msg-add"] += len(ids)
        self.notifier.notify(channel, len(ids))
        return ids

    async def publish(self, topic: str, body: bytes, content_type: str) -> dict[str, int]:
        """Copy a message to every subscribed channel and wake their consumers."""
        published = await self.storage.topics.publish(topic, body, content_type, self.hlm)
        return self._published(topic, [published])[0]

    async def publish_many(self, topic: str, batch: Sequence[NewMessage]) -> list[dict[str, int]]:
        """Publish a batch of messages in one transaction, in order."""
        return self._published(
            topic, await self.storage.topics.publish_many(topic, batch, self.hlm, self.max_copies)
        )

    def _published(self, topic: str, published: list[Published]) -> list[dict[str, int]]:
        woken: Counter[str] = Counter()
        for one in published:
            self.counters["publish"] += 1
            woken.update(one.ids.keys())
            if one.skipped:
                self.counters["publish-skipped"] += len(one.skipped)
                logger.warning(
                    "publish to %r skipped channels at the high-level mark: %s",
                    topic,
                    ", ".join(sorted(one.skipped)),
                )
        for channel, count in woken.items():
            self.notifier.notify(channel, count)
        return [one.ids for one in published]

    async def receive(
        self,
        channel: str,
        n: int,
        *,
        wait: float,
        alive: Callable[[], bool],
        budget: tuple[int, int] | None = None,
    ) -> list[Message]:
        """Deliver up to ``n`` messages of ``channel`` (bodies within ``budget``, see
        ``Messages.claim``), waiting up to ``wait`` seconds for the first.

        Waiting holds no database connection: the waiter sleeps until an add in this
        process, the poller or shutdown wakes it, then claims again (another consumer may
        have been faster). A consumer whose client has gone claims nothing, not even
        before it waits. While the database is unreachable, a waiting consumer (a new one
        too) keeps waiting and tries again at each poll; beyond ``max_waiters`` waiting
        consumers, ``Overloaded`` is raised.
        """
        self.counters["msg-get"] += 1
        if not alive():
            return []
        claim = self.storage.messages.claim
        if wait <= 0:
            return self._delivered(await claim(channel, n, budget=budget))
        if self.notifier.count() >= self.max_waiters:
            messages = await claim(channel, n, budget=budget)
            if not messages:
                raise errors.Overloaded()
            return self._delivered(messages)
        async with self.notifier.waiter(channel, alive) as waiter:
            messages = await self._claim_while_waiting(channel, n, budget)
            if not messages:
                messages = await self._wait(channel, n, budget, waiter, wait, alive)
        return self._delivered(messages)

    async def _wait(
        self,
        channel: str,
        n: int,
        budget: tuple[int, int] | None,
        waiter: Waiter,
        wait: float,
        alive: Callable[[], bool],
    ) -> list[Message]:
        """Wait for a wake-up, then claim, until a claim succeeds or the wait ends; the
        channel stays listed meanwhile, and for 180 s after a wait that ends empty.
        (Everything a waiter holds is held for its whole wait, ten thousand times over
        with as many consumers: no closures or partials of the claim here.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        relist = loop.time() + _RELIST
        while (remaining := deadline - loop.time()) > 0:
            try:
                # asyncio.timeout, not wait_for: the wait runs in this task, where
                # wait_for would hold a task of its own for each waiting consumer.
                with self.notifier.sleeping():
                    async with asyncio.timeout(min(remaining, relist - loop.time())):
                        await waiter.event.wait()
            except TimeoutError:
                if loop.time() >= relist and deadline - loop.time() > 0:
                    relist = loop.time() + _RELIST
                    await self._listed(channel)
                continue
            if self.notifier.closed or not alive():
                break
            waiter.event.clear()
            messages = await self._claim_while_waiting(channel, n, budget)
            if messages:
                return messages
        await self._listed(channel)
        return []

    async def _listed(self, channel: str) -> None:
        try:
            await self.storage.messages.polled(channel)
        except errors.LingerError as error:  # only the channel list is late
            logger.debug("long-poll on %r: listing mark not written: %s", channel, error)

    async def _claim_while_waiting(
        self, channel: str, n: int, budget: tuple[int, int] | None
    ) -> list[Message]:
        try:
            return await self.storage.messages.claim(channel, n, budget=budget, listed=True)
        except errors.Unavailable as error:
            logger.warning("long-poll on %r: %s; waiting on", channel, error)
            return []

    def _delivered(self, messages: list[Message]) -> list[Message]:
        self.counters["delivered"] += len(messages)
        self.counters["msg-timeouts"] += sum(1 for m in messages if m.deliveries > 1)
        return messages

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
                    self.notifier.awake(channel, min(ready, waiting[channel]))
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

    async def release(
        self, message_id: int, lease: int | None, delay: int, scope: Patterns | None = None
    ) -> None:
        """Give a delivered message back (ready now, or after ``delay`` s) and wake a
        consumer of its channel when it is ready now."""
        channel = await self.storage.leases.release(message_id, lease, delay, scope)
        self.counters["msg-release"] += 1
        if channel is not None:
            self.notifier.notify(channel)

    async def reject(
        self, message_id: int, lease: int | None, scope: Patterns | None = None
    ) -> None:
        """Move a delivered message to its dead channel now (or discard it) and wake a
        consumer of that channel."""
        dead = await self.storage.leases.reject(message_id, lease, scope)
        self.counters["msg-reject"] += 1
        if dead is None:
            self.counters["msg-discarded"] += 1
            return
        self.counters["msg-dead"] += 1
        self.notifier.notify(dead)

    async def delete_many(
        self, named: Sequence[Named], *, by_lease: bool, scope: Patterns | None = None
    ) -> list[str]:
        """Delete a batch of delivered messages; the outcome of each, in order."""
        done = await self.storage.batches.delete(named, by_lease=by_lease, scope=scope)
        self.counters["msg-delete"] += done.outcomes.count(DONE)
        return done.outcomes

    async def touch_many(
        self, named: Sequence[Named], seconds: int | None, scope: Patterns | None = None
    ) -> list[str]:
        done = await self.storage.batches.touch(named, seconds, scope)
        self.counters["msg-touch"] += done.outcomes.count(DONE)
        return done.outcomes

    async def release_many(
        self, named: Sequence[Named], delay: int, scope: Patterns | None = None
    ) -> list[str]:
        """Give a batch of delivered messages back and wake as many consumers as became
        ready."""
        done = await self.storage.batches.release(named, delay, scope)
        self.counters["msg-release"] += done.outcomes.count(DONE)
        self._wake(done.ready)
        return done.outcomes

    async def reject_many(self, named: Sequence[Named], scope: Patterns | None = None) -> list[str]:
        """Dead-letter (or discard) a batch of delivered messages."""
        done = await self.storage.batches.reject(named, scope)
        self.counters["msg-reject"] += done.outcomes.count(DONE)
        self.counters["msg-dead"] += sum(done.ready.values())
        self.counters["msg-discarded"] += done.discarded
        self._wake(done.ready)
        return done.outcomes

    def _wake(self, ready: Counter[str]) -> None:
        for channel, count in ready.items():
            self.notifier.notify(channel, count)

    async def redrive(
        self, channel: str, to: str | None, limit: int | None, scope: Patterns | None = None
    ) -> int:
        """Send dead letters of ``channel`` back (with ``scope``: those whose origin it
        covers); wake consumers where they went."""
        moved = await self.storage.dead_letters.redrive(channel, to, limit, scope)
        self._wake(Counter(moved))
        total = sum(moved.values())
        self.counters["msg-redriven"] += total
        return total

    async def sweep(self) -> None:
        swept = await self.storage.sweeper.sweep()
        self.counters["msg-retention"] += swept.retention
        self.counters["msg-discarded"] += swept.discarded
        self.counters["msg-dead"] += swept.dead
        self._wake(swept.requeued)
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
