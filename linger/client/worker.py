"""The worker loop: ``Consumer`` receives (long-polling), runs the handler, deletes what it
handled, and keeps extending the leases of every message it holds until it is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from linger.client import errors
from linger.client.leases import Held, Holdings
from linger.client.messages import Message

if TYPE_CHECKING:
    from linger.client.aio import AsyncClient

logger = logging.getLogger(__name__)

# How long a stopping loop lets a receive already sent come back (its messages are then
# released) before it cuts it off: a long-poll of an empty channel is safe to cut.
STOP_GRACE = 0.5
# Errors of a receive that trying again cannot cure: the loop stops and raises them.
_FATAL = (errors.BadRequest, errors.Unauthenticated, errors.NotAllowed, errors.NotFound)
# Errors that mean the lease is no longer this loop's: nothing is acknowledged.
_LOST = (errors.Conflict, errors.NotFound)
_MOST_PER_REQUEST = 1000


class Reject(Exception):
    """Raised by a handler: the message can never be processed. It goes to its dead
    channel now (or is discarded when it has none)."""


@dataclass
class Counters:
    """What a loop did with the deliveries it started: ``processed`` (handled and
    deleted), ``failed`` (the handler raised or timed out: released for a later try),
    ``rejected`` (``Reject``: dead-lettered), ``lost`` (not acknowledged: the lease was
    lost, logged at WARNING, or the acknowledgement failed)."""

    processed: int = 0
    failed: int = 0
    rejected: int = 0
    lost: int = 0


class Consumer:
    """Receives from ``channel`` and runs ``handler`` on each message, ``concurrency`` at
    a time, receiving ``batch`` at a time (one long-poll per batch).

    A handler that returns: the message is deleted (in batches). One that raises: the
    message is released, ready again after ``retry_delay * 2**(delivered - 1)`` seconds
    (at most ``max_retry_delay``). One that raises ``Reject``: rejected. One that runs
    longer than ``handler_timeout``: cancelled and released. While the loop holds a
    message, started or not, its lease is extended at half its visibility timeout; an
    action whose lease was lost (409) is logged at WARNING and counted as lost, never
    retried with another lease. ``stop()`` (or SIGTERM / SIGINT when ``signals`` and run
    in the main thread) lets running handlers finish and releases the messages received
    but not started. ``wait``: seconds each long-poll may last (None: the server's
    --poll-max)."""

    def __init__(
        self,
        client: AsyncClient,
        channel: str,
        handler: Callable[[Message], Awaitable[object]],
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = None,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
    ) -> None:
        if concurrency < 1 or batch < 1:
            raise ValueError("concurrency and batch must be at least 1")
        self.client = client
        self.channel = channel
        self.handler = handler
        self.concurrency = concurrency
        self.batch = batch
        self.handler_timeout = handler_timeout
        self.wait = wait
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.signals = signals
        self.counters = Counters()
        self._chunk = min(_MOST_PER_REQUEST, max(batch, concurrency))
        self._holdings = Holdings(client, self._chunk)
        self._queue: asyncio.Queue[Held | None] = asyncio.Queue()
        self._acks: asyncio.Queue[Held | None] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when room for prefetching may have opened
        self._unstarted = 0  # messages received and not started, and receives in flight
        self._stop_asked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: errors.LingerError | None = None

    @property
    def stopping(self) -> bool:
        return self._stop_asked

    def stop(self) -> None:
        """Stop gracefully; safe to call from any thread (and from a signal handler)."""
        self._stop_asked = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._begin_stop()
        else:
            loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        self._stopping.set()
        self._room.set()

    async def run(self) -> Counters:
        """Run until stopped; the counters. Raises the error of a receive that cannot
        succeed (400, 401, 403, 404) after stopping."""
        if self._loop is not None:
            raise RuntimeError("a Consumer runs once")
        self._loop = asyncio.get_running_loop()
        if self._stop_asked:
            self._begin_stop()
        with self._signal_handlers():
            keeper = asyncio.create_task(self._holdings.keep())
            acker = asyncio.create_task(self._acknowledge())
            workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
            count = max(1, self.concurrency // self.batch)
            fetchers = [asyncio.create_task(self._fetch()) for _ in range(count)]
            try:
                await self._stopping.wait()
            finally:
                await self._shutdown(fetchers, workers, acker, keeper)
        if self._fatal is not None:
            raise self._fatal
        return self.counters

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        installed = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.stop)
                installed[signum] = previous
        try:
            yield
        finally:
            for signum, previous in installed.items():
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    async def _shutdown(
        self,
        fetchers: list[asyncio.Task[None]],
        workers: list[asyncio.Task[None]],
        acker: asyncio.Task[None],
        keeper: asyncio.Task[None],
    ) -> None:
        """Receives end (or are cut off after STOP_GRACE), what was not started is
        released, running handlers finish and their messages are acknowledged."""
        self._begin_stop()
        _done, pending = await asyncio.wait(fetchers, timeout=STOP_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)
        unstarted: list[Held] = []
        while not self._queue.empty():
            held = self._queue.get_nowait()
            if held is not None:
                unstarted.append(held)
        self._unstarted = 0
        await self._release_unstarted(unstarted)
        for _ in workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*workers, return_exceptions=True)
        self._acks.put_nowait(None)
        await asyncio.gather(acker, return_exceptions=True)
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)

    # Receiving

    async def _fetch(self) -> None:
        failures = 0
        while True:
            while self._unstarted >= self.concurrency and not self._stopping.is_set():
                self._room.clear()
                await self._room.wait()
            if self._stopping.is_set():
                return
            self._unstarted += self.batch
            try:
                received = await self._receive()
            except _FATAL as error:
                logger.error("receiving from %s: %s: stopping", self.channel, error)
                self._fatal = error
                self.stop()
                return
            except errors.LingerError as error:
                failures += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2**failures))
                logger.warning("receiving from %s: %s; again in %.1f s", self.channel, error, delay)
                await self._pause(delay)
                continue
            finally:
                self._unstarted -= self.batch
            failures = 0
            self._hold(received)

    async def _receive(self) -> list[Message]:
        if self.batch == 1:
            message = await self.client.receive(self.channel, wait=self.wait)
            return [] if message is None else [message]
        return await self.client.receive_many(self.channel, self.batch, wait=self.wait)

    def _hold(self, received: list[Message]) -> None:
        for message in received:
            if message.lease is not None:
                self._unstarted += 1
                self._queue.put_nowait(self._holdings.hold(message))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _release_unstarted(self, unstarted: list[Held]) -> None:
        for start in range(0, len(unstarted), self._chunk):
            chunk = unstarted[start : start + self._chunk]
            try:
                outcome = await self.client.release_many([h.message for h in chunk])
            except errors.LingerError as error:
                logger.error("releasing %d messages not started: %s", len(chunk), error)
                continue
            finally:
                for held in chunk:
                    self._holdings.forget(held)
            released = set(outcome.done)
            for held in chunk:
                if held.message.id not in released:
                    self._lose(held, "released while stopping")

    # Handling

    async def _work(self) -> None:
        while True:
            held = await self._queue.get()
            if held is None:
                return
            self._unstarted -= 1
            self._room.set()
            if held.lost:
                self._holdings.forget(held)
                self._lose(held, "before it was started")
                continue
            await self._handle(held)

    async def _handle(self, held: Held) -> None:
        message = held.message
        timer = asyncio.timeout(self.handler_timeout)
        try:
            async with timer:
                await self.handler(message)
        except Reject as reason:
            logger.info("message %d rejected by the handler: %s", message.id, reason)
            await self._settle(held, "reject")
        except Exception as error:
            delay = self._retry_delay(message)
            if timer.expired():
                logger.warning(
                    "message %d: the handler ran past %g s: released for %d s",
                    message.id,
                    self.handler_timeout,
                    delay,
                )
            else:
                logger.warning(
                    "message %d (delivery %d): the handler failed: %r: released for %d s",
                    message.id,
                    message.delivered,
                    error,
                    delay,
                    exc_info=True,
                )
            await self._settle(held, "release", delay)
        else:
            self._acks.put_nowait(held)

    def _retry_delay(self, message: Message) -> int:
        seconds = self.retry_delay * 2.0 ** max(0, message.delivered - 1)
        return math.ceil(min(self.max_retry_delay, seconds))

    async def _settle(self, held: Held, verb: str, delay: int | None = None) -> None:
        try:
            if verb == "reject":
                await self.client.reject(held.message)
            else:
                await self.client.release(held.message, delay=delay)
        except _LOST as error:
            self._lose(held, str(error))
        except errors.LingerError as error:
            logger.error("message %d: %s failed: %s", held.message.id, verb, error)
            self.counters.lost += 1
        else:
            if verb == "reject":
                self.counters.rejected += 1
            else:
                self.counters.failed += 1
        finally:
            self._holdings.forget(held)

    def _lose(self, held: Held, reason: str) -> None:
        logger.warning(
            "message %d: lease lost (%s): not acknowledged", held.message.id, reason.strip(".")
        )
        self.counters.lost += 1

    # Acknowledging and extending

    async def _acknowledge(self) -> None:
        closing = False
        carried: list[Held] = []
        while not closing or carried:
            batch, carried = carried, []
            if not batch:
                first = await self._acks.get()
                if first is None:
                    return
                batch.append(first)
            while len(batch) < self._chunk and not self._acks.empty():
                held = self._acks.get_nowait()
                if held is None:
                    closing = True
                    break
                batch.append(held)
            ids: set[int] = set()
            for held in list(batch):  # one message twice (two leases): the next request
                if held.message.id in ids:
                    batch.remove(held)
                    carried.append(held)
                ids.add(held.message.id)
            await self._delete(batch)

    async def _delete(self, batch: list[Held]) -> None:
        try:
            outcome = await self.client.delete_many([held.message for held in batch])
        except errors.LingerError as error:
            logger.error("deleting %d handled messages: %s", len(batch), error)
            self.counters.lost += len(batch)
            return
        finally:
            for held in batch:
                self._holdings.forget(held)
        done = set(outcome.done)
        stale = set(outcome.stale)
        for held in batch:
            if held.message.id in done:
                self.counters.processed += 1
            else:
                self._lose(held, "Lease is stale." if held.lease in stale else "it is gone")
