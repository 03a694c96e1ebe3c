"""Storage: the operations on messages and topics and the overview reads, over one
driver whose write groups settle a ``Tally``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from linger.store.batches import Batches
from linger.store.deadletters import DeadLetters
from linger.store.driver import Driver
from linger.store.leases import Leases
from linger.store.ledger import LedgerStatements, Tally
from linger.store.messages import Messages
from linger.store.overview import Overview
from linger.store.sweep import Sweeper
from linger.store.tokens import Tokens
from linger.store.topics import Topics


class Storage:
    """Every storage operation of one process; times come from ``clock`` (epoch s), and
    ``origin`` tags this process's PostgreSQL notifications."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float], origin: str = "") -> None:
        self.driver: Driver[Tally] = Driver(engine)
        self._clock = clock
        self.origin = origin
        self.driver.ledger = partial(Tally, LedgerStatements(self.driver), self.now)
        self.messages = Messages(self.driver, self.now, origin)
        self.leases = Leases(self.driver, self.now, origin)
        self.batches = Batches(self.driver, self.now, origin)
        self.dead_letters = DeadLetters(self.driver, self.now, origin)
        self.sweeper = Sweeper(self.driver, self.now, origin)
        self.topics = Topics(self.driver, self.now, origin)
        self.overview = Overview(self.driver, self.now)
        self.tokens = Tokens(self.driver, self.now)

    def now(self) -> int:
        """The clock in integer milliseconds."""
        return int(self._clock() * 1000)

    async def close(self) -> None:
        """Wait for the writes already submitted."""
        await self.driver.close()
