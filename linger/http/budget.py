"""A byte budget shared by the requests of a process: what their bodies may hold at once."""

from __future__ import annotations

import asyncio
from collections import deque

# Batches of the largest size (--max-batch-bytes) read at once: the memory they may hold.
BUDGET_BATCHES = 4


class Share:
    """What one batch body holds of a ``Budget``: the bytes it has read so far."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.held = 0
        # Waiting for room, or was when its wait was cut short (its deadline passed).
        self.waiting = False

    async def take(self, size: int) -> None:
        """Count ``size`` more bytes read; wait while the budget is spent."""
        await self._budget._take(self, size)

    def close(self) -> None:
        """The batch is done: everything it held goes back."""
        self._budget._close(self)


class Budget:
    """Bytes that the batch bodies being read may hold together.

    A body takes bytes as they arrive, not what it declares: a client that announces a
    large body and sends nothing holds nothing (four such clients held every batch of a
    process up for their whole body timeout when a body took its declared length first;
    room taken for each chunk before reading it, tried next, let a thousand do the same).
    A chunk read while the budget is spent is held by its body until the body has room
    for it.
    A body that finds the budget spent waits, first come first served, unless it is the
    oldest body being read: that one always goes on, so that the bodies under way always
    finish (none can wait for bytes that another waiting one holds). At most the budget
    and one more batch are held at once."""

    def __init__(self, total: int) -> None:
        self._free = total
        # Open shares in order of arrival (a dict keeps it), and those waiting for room.
        self._open: dict[Share, None] = {}
        self._waiting: deque[tuple[Share, int, asyncio.Future[None]]] = deque()

    def open(self) -> Share:
        share = Share(self)
        self._open[share] = None
        return share

    def _oldest(self) -> Share | None:
        return next(iter(self._open), None)

    async def _take(self, share: Share, size: int) -> None:
        if (not self._waiting and size <= self._free) or share is self._oldest():
            self._free -= size
            share.held += size
            return
        future = asyncio.get_running_loop().create_future()
        entry = (share, size, future)
        self._waiting.append(entry)
        share.waiting = True  # still true if the wait is cut short
        try:
            await future  # granted: counted in share.held, given back when it closes
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._grant()  # those it kept waiting behind it may fit
            raise
        share.waiting = False

    def _close(self, share: Share) -> None:
        self._open.pop(share, None)
        self._free += share.held
        share.held = 0
        self._grant()

    def _grant(self) -> None:
        oldest = self._oldest()
        for entry in self._waiting:
            if entry[0] is oldest:  # the oldest never waits
                self._waiting.remove(entry)
                self._give(entry)
                break
        while self._waiting and self._waiting[0][1] <= self._free:
            self._give(self._waiting.popleft())

    def _give(self, entry: tuple[Share, int, asyncio.Future[None]]) -> None:
        share, size, future = entry
        if not future.done():
            self._free -= size
            share.held += size
            future.set_result(None)
