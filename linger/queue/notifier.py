"""In-process wake-ups for long-polling consumers, oldest waiter first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType


class Waiter:
    """One waiting consumer; ``alive`` says whether its client is still connected."""

    __slots__ = ("alive", "event")

    def __init__(self, alive: Callable[[], bool]) -> None:
        self.event = asyncio.Event()
        self.alive = alive


class _Sleeping:
    """``Notifier.sleeping``: counts the waiters inside it."""

    __slots__ = ("_notifier",)

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def __enter__(self) -> None:
        self._notifier._asleep += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._notifier._asleep -= 1


class Notifier:
    """Maps each channel to its waiters in arrival order."""

    def __init__(self) -> None:
        self._waiters: dict[str, dict[Waiter, None]] = {}
        self._count = 0
        self._asleep = 0
        self._sleeping = _Sleeping(self)
        self.closed = False

    def notify(self, channel: str, count: int = 1) -> None:
        """Wake the ``count`` oldest waiters of ``channel`` that are not awake yet."""
        for waiter in self._waiters.get(channel, ()):
            if count <= 0:
                return
            if not waiter.event.is_set():
                waiter.event.set()
                count -= 1

    def awake(self, channel: str, count: int) -> None:
        """Make sure the ``count`` oldest waiters of ``channel`` are awake: ``count``
        messages are ready there (a level, where ``notify`` is an edge: a waiter already
        awake, about to claim, counts, and no younger one is woken to race it)."""
        for waiter in self._waiters.get(channel, ()):
            if count <= 0:
                return
            waiter.event.set()
            count -= 1

    def channels(self) -> dict[str, int]:
        """Channels with waiters, and how many wait on each."""
        return {channel: len(waiters) for channel, waiters in self._waiters.items()}

    def prune(self) -> None:
        """Wake the waiters whose client has gone, so that they leave."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.alive():
                    waiter.event.set()

    def count(self) -> int:
        """Waiters registered now, kept as they come and go (no walk over channels)."""
        return self._count

    def asleep(self) -> int:
        """Waiters asleep now: registered, and not claiming."""
        return self._asleep

    def sleeping(self) -> _Sleeping:
        """A registered waiter sleeps for the duration of the block. One object serves
        every waiter (it holds no state of its own): a long-poll keeps what it enters
        for its whole wait, and ten thousand of them should not keep ten thousand."""
        return self._sleeping

    @asynccontextmanager
    async def waiter(self, channel: str, alive: Callable[[], bool]) -> AsyncIterator[Waiter]:
        """Register a waiter for the duration of the block; a wake-up it received but did
        not use (its event still set on exit) passes on to the next waiter."""
        waiter = Waiter(alive)
        if self.closed:
            waiter.event.set()
        self._waiters.setdefault(channel, {})[waiter] = None
        self._count += 1
        try:
            yield waiter
        finally:
            self._count -= 1
            waiters = self._waiters[channel]
            del waiters[waiter]
            if not waiters:
                del self._waiters[channel]
            elif waiter.event.is_set() and not self.closed:
                self.notify(channel)

    def close(self) -> None:
        """Wake every waiter for good (shutdown)."""
        self.closed = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()
