"""A byte budget shared by the requests of a process: what their bodies may hold at once."""

from __future__ import annotations

import asyncio
from collections import deque

# Batches of the largest size (--max-batch-bytes) read at once: the memory they may hold.
BUDGET_BATCHES = 4


class Budget:
    """Bytes that the batch bodies being read may hold together; taken in order of
    request (first come, first served), given back when the batch is done."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> None:
        if not self._waiting and size <= self._free:
            self._free -= size
            return
        future = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiting.append(entry)
        try:
            await future
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif future.done() and not future.cancelled():
                self.give(size)  # granted just as it was cancelled
            raise

    def give(self, size: int) -> None:
        self._free += size
        while self._waiting and self._waiting[0][0] <= self._free:
            size, future = self._waiting.popleft()
            if not future.done():
                self._free -= size
                future.set_result(None)
