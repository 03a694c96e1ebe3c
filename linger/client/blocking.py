"""``Client``: the blocking client. It runs the one ``AsyncClient`` on an event loop in a
private thread, so both behave alike in every respect."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from linger.client.aio import AsyncClient
from linger.client.errors import ClientClosed
from linger.client.messages import Message
from linger.client.retry import Retry
from linger.client.transport import DEFAULT_URL
from linger.client.worker import LOOP_WAIT, Consumer, Counters

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """The blocking twin of an ``AsyncClient`` method: same arguments, same result."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__qualname__ = f"Client.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _in_thread(handler: Callable[[Message], object]) -> Callable[[Message], Any]:
    """``handler`` run in a thread of its own for each message, awaited by the loop (a
    handler that never returns keeps its thread, not the loop)."""

    async def run(message: Message) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def target() -> None:
            error: BaseException | None = RuntimeError("the handler's thread ended abruptly")
            try:
                handler(message)
                error = None
            except Exception as raised:
                error = raised
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone
                    loop.call_soon_threadsafe(_settle, future, error)

        threading.Thread(target=target, name=f"linger-handler-{message.id}", daemon=True).start()
        await future

    return run


class BlockingConsumer:
    """A worker loop run from blocking code: ``run()`` blocks until it stops; ``stop()``
    may be called from any thread."""

    def __init__(self, client: Client, consumer: Consumer, signals: bool) -> None:
        self._client = client
        self._consumer = consumer
        self._signals = signals

    @property
    def counters(self) -> Counters:
        return self._consumer.counters

    def stop(self) -> None:
        self._consumer.stop()

    def run(self) -> Counters:
        with self._signal_handlers():
            return self._client._run(self._consumer.run())

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if not self._signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for signum in previous:
            signal.signal(signum, lambda *_: self._consumer.stop())
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class Client:
    """A blocking client of one Linger server: ``with Client(url, token=...) as linger``.
    The same methods, arguments, results, errors and retries as ``AsyncClient``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: Retry | None = None,
        connections: int = 100,
    ) -> None:
        self._client = AsyncClient(
            url, token=token, timeout=timeout, retry=retry, connections=connections
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="linger-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()
        self._calls: set[concurrent.futures.Future[Any]] = set()

    @property
    def url(self) -> str:
        return self._client.url

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coroutine.close()
            raise ClientClosed("The client is closed.")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a blocking Client cannot be called from its own handlers")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        with self._lock:
            self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise ClientClosed("The client was closed during the call.") from None
            raise
        except BaseException:
            future.cancel()  # interrupted (KeyboardInterrupt): the request is abandoned
            with contextlib.suppress(concurrent.futures.CancelledError, Exception):
                future.result(timeout=1)
            raise
        finally:
            with self._lock:
                self._calls.discard(future)

    def close(self) -> None:
        """Close the client: calls still under way in other threads raise ClientClosed
        there, and so does every later call."""
        if self._closed:
            return
        closing = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
        self._closed = True
        try:
            closing.result()
        finally:
            with self._lock:
                pending = list(self._calls)
            for future in pending:  # calls that were not requests (a worker loop's run)
                future.cancel()
            for future in pending:
                with contextlib.suppress(BaseException):
                    future.result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    info = _blocking(AsyncClient.info)
    add = _blocking(AsyncClient.add)
    add_many = _blocking(AsyncClient.add_many)
    receive = _blocking(AsyncClient.receive)
    receive_many = _blocking(AsyncClient.receive_many)
    peek = _blocking(AsyncClient.peek)
    delete = _blocking(AsyncClient.delete)
    touch = _blocking(AsyncClient.touch)
    release = _blocking(AsyncClient.release)
    reject = _blocking(AsyncClient.reject)
    delete_many = _blocking(AsyncClient.delete_many)
    delete_ids = _blocking(AsyncClient.delete_ids)
    touch_many = _blocking(AsyncClient.touch_many)
    release_many = _blocking(AsyncClient.release_many)
    reject_many = _blocking(AsyncClient.reject_many)
    publish = _blocking(AsyncClient.publish)
    publish_many = _blocking(AsyncClient.publish_many)
    subscribe = _blocking(AsyncClient.subscribe)
    unsubscribe = _blocking(AsyncClient.unsubscribe)
    redrive = _blocking(AsyncClient.redrive)
    drain = _blocking(AsyncClient.drain)
    channel_stats = _blocking(AsyncClient.channel_stats)
    channel_detail = _blocking(AsyncClient.channel_detail)
    channels = _blocking(AsyncClient.channels)
    topics = _blocking(AsyncClient.topics)
    channel_topics = _blocking(AsyncClient.channel_topics)
    topic_channels = _blocking(AsyncClient.topic_channels)
    stats = _blocking(AsyncClient.stats)
    health = _blocking(AsyncClient.health)
    ready = _blocking(AsyncClient.ready)
    metrics = _blocking(AsyncClient.metrics)

    def consumer(
        self,
        channel: str,
        handler: Callable[[Message], object],
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = LOOP_WAIT,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
    ) -> BlockingConsumer:
        """A worker loop over ``channel`` whose ``handler`` is a plain function (each call
        runs in a thread of its own); see ``Consumer`` for the options. A thread cannot be
        cancelled: a handler past ``handler_timeout`` is logged, and its message stays
        leased (extended) and its place taken until the call returns; the message is then
        deleted or released by what the call did."""
        consumer = Consumer(
            self._client,
            channel,
            _in_thread(handler),
            concurrency=concurrency,
            batch=batch,
            handler_timeout=handler_timeout,
            wait=wait,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            signals=False,
            cancellable=False,
        )
        return BlockingConsumer(self, consumer, signals)

    def consume(
        self,
        channel: str,
        handler: Callable[[Message], object],
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = LOOP_WAIT,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
    ) -> Counters:
        """Run a worker loop until it is stopped (SIGTERM, SIGINT); what it did."""
        return self.consumer(
            channel,
            handler,
            concurrency=concurrency,
            batch=batch,
            handler_timeout=handler_timeout,
            wait=wait,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            signals=signals,
        ).run()
