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
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiohttp import web

from linger import __version__
from linger.auth.scopes import Grant
from linger.http import access
from linger.http.keys import LISTENER, SERVER_ID, SETTINGS, STARTED, broker_of
from linger.store import dashboard
from linger.store.records import Depth

ASSETS_DIR = Path(__file__).parent / "ui"
PAGE = "index.html"
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# Read once: only these names are ever served, so no path can reach another file.
ASSETS: dict[str, tuple[bytes, str]] = {
    path.name: (path.read_bytes(), _TYPES[path.suffix])
    for path in sorted(ASSETS_DIR.iterdir())
    if path.suffix in _TYPES
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
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
        raise web.HTTPNotFound()
    return _asset(name)


async def get_overview(request: web.Request) -> web.Response:
    """Every channel (up to ``--metrics-channels``) with its counts and dead-letter links,
    the topics with each subscription's options, and this process; names filtered as
    the listings are, counts shown where the token may read."""
    settings = request.app[SETTINGS]
    storage = broker_of(request).storage
    limit = settings.metrics_channels
    depths, names, subscriptions, links = await asyncio.gather(
        storage.overview.depths(limit),
        storage.overview.list_channels(),
        dashboard.list_subscriptions(storage.driver, SUBSCRIPTIONS_SHOWN + 1),
        dashboard.dead_links(storage.driver, limit),
    )
    truncated = len(subscriptions) > SUBSCRIPTIONS_SHOWN
    subscriptions = subscriptions[:SUBSCRIPTIONS_SHOWN]
    links |= {(s.channel, s.options.dead) for s in subscriptions if s.options.dead}
    known = {*names, *(d.channel for d in depths)}
    mentioned = {name for link in links for name in link}
    listed = set(await access.listed(request, sorted(known | mentioned)))
    grant: Grant | None = request.get(access.GRANT)
    return web.json_response(
        {
            "server": _server(request, grant),
            "scopes": None if grant is None else _scopes(grant),
            "channels": _channels(
                depths, known & listed, listed, links, grant, storage.now(), limit
            ),
            "channels_total": len(known & listed),
            "topics": _topics(subscriptions, listed, grant),
            "subscriptions_truncated": truncated,
        }
    )


def _server(request: web.Request, grant: Grant | None) -> dict[str, Any]:
    app, settings, broker = request.app, request.app[SETTINGS], broker_of(request)
    everything = grant is None or grant.allows_everything("read")
    return {
        "id": app[SERVER_ID],
        "version": __version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "uptime": int(time.time() - app[STARTED]),
        # Server-wide figures name no channel but count them all: read:* only.
        "database": settings.db_display if everything else None,
        "waiters": broker.notifier.asleep() if everything else None,
        "counters": {name: broker.counters[name] for name in COUNTERS} if everything else None,
        "listener": app[LISTENER].connected.is_set() if LISTENER in app else None,
        "auth": settings.auth,
    }


def _scopes(grant: Grant) -> dict[str, list[str]]:
    """The token's own patterns by action (admin's included), so that the page offers
    only what the token may do; the server still checks every request."""
    return {action: list(grant.patterns(action).globs) for action in SCOPED_ACTIONS}


def _channels(
    depths: list[Depth],
    channels: set[str],
    listed: set[str],
    links: set[tuple[str, str]],
    grant: Grant | None,
    now: int,
    limit: int,
) -> list[dict[str, Any]]:
    """Rows of ``channels`` (the deepest first when there are too many), by name."""
    feeds: dict[str, set[str]] = defaultdict(set)
    fed_by: dict[str, set[str]] = defaultdict(set)
    for channel, dead in links:
        feeds[channel].add(dead)
        fed_by[dead].add(channel)
    by_name = {d.channel: d for d in depths}
    # Past the deepest ``limit`` channels the counts are not read: shown as unknown.
    complete = len(depths) < limit
    shown = sorted(channels, key=lambda name: (name not in by_name, name))[:limit]
    rows = []
    for name in sorted(shown):
        readable = grant is None or grant.allows("read", name)
        rows.append(
            {
                "name": name,
                **_counts(by_name.get(name), complete and readable, now, readable),
                "dead_from": sorted(fed_by[name] & listed),
                "dead_to": sorted(feeds[name] & listed),
            }
        )
    return rows


_COUNTS = ("ready", "hidden", "delayed", "oldest_ready_age")


def _counts(depth: Depth | None, empty: bool, now: int, readable: bool) -> dict[str, int | None]:
    """A channel's counts: its depth's; zeros when it has none and every channel with
    messages was read (``empty``); else unknown (None), as when it may not be read."""
    if depth is None or not readable:
        return dict.fromkeys(_COUNTS, 0 if empty else None)
    oldest = depth.oldest_ready
    age = 0 if oldest is None else max(0, now - oldest) // 1000
    return dict(zip(_COUNTS, (depth.ready, depth.hidden, depth.delayed, age), strict=True))


def _topics(
    subscriptions: list[dashboard.Subscription], listed: set[str], grant: Grant | None
) -> list[dict[str, Any]]:
    topics: dict[str, list[dict[str, Any]]] = {}
    for sub in subscriptions:
        if grant is not None and not grant.allows("read", sub.topic):
            continue
        entries = topics.setdefault(sub.topic, [])
        if sub.channel not in listed:
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
                "dead": options.dead if options.dead in listed else None,
            }
        )
    return [{"name": name, "subscriptions": subs} for name, subs in topics.items()]
