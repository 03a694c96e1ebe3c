"""The dashboard: its page and static assets (shipped in ``linger/http/ui/``), and the one
JSON read the page needs that no other route gives, ``GET /overview``.

The page and its assets need no token (the page asks for one); everything it shows it
reads with that token through the API, so ``--auth`` scopes apply unchanged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from linger import __version__
from linger.auth.scopes import LISTED, Grant, Patterns
from linger.http import access
from linger.http.keys import LISTENER, SERVER_ID, SETTINGS, STARTED, broker_of
from linger.http.metrics import SCRAPE_TIMEOUT
from linger.http.responses import error_response
from linger.store import dashboard
from linger.store.records import Depth

PAGE = "index.html"
# Read once: only these names are ever served, so no path can reach another file. They
# are the files access.OPEN_PATHS opens, by the same rule (access.UI_TYPES).
ASSETS: dict[str, tuple[bytes, str]] = {
    path.name: (path.read_bytes(), access.UI_TYPES[path.suffix]) for path in access.ui_files()
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# Subscriptions the overview lists at most.
SUBSCRIPTIONS_SHOWN = 1000
# The process counters the page turns into rates and totals.
# The overview's reads are shared for this long by every tab and client of a process.
OVERVIEW_TTL = 1.0
# An overview not read by then is a 503 (Retry-After), as /metrics gives up on a scrape.
OVERVIEW_TIMEOUT = SCRAPE_TIMEOUT
# Names filtered or sorted on the event loop; more are in a thread.
_ON_LOOP = 1000
# Scoped tokens whose subscriptions are kept (each its own statement, once a second).
_SCOPED_KEPT = 64
COUNTERS = ("msg-add", "delivered", "msg-delete", "msg-dead", "msg-redriven", "publish")
SCOPED_ACTIONS = ("read", "consume", "manage", "produce")


def _asset(name: str) -> web.Response:
    body, content_type = ASSETS[name]
    return web.Response(
        body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS
    )


async def get_ui(request: web.Request) -> web.Response:
    """The dashboard page."""
    return _asset(PAGE)


async def get_ui_asset(request: web.Request) -> web.Response:
    """A static asset of the page (``/ui/`` itself is the page)."""
    name = request.match_info["asset"] or PAGE
    if name not in ASSETS:
        return error_response(404, "Not Found", SECURITY_HEADERS)
    return _asset(name)


async def get_overview(request: web.Request) -> web.Response:
    """Every channel (the deepest ``--metrics-channels`` of them at most) with its counts
    and dead-letter links, the topics with each subscription's options, and this process.
    The reads are shared by every request for ``OVERVIEW_TTL`` seconds (one at a time, in
    turn); each token's view of them is filtered afterwards: names as the listings show
    them, every detail of a channel only where the token may read it."""
    grant: Grant | None = request.get(access.GRANT)
    cache = request.app[OVERVIEW]
    try:
        async with asyncio.timeout(OVERVIEW_TIMEOUT):
            snapshot = await cache.snapshot(request)
            subscriptions: Sequence[dashboard.Subscription] = snapshot.subscriptions
            truncated = snapshot.truncated
            topics = _listed_patterns(grant)
            if topics is not None:
                subscriptions, truncated = await cache.scoped(request, topics)
    except TimeoutError:
        return error_response(503, "The overview took too long to read.", {"Retry-After": "1"})
    view = partial(_view, snapshot, subscriptions, grant)
    large = len(snapshot.names) > _ON_LOOP or len(subscriptions) > _ON_LOOP
    channels, total, topic_rows = await asyncio.to_thread(view) if large else view()
    return web.json_response(
        {
            "server": _server(request, grant),
            "scopes": None if grant is None else _scopes(grant),
            "channels": channels,
            "channels_total": total,
            "topics": topic_rows,
            "subscriptions_truncated": truncated,
        }
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the overview read, for every token alike."""

    at: float  # monotonic seconds
    now: int  # the storage clock, for ages
    depths: dict[str, Depth]  # the deepest ``limit`` channels
    complete: bool  # every channel with messages is in ``depths``
    names: tuple[str, ...]  # every channel known, sorted
    feeds: dict[str, frozenset[str]]  # channel -> its dead channels
    fed_by: dict[str, frozenset[str]]  # dead channel -> the channels it takes from
    subscriptions: tuple[dashboard.Subscription, ...]
    truncated: bool
    limit: int


class OverviewCache:
    """One process's overview reads: at most one in flight, reused for ``OVERVIEW_TTL``."""

    def __init__(self) -> None:
        self.current: Snapshot | None = None
        self.pending: asyncio.Task[Snapshot] | None = None
        # A scoped token's subscriptions, by its listed patterns (at most _SCOPED_KEPT, the
        # least recently read dropped first), the reads under way, and a lock that makes
        # them one at a time (as the snapshot's reads are).
        self.by_scope: OrderedDict[tuple[str, ...], _Scoped] = OrderedDict()
        self.scoped_pending: dict[tuple[str, ...], asyncio.Task[_Scoped]] = {}
        self.scoped_lock = asyncio.Lock()

    async def snapshot(self, request: web.Request) -> Snapshot:
        current = self.current
        if current is not None and time.monotonic() - current.at < OVERVIEW_TTL:
            return current
        if self.pending is None:
            self.pending = asyncio.create_task(_read(request))
            self.pending.add_done_callback(self._done)
        return await asyncio.shield(self.pending)

    def _done(self, task: asyncio.Task[Snapshot]) -> None:
        self.pending = None
        if not task.cancelled() and task.exception() is None:
            self.current = task.result()

    def _fresh(self, key: tuple[str, ...]) -> _Scoped | None:
        kept = self.by_scope.get(key)
        return kept if kept is not None and time.monotonic() - kept[0] < OVERVIEW_TTL else None

    async def scoped(
        self, request: web.Request, topics: Patterns
    ) -> tuple[list[dashboard.Subscription], bool]:
        """The first subscriptions of the topics ``topics`` match: filtered in the
        statement, before its limit, so a token sees its own however many others. One
        read per set of patterns and ``OVERVIEW_TTL``, whatever the requests."""
        key = topics.globs
        kept = self._fresh(key)
        if kept is None:
            task = self.scoped_pending.get(key)
            if task is None:
                task = asyncio.create_task(self._read_scoped(request, topics))
                self.scoped_pending[key] = task
                task.add_done_callback(lambda _done: self.scoped_pending.pop(key, None))
            kept = await asyncio.shield(task)
        return kept[1], kept[2]

    async def _read_scoped(self, request: web.Request, topics: Patterns) -> _Scoped:
        async with self.scoped_lock:
            key = topics.globs
            kept = self._fresh(key)
            if kept is not None:
                return kept
            driver = broker_of(request).storage.driver
            rows = await dashboard.list_subscriptions(driver, SUBSCRIPTIONS_SHOWN + 1, topics)
            kept = (time.monotonic(), rows[:SUBSCRIPTIONS_SHOWN], len(rows) > SUBSCRIPTIONS_SHOWN)
            self.by_scope[key] = kept
            self.by_scope.move_to_end(key)
            while len(self.by_scope) > _SCOPED_KEPT:
                self.by_scope.popitem(last=False)
            return kept


# The overview reads of one app (process), shared by its clients.
OVERVIEW = web.AppKey("overview", OverviewCache)

# When a scoped token's subscriptions were read, the first of them, and whether more.
_Scoped = tuple[float, list["dashboard.Subscription"], bool]


async def _read(request: web.Request) -> Snapshot:
    """The overview's reads, one after the other (one pooled connection at a time)."""
    storage = broker_of(request).storage
    limit = request.app[SETTINGS].metrics_channels
    depths = await storage.overview.depths(limit)
    names = await storage.overview.list_channels()
    subscriptions = await dashboard.list_subscriptions(storage.driver, SUBSCRIPTIONS_SHOWN + 1)
    links = await dashboard.dead_links(storage.driver, limit)
    build = partial(_snapshot, storage.now(), depths, names, subscriptions, links, limit)
    return await asyncio.to_thread(build) if len(names) > _ON_LOOP else build()


def _snapshot(
    now: int,
    depths: list[Depth],
    names: list[str],
    subscriptions: list[dashboard.Subscription],
    links: set[tuple[str, str]],
    limit: int,
) -> Snapshot:
    truncated = len(subscriptions) > SUBSCRIPTIONS_SHOWN
    subscriptions = subscriptions[:SUBSCRIPTIONS_SHOWN]
    links |= {(s.channel, s.options.dead) for s in subscriptions if s.options.dead}
    feeds: dict[str, set[str]] = defaultdict(set)
    fed_by: dict[str, set[str]] = defaultdict(set)
    for channel, dead in links:
        feeds[channel].add(dead)
        fed_by[dead].add(channel)
    known = {*names, *(d.channel for d in depths)}
    return Snapshot(
        at=time.monotonic(),
        now=now,
        depths={d.channel: d for d in depths},
        complete=len(depths) < limit,
        names=tuple(sorted(known)),
        feeds={name: frozenset(dead) for name, dead in feeds.items()},
        fed_by={name: frozenset(origins) for name, origins in fed_by.items()},
        subscriptions=tuple(subscriptions),
        truncated=truncated,
        limit=limit,
    )


def _listed_patterns(grant: Grant | None) -> Patterns | None:
    """The patterns of the names a listing shows the token; None: every name."""
    if grant is None or grant.lists_everything:
        return None
    globs = (g for action in LISTED for g in grant.patterns(action).globs)
    return Patterns(tuple(dict.fromkeys(globs)))


def _view(
    snapshot: Snapshot,
    subscriptions: Iterable[dashboard.Subscription],
    grant: Grant | None,
) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]]]:
    """The token's rows: channels, how many it may see, topics."""

    def lists(name: str) -> bool:
        return grant is None or grant.lists(name)

    def reads(name: str) -> bool:
        return grant is None or grant.allows("read", name)

    listed = [name for name in snapshot.names if lists(name)]
    # The deepest first when there are too many (past them the counts are not read).
    shown = [name for name in listed if name in snapshot.depths][: snapshot.limit]
    if len(shown) < snapshot.limit:
        shown += [n for n in listed if n not in snapshot.depths][: snapshot.limit - len(shown)]
    rows = []
    for name in sorted(shown):
        readable = reads(name)
        rows.append(
            {
                "name": name,
                **_counts(snapshot.depths.get(name), snapshot, readable),
                # Which channel's messages die where: the channel's own detail, and the
                # other end's name only where the token may read that one too.
                "dead_from": sorted(filter(reads, snapshot.fed_by.get(name, ())))
                if readable
                else [],
                "dead_to": sorted(filter(reads, snapshot.feeds.get(name, ()))) if readable else [],
            }
        )
    return rows, len(listed), _topics(subscriptions, lists, reads)


def _server(request: web.Request, grant: Grant | None) -> dict[str, Any]:
    app, settings, broker = request.app, request.app[SETTINGS], broker_of(request)
    everything = grant is None or grant.allows_everything("read")
    return {
        "id": app[SERVER_ID],
        "version": __version__,
        "hostname": socket.gethostname(),
        # Process details and server-wide figures name no channel but concern them all:
        # read:* only, as /stats.
        "pid": os.getpid() if everything else None,
        "uptime": int(time.time() - app[STARTED]) if everything else None,
        "database": settings.db_display if everything else None,
        "waiters": broker.notifier.asleep() if everything else None,
        "counters": {name: broker.counters[name] for name in COUNTERS} if everything else None,
        "listener": app[LISTENER].connected.is_set() if everything and LISTENER in app else None,
        "auth": settings.auth,
    }


def _scopes(grant: Grant) -> dict[str, list[str]]:
    """The token's own patterns by action (admin's included), so that the page offers
    only what the token may do; the server still checks every request."""
    return {action: list(grant.patterns(action).globs) for action in SCOPED_ACTIONS}


_COUNTS = ("ready", "hidden", "delayed", "oldest_ready_age")


def _counts(depth: Depth | None, snapshot: Snapshot, readable: bool) -> dict[str, int | None]:
    """A channel's counts: its depth's; zeros when it has none and every channel with
    messages was read; else unknown (None), as when the token may not read it."""
    if not readable:
        return dict.fromkeys(_COUNTS, None)
    if depth is None:
        return dict.fromkeys(_COUNTS, 0 if snapshot.complete else None)
    oldest = depth.oldest_ready
    age = 0 if oldest is None else max(0, snapshot.now - oldest) // 1000
    return dict(zip(_COUNTS, (depth.ready, depth.hidden, depth.delayed, age), strict=True))


def _topics(
    subscriptions: Iterable[dashboard.Subscription],
    lists: Callable[[str], bool],
    reads: Callable[[str], bool],
) -> list[dict[str, Any]]:
    """Topics as ``/topics`` lists them (the token may read, consume or produce the
    topic); under each, the subscriptions of channels the token may read, with their
    options (a dead channel named only where it may read that one too)."""
    topics: dict[str, list[dict[str, Any]]] = {}
    for sub in subscriptions:
        if not lists(sub.topic):
            continue
        entries = topics.setdefault(sub.topic, [])
        if not reads(sub.channel):
            continue
        options = sub.options
        entries.append(
            {
                "channel": sub.channel,
                "priority": options.priority,
                "timeout": options.timeout,
                "deliver": options.deliver,
                "linger": options.linger,
                "delay": options.delay,
                "dead": options.dead if options.dead and reads(options.dead) else None,
            }
        )
    return [{"name": name, "subscriptions": subs} for name, subs in topics.items()]
