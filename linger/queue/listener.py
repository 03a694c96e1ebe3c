"""Cross-process wake-ups on PostgreSQL: one LISTEN connection per process.

Every add and publish NOTIFYs ``<origin>:<channel>`` at commit (see ``store.sql.announced``). The
listener wakes a local waiter of that channel for each notification from another process.
A notification is only a hint: the woken waiter claims again, and the broker's poller
covers lost notifications and the time the listener is reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import sqlalchemy as sa

from linger.store.sql import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

_KEEPALIVE = 10.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0


def asyncpg_dsn(url: str | sa.URL) -> str:
    """A DSN for asyncpg from a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    parsed = sa.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class Listener:
    """Keeps one LISTEN connection open and calls ``wake(channel)`` per notification
    from another origin; ``on_connect`` runs after every (re)connection."""

    def __init__(
        self,
        url: str | sa.URL,
        origin: str,
        wake: Callable[[str], None],
        on_connect: Callable[[], None],
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._origin = origin
        self._wake = wake
        self._on_connect = on_connect
        self.connected = asyncio.Event()

    def _receive(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, channel = payload.partition(":")
        if origin != self._origin:
            self._wake(channel)

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, server_settings={"application_name": "linger-listener"}
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._receive)
            self.connected.set()
            logger.info("listening for notifications from other Linger processes")
            self._on_connect()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), _KEEPALIVE)
                except TimeoutError:
                    # Finds a connection that died without closing (network, failover).
                    await asyncio.wait_for(conn.execute("SELECT 1"), _KEEPALIVE)
        finally:
            self.connected.clear()
            conn.terminate()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with exponential backoff."""
        backoff = _BACKOFF_MIN
        while True:
            try:
                await self._listen_once()
                logger.warning("notification connection lost; reconnecting")
                backoff = _BACKOFF_MIN
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning(
                    "notification connection failed (%s); retrying in %.1f s", error, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
