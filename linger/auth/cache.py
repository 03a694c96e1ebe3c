"""The per-process cache of token lookups, and the budget of failures per client.

A token found is trusted for ``FRESH_FOR`` seconds, then looked up again: a revoked token
stops working in every process within that time (the database is the only truth, and no
process has to be told). Its expiry is checked on every request. The tokens of requests
that wait (long-polls) are looked up again as they go stale, and such a request stops
claiming once its token no longer holds. A secret that matched no
token is remembered as unknown for as long. Concurrent requests with the same uncached
secret share one lookup.

Failures cost no more than a cache lookup once a client has failed often: each client
(see ``linger.http.access``) has a bucket of ``FAILURE_BURST`` failures that refills at
``FAILURE_RATE`` a second. While it is empty, a secret from that client that was never
found is refused without a database lookup, and its failures are not logged (one line
says so). A token found before keeps working from that client (and is looked up again
when its entry is stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from linger import errors
from linger.auth.scopes import Grant
from linger.auth.tokens import Token, digest, well_formed

FRESH_FOR = 2.0
FAILURE_BURST = 10
FAILURE_RATE = 1.0
# Entries kept at most: secrets found, secrets unknown, clients that failed.
_KNOWN = 10_000
_UNKNOWN = 10_000
_CLIENTS = 10_000

THROTTLED = (
    "too many failures: this client's next ones are refused without a lookup, unlogged, "
    "until it slows down"
)
K = TypeVar("K")
V = TypeVar("V")
Lookup = Callable[[bytes], Awaitable[Token | None]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a presented secret comes to: a grant, or the reason there is none (and the
    token's id when the secret was one's). ``logged``: whether to log this failure."""

    grant: Grant | None
    token: Token | None = None
    reason: str = ""
    logged: bool = True
    key: bytes = b""  # the secret's digest


@dataclass(slots=True)
class _Entry:
    token: Token
    grant: Grant
    fetched: float


class _Bucket:
    __slots__ = ("level", "since", "warned")

    def __init__(self, now: float) -> None:
        self.level = float(FAILURE_BURST)
        self.since = now
        self.warned = False

    def refill(self, now: float) -> None:
        self.level = min(float(FAILURE_BURST), self.level + (now - self.since) * FAILURE_RATE)
        self.since = now


class Authenticator:
    """Turns presented secrets into grants; ``now_ms`` is the clock of expiries."""

    def __init__(
        self,
        lookup: Lookup,
        now_ms: Callable[[], int],
        *,
        fresh_for: float = FRESH_FOR,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._now_ms = now_ms
        self._fresh_for = fresh_for
        self._monotonic = monotonic
        self._known: OrderedDict[bytes, _Entry] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[Token | None]] = {}
        self._clients: OrderedDict[str, _Bucket] = OrderedDict()
        self._used: dict[int, int] = {}
        self._held: Counter[bytes] = Counter()
        self.lookups = 0

    async def verdict(self, secret: str | None, client: str) -> Verdict:
        """The grant of ``secret`` presented by ``client``, or why there is none."""
        if secret is None:
            return self._failed(client, "no token")
        if not well_formed(secret):
            return self._failed(client, "malformed token")
        key = digest(secret)
        now = self._monotonic()
        entry = self._known.get(key)
        if entry is None or now - entry.fetched >= self._fresh_for:
            if self._is_unknown(key, now):
                return self._failed(client, "unknown token")
            # A token seen before is always looked up again; a new secret only within
            # the client's failure budget.
            if entry is None and not self._may_look_up(client, now):
                return self._failed(client, "unknown token")
            entry = await self._fetch(key)
            if entry is None:
                return self._failed(client, "unknown token")
        token, grant = entry.token, entry.grant
        now_ms = self._now_ms()
        if token.revoked_at is not None:
            return self._failed(client, "revoked token", token)
        if token.expires_at is not None and now_ms >= token.expires_at:
            return self._failed(client, "expired token", token)
        self._used[token.id] = now_ms
        return Verdict(grant, token, key=key)

    @contextlib.contextmanager
    def holding(self, key: bytes) -> Iterator[Callable[[], bool]]:
        """While a request waits (a long-poll), keep its token's entry fresh (``run``
        looks it up again as it goes stale) and give a check of whether it still
        holds: a long-poll whose token was revoked or expired meanwhile claims nothing."""
        self._held[key] += 1
        try:
            yield partial(self._holds, key)
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    def cached(self, key: bytes) -> Token | None:
        """The token cached for digest ``key`` as last looked up (nothing is refreshed)."""
        entry = self._known.get(key)
        return None if entry is None else entry.token

    def _holds(self, key: bytes) -> bool:
        entry = self._known.get(key)
        return entry is not None and entry.token.valid_at(self._now_ms())

    async def run(self) -> None:
        """Keep the entries of the tokens that waiting requests hold fresh."""
        while True:
            await asyncio.sleep(self._fresh_for / 2)
            now = self._monotonic()
            for key in list(self._held):
                entry = self._known.get(key)
                if entry is None or now - entry.fetched >= self._fresh_for / 2:
                    try:
                        if await self._fetch(key) is None:  # gone from the database
                            self._known.pop(key, None)
                    except errors.Unavailable:
                        break  # the last verdicts stand until the database answers

    def take_used(self) -> dict[int, int]:
        """When each token was last used since the previous call (for ``last_used_at``)."""
        used, self._used = self._used, {}
        return used

    def _is_unknown(self, key: bytes, now: float) -> bool:
        since = self._unknown.get(key)
        if since is None:
            return False
        if now - since < self._fresh_for:
            return True
        del self._unknown[key]
        return False

    async def _fetch(self, key: bytes) -> _Entry | None:
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._pending[key] = pending
            try:
                self.lookups += 1
                pending.set_result(await self._lookup(key))
            except BaseException as error:
                pending.set_exception(error)
                pending.exception()  # retrieved: the waiters, if any, raise it too
                raise
            finally:
                del self._pending[key]
        token = await asyncio.shield(pending)
        now = self._monotonic()
        if token is None:
            _remember(self._unknown, key, now, _UNKNOWN)
            return None
        entry = _Entry(token, Grant(token.scopes), now)
        _remember(self._known, key, entry, _KNOWN)
        return entry

    def _bucket(self, client: str, now: float) -> _Bucket:
        bucket = self._clients.get(client)
        if bucket is None:
            bucket = _Bucket(now)
            _remember(self._clients, client, bucket, _CLIENTS)
        else:
            self._clients.move_to_end(client)
            bucket.refill(now)
        return bucket

    def _may_look_up(self, client: str, now: float) -> bool:
        bucket = self._clients.get(client)
        if bucket is None:
            return True
        bucket.refill(now)
        return bucket.level >= 1

    def _failed(self, client: str, reason: str, token: Token | None = None) -> Verdict:
        bucket = self._bucket(client, self._monotonic())
        if bucket.level >= 1:
            bucket.level -= 1
            bucket.warned = False
            return Verdict(None, token, reason)
        logged = not bucket.warned
        bucket.warned = True
        return Verdict(None, token, THROTTLED if logged else reason, logged)


def _remember(cache: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """Keep ``value`` under ``key`` as the newest entry, dropping the oldest past
    ``bound``."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > bound:
        cache.popitem(last=False)
