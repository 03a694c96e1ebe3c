"""Cross-process wake-ups on PostgreSQL: one LISTEN connection per process.

Every add and publish NOTIFYs ``<origin>:<channel>`` at commit, a batch
``<origin>/<count>:<channel>`` (see ``store.sql.announced``). The listener wakes that many
local waiters of the channel for each notification from another process. A notification
is only a hint: the woken waiter claims again, and the broker's poller covers lost
notifications and the time the listener is reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from linger import errors
from linger.store.driver import listen
from linger.store.sql import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

_KEEPALIVE = 10.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0


class Listener:
    """Keeps one LISTEN connection open and calls ``wake(channel, count)`` per
    notification from another origin; ``on_connect`` runs after every (re)connection."""

    def __init__(
        self,
        engine: AsyncEngine,
        origin: str,
        wake: Callable[[str, int], None],
        on_connect: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._origin = origin
        self._wake = wake
        self._on_connect = on_connect
        self.connected = asyncio.Event()

    def _receive(self, payload: str) -> None:
        tag, _, channel = payload.partition(":")
        origin, _, count = tag.partition("/")
        if origin != self._origin:
            self._wake(channel, int(count) if count.isdigit() else 1)

    async def _listen_once(self) -> None:
        async with listen(self._engine, NOTIFY_CHANNEL, self._receive, "linger-listener") as conn:
            try:
                self.connected.set()
                logger.info("listening for notifications from other Linger processes")
                self._on_connect()
                while not conn.lost.is_set():
                    try:
                        await asyncio.wait_for(conn.lost.wait(), _KEEPALIVE)
                    except TimeoutError:
                        await conn.ping()
            finally:
                self.connected.clear()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with exponential backoff."""
        backoff = _BACKOFF_MIN
        while True:
            try:
                await self._listen_once()
                logger.warning("notification connection lost; reconnecting")
                backoff = _BACKOFF_MIN
            except errors.Unavailable as error:
                logger.warning(
                    "notification connection failed (%s); retrying in %.1f s", error, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
