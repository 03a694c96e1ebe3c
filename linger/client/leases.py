"""The leases a worker loop holds: each delivery it received and has not acknowledged yet,
extended in the background at half its visibility timeout until it is let go."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from linger.client import errors
from linger.client.messages import Acknowledged, Message

if TYPE_CHECKING:
    from linger.client.aio import AsyncClient

logger = logging.getLogger(__name__)


# The server's answer to a batch larger than its --max-batch.
TOO_MANY = "Too many items."


class Chunks:
    """Batch acknowledgements cut to a size the server takes. The server does not say
    its --max-batch: it starts at ``size``, and a 400 ``Too many items.`` halves it for
    this request and every later one."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)

    async def send(
        self, call: Callable[[list[Message]], Awaitable[Acknowledged]], messages: list[Message]
    ) -> Acknowledged:
        """``call`` on ``messages``, ``size`` at a time; their outcomes together. Any
        other error is raised (a 400 is not worth trying again)."""
        done: list[int] = []
        stale: list[str] = []
        missing: list[str | int] = []
        start = 0
        while start < len(messages):
            piece = messages[start : start + self.size]
            try:
                outcome = await call(piece)
            except errors.BadRequest as error:
                if error.text != TOO_MANY or len(piece) == 1:
                    raise
                self.size = max(1, len(piece) // 2)
                logger.info(
                    "the server takes fewer than %d items a batch: %d", len(piece), self.size
                )
                continue
            done += outcome.done
            stale += outcome.stale
            missing += outcome.missing
            start += len(piece)
        return Acknowledged(done=done, stale=stale, missing=missing)


@dataclass(eq=False)
class Held:
    """A delivery the loop holds: when its lease is next extended (loop time), and
    whether the server said it is no longer the loop's."""

    message: Message
    due: float
    lost: bool = False

    @property
    def lease(self) -> str:
        assert self.message.lease is not None
        return self.message.lease


class Holdings:
    """The held deliveries, by lease; ``keep()`` extends them, in ``chunks``."""

    def __init__(self, client: AsyncClient, chunks: Chunks) -> None:
        self.client = client
        self.chunks = chunks
        self._held: dict[str, Held] = {}
        self._latest: dict[int, str] = {}  # each held message's latest lease, by id
        self._changed = asyncio.Event()

    def hold(self, message: Message) -> Held:
        now = asyncio.get_running_loop().time()
        held = Held(message, now + message.timeout / 2)
        earlier = self._held.get(self._latest.get(message.id, ""))
        if earlier is not None:  # delivered to this loop again: the earlier lease is stale
            earlier.lost = True
        self._held[held.lease] = held
        self._latest[message.id] = held.lease
        self._changed.set()
        return held

    def forget(self, held: Held) -> None:
        self._held.pop(held.lease, None)
        if self._latest.get(held.message.id) == held.lease:
            del self._latest[held.message.id]

    async def keep(self) -> None:
        """Extend every held lease at half its visibility timeout; those due within a
        quarter of theirs go in the same request. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            live = [h for h in self._held.values() if not h.lost]
            if any(h.due <= now for h in live):
                due = [h for h in live if h.due - h.message.timeout / 4 <= now]
                await self._extend(due)
            upcoming = [h.due for h in self._held.values() if not h.lost]
            sleep = max(0.01, min(upcoming, default=now + 1.0) - loop.time())
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), sleep)

    async def _extend(self, due: list[Held]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcome = await self.chunks.send(self.client.touch_many, [h.message for h in due])
        except errors.BadRequest as error:  # refused as invalid: trying again cannot help
            logger.error("extending %d leases: %s: they are let go", len(due), error)
            for held in due:
                held.lost = True
            return
        except errors.LingerError as error:
            logger.warning("extending %d leases: %s", len(due), error)
            for held in due:
                held.due = loop.time() + 0.5
            return
        done = set(outcome.done)
        now = loop.time()
        for held in due:
            if held.lease not in self._held:
                continue  # acknowledged meanwhile
            if held.message.id in done:
                held.due = now + held.message.timeout / 2
            else:
                held.lost = True
                logger.warning(
                    "message %d: its lease could not be extended (someone else may have it)",
                    held.message.id,
                )
