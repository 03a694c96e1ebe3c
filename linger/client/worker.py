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
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from linger.client import errors
from linger.client.leases import Chunks, Held, Holdings
from linger.client.messages import Message

if TYPE_CHECKING:
    from linger.client.aio import AsyncClient

logger = logging.getLogger(__name__)

# Seconds each long-poll of a loop lasts by default: a stop waits for the long-polls under
# way (what they bring is released), so this bounds how long a stop takes.
LOOP_WAIT = 5.0
# A long-poll without ``wait`` lasts the server's --poll-max, which the client cannot know.
_UNKNOWN_WAIT = 3600.0
# Errors of a receive that trying again cannot cure: the loop stops and raises them.
_FATAL = (errors.BadRequest, errors.Unauthenticated, errors.NotAllowed, errors.NotFound)
# Errors that mean the lease is no longer this loop's: nothing is acknowledged.
T = TypeVar("T")
_LOST = (errors.Conflict, errors.NotFound)
# Failures that pass (a restart, a network blip): an acknowledgement is tried again, its
# lease still extended meanwhile, until it is done, the lease is refused, or the loop
# has been stopping for ACK_GRACE seconds.
_TRANSIENT = (errors.ServerError, errors.ConnectionFailed)
ACK_GRACE = 10.0
_ACK_RETRY_MAX = 5.0
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
    longer than ``handler_timeout``: cancelled and released (a handler that cannot be
    cancelled, ``cancellable=False``, as the blocking client's threads: logged, its
    message kept leased and its place among the ``concurrency`` taken until it returns;
    then settled by what it did). A handler that raises CancelledError of its own (the loop
    was not cancelled) has failed: released. While the loop holds a message its lease is
    extended at half its visibility timeout; an action whose lease was lost (409) is logged
    at WARNING and counted as lost, never retried with another lease. The loop receives no
    more than it has free handlers for (``batch`` at most), so little waits unstarted.
    ``stop()`` (or SIGTERM / SIGINT when ``signals`` and run in the main thread) waits for
    the receives under way, releases what they brought (a release counts as a delivery on
    the server) and lets running handlers finish. ``wait``: seconds each long-poll may last
    (None, or when the server's --poll-max is shorter: --poll-max), which bounds how long
    a stop may take."""

    def __init__(
        self,
        client: AsyncClient,
        channel: str,
        handler: Callable[[Message], Awaitable[object]],
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = LOOP_WAIT,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
        cancellable: bool = True,
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
        self.cancellable = cancellable
        self.counters = Counters()
        # Acknowledgements and extensions, as many a request as the server takes.
        self._chunks = Chunks(min(_MOST_PER_REQUEST, max(batch, concurrency)))
        self._holdings = Holdings(client, self._chunks)
        self._wait = wait  # None once the server said it holds long-polls less long
        self._receive_size = min(_MOST_PER_REQUEST, batch)  # halved on "Invalid batch size."
        self._queue: asyncio.Queue[Held | None] = asyncio.Queue()
        self._acks: asyncio.Queue[Held | None] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when a handler's place may have been freed
        self._taken = 0  # places of receives in flight, messages queued, handlers running
        self._stop_asked = False
        # When acknowledgements stop being tried again, once the loop is stopping.
        self._gave_up_at: float | None = None
        self._left: list[Held] = []  # taken from the queue by workers as the loop stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: BaseException | None = None

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
        """Run until stopped; the counters. Raises, after stopping, the error of a receive
        that cannot succeed (400, 401, 403, 404), or of a part of the loop that crashed
        (logged at ERROR as it happened)."""
        if self._loop is not None:
            raise RuntimeError("a Consumer runs once")
        self._loop = asyncio.get_running_loop()
        if self._stop_asked:
            self._begin_stop()
        with self._signal_handlers():
            keeper = self._task(self._holdings.keep(), "extending leases")
            acker = self._task(self._acknowledge(), "acknowledging")
            workers = [self._task(self._work(), "a worker") for _ in range(self.concurrency)]
            # No more receivers than the client has connections for long-polls: one waiting
            # for a connection would hold up a stop for nothing.
            count = min(max(1, self.concurrency // self.batch), self.client.connections)
            fetchers = [self._task(self._fetch(), "receiving") for _ in range(count)]
            try:
                await self._stopping.wait()
            finally:
                await self._shutdown(fetchers, workers, acker, keeper)
        if self._fatal is not None:
            raise self._fatal
        return self.counters

    def _task(self, work: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        """A task of the loop; should it crash, the crash is logged and stops the loop,
        which raises it."""

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            logger.error("%s crashed: %r: stopping", what, error, exc_info=error)
            if self._fatal is None:
                self._fatal = error
            self.stop()

        task = asyncio.create_task(work)
        task.add_done_callback(ended)
        return task

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
        """Receives under way end (within their request's time), what was not started is
        released, running handlers finish and their messages are acknowledged."""
        self._begin_stop()
        bound = self.client.timeout + (_UNKNOWN_WAIT if self.wait is None else self.wait)
        _done, pending = await asyncio.wait(fetchers, timeout=bound + 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)
        unstarted, self._left = self._left, []
        while not self._queue.empty():
            held = self._queue.get_nowait()
            if held is not None:
                unstarted.append(held)
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
        least = max(1, min(self.batch, self.concurrency) // 2)
        while True:
            while self.concurrency - self._taken < least and not self._stopping.is_set():
                self._room.clear()
                await self._room.wait()
            if self._stopping.is_set():
                return
            n = min(self._receive_size, self.concurrency - self._taken)
            self._taken += n
            try:
                received = await self._receive(n)
            except errors.BadRequest as error:
                if error.text == "Invalid wait." and self._wait is not None:
                    logger.info(
                        "the server's --poll-max is below %g s: long-polls last it", self._wait
                    )
                    self._wait = None
                    continue
                if error.text == "Invalid batch size." and n > 1:
                    self._receive_size = max(1, min(self._receive_size, n // 2))
                    logger.info(
                        "the server takes fewer than %d a receive: %d", n, self._receive_size
                    )
                    continue
                self._fail(error)
                return
            except _FATAL as error:
                self._fail(error)
                return
            except errors.LingerError as error:
                failures += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2**failures))
                logger.warning("receiving from %s: %s; again in %.1f s", self.channel, error, delay)
                await self._pause(delay)
                continue
            finally:
                self._taken -= n
                self._room.set()
            failures = 0
            self._hold(received)

    def _fail(self, error: errors.LingerError) -> None:
        logger.error("receiving from %s: %s: stopping", self.channel, error)
        self._fatal = error
        self.stop()

    async def _receive(self, n: int) -> list[Message]:
        if n == 1:
            message = await self.client.receive(self.channel, wait=self._wait)
            return [] if message is None else [message]
        return await self.client.receive_many(self.channel, n, wait=self._wait)

    def _hold(self, received: list[Message]) -> None:
        for message in received:
            if message.lease is None:
                logger.error(
                    "message %d was delivered without a lease (is %s a Linger server of "
                    "this version?): not handled, it comes back after its timeout",
                    message.id,
                    self.client.url,
                )
                continue
            self._taken += 1
            self._queue.put_nowait(self._holdings.hold(message))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _release_unstarted(self, unstarted: list[Held]) -> None:
        if not unstarted:
            return
        try:
            outcome = await self._chunks.send(
                self.client.release_many, [h.message for h in unstarted]
            )
        except errors.LingerError as error:
            logger.error("releasing %d messages not started: %s", len(unstarted), error)
            return
        finally:
            for held in unstarted:
                self._holdings.forget(held)
            self._taken -= len(unstarted)
        released = set(outcome.done)
        for held in unstarted:
            if held.message.id not in released:
                self._lose(held, "released while stopping")

    # Handling

    async def _work(self) -> None:
        while True:
            held = await self._queue.get()
            if held is None:
                return
            if self._stopping.is_set():  # received as the loop stops: released
                self._left.append(held)
                continue
            try:
                if held.lost:
                    self._holdings.forget(held)
                    self._lose(held, "before it was started")
                else:
                    await self._handle(held)
            finally:
                self._taken -= 1
                self._room.set()

    async def _handle(self, held: Held) -> None:
        message = held.message
        timer = asyncio.timeout(self.handler_timeout if self.cancellable else None)
        try:
            async with timer:
                if self.cancellable:
                    await self.handler(message)
                else:
                    await self._uncancellable(message)
        except Reject as reason:
            logger.info("message %d rejected by the handler: %s", message.id, reason)
            await self._settle(held, "reject")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the loop itself is cancelled
            delay = self._retry_delay(message)
            logger.warning(
                "message %d (delivery %d): the handler raised CancelledError (the loop did "
                "not cancel it): released for %d s",
                message.id,
                message.delivered,
                delay,
                exc_info=True,
            )
            await self._settle(held, "release", delay)
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

    async def _uncancellable(self, message: Message) -> None:
        """The handler, waited for to its end even past ``handler_timeout`` (its message
        stays held, its lease extended): a thread cannot be stopped."""
        call = asyncio.ensure_future(self.handler(message))
        try:
            done, _ = await asyncio.wait({call}, timeout=self.handler_timeout)
            if not done:
                logger.warning(
                    "message %d: the handler runs past %g s and cannot be cancelled: its "
                    "lease is kept until it returns",
                    message.id,
                    self.handler_timeout,
                )
        except asyncio.CancelledError:
            call.cancel()
            raise
        await call

    def _retry_delay(self, message: Message) -> int:
        seconds = self.retry_delay * 2.0 ** max(0, message.delivered - 1)
        return math.ceil(min(self.max_retry_delay, seconds))

    async def _persisting(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again after transient failures (its leases stay held and
        extended meanwhile) until it succeeds, fails otherwise, or the loop has been
        stopping for ``ACK_GRACE`` seconds."""
        loop = asyncio.get_running_loop()
        delay = 0.2
        while True:
            try:
                return await call()
            except _TRANSIENT as error:
                if self._stop_asked:
                    if self._gave_up_at is None:
                        self._gave_up_at = loop.time() + ACK_GRACE
                    if loop.time() >= self._gave_up_at:
                        raise
                logger.warning("%s: %s; again in %.1f s", what, error, delay)
                await asyncio.sleep(delay)
                delay = min(_ACK_RETRY_MAX, delay * 2)

    async def _settle(self, held: Held, verb: str, delay: int | None = None) -> None:
        try:
            if verb == "reject":
                await self._persisting(
                    f"rejecting message {held.message.id}",
                    lambda: self.client.reject(held.message),
                )
            else:
                await self._persisting(
                    f"releasing message {held.message.id}",
                    lambda: self.client.release(held.message, delay=delay),
                )
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
            while len(batch) < self._chunks.size and not self._acks.empty():
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
        messages = [held.message for held in batch]
        try:
            outcome = await self._persisting(
                f"deleting {len(batch)} handled messages",
                lambda: self._chunks.send(self.client.delete_many, messages),
            )
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
