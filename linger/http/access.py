"""Access control at the HTTP edge (``--auth``): who presents which token, and whether
its scopes cover the route and the names in it.

Every route but ``/health`` and ``/ready`` needs ``Authorization: Bearer <secret>``. What
each route needs is the table ``RULES``: an action on the channel and/or topic of its
path; an action on every name (``/stats``, ``/metrics``: they show every channel); or
only a valid token (the welcome, the OpenAPI document, and the listings, which show the
names the token may act on). Routes that act on messages by id or lease pass the token's
``consume`` patterns down to the statement that acts, which matches the message's
channel itself (``scope``). A name an option gives (``dead``, a redrive's ``to``) needs
``produce`` on it (``require``): a message must not reach, by dying or by a redrive, a
channel its sender could not add to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from linger import errors
from linger.auth.cache import Authenticator, Verdict
from linger.auth.scopes import Grant, Patterns
from linger.http import params

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GUARD = web.AppKey("guard", Authenticator)
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple)
GRANT = web.RequestKey("grant", Grant)
VERDICT = web.RequestKey("verdict", Verdict)
# The dashboard's assets (linger/http/ui.py serves these files and no other), by suffix.
UI_DIR = Path(__file__).parent / "ui"
UI_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}


def ui_files() -> list[Path]:
    """The dashboard's asset files, by name."""
    return [path for path in sorted(UI_DIR.iterdir()) if path.suffix in UI_TYPES]


# Open to anyone, whatever the method (a HEAD is 405, not 401). The dashboard's page and
# every asset it is served with too (derived from the files: a new one needs no token):
# the page asks for a token and reads with it.
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/ui", "/ui/"} | {f"/ui/{path.name}" for path in ui_files()}
)
# Names a listing filters on the event loop; more are filtered in a thread.
_LISTED_ON_LOOP = 1000


@dataclass(frozen=True, slots=True)
class Rule:
    """What a route needs: ``action`` on the names of its path (``names``: each one's
    kind and path segment), on every name (``everywhere``), or nothing but a valid token
    (``action`` None)."""

    action: str | None = None
    names: tuple[tuple[str, int], ...] = ()
    everywhere: bool = False


_CHANNEL = (("channel", 2),)  # /channels/<c>...
_TOPIC = (("topic", 2),)  # /topics/<t>...
_SUBSCRIPTION = (("channel", 2), ("topic", 4))  # /channels/<c>/topics/<t>
_TOKEN = Rule()
_CONSUME_BY_ID = Rule("consume")  # checked against the message's channel, in the statement
RULES: dict[str, Rule] = {
    "root": _TOKEN,
    "openapi": _TOKEN,
    "channels": _TOKEN,
    "topics": _TOKEN,
    # The dashboard's overview: like the listings, names the token may read, consume or
    # produce; counts only where it may read, server-wide figures with read:* only.
    "overview": _TOKEN,
    "post_message": Rule("produce", _CHANNEL),
    "post_messages": Rule("produce", _CHANNEL),
    "get_message": Rule("consume", _CHANNEL),
    "get_messages": Rule("consume", _CHANNEL),
    "peek": Rule("consume", _CHANNEL),
    "delete_channel": Rule("manage", _CHANNEL),
    "redrive": Rule("manage", _CHANNEL),
    "put_subscription": Rule("manage", _SUBSCRIPTION),
    "delete_subscription": Rule("manage", _SUBSCRIPTION),
    "channel_stats": Rule("read", _CHANNEL),
    "channel_topics": Rule("read", _CHANNEL),
    "publish": Rule("produce", _TOPIC),
    "publish_messages": Rule("produce", _TOPIC),
    "topic_channels": Rule("read", _TOPIC),
    "stats": Rule("read", everywhere=True),
    "metrics": Rule("read", everywhere=True),
    **dict.fromkeys(
        (
            "delete_message",
            "touch_message",
            "release_message",
            "reject_message",
            "delete_messages",
            "touch_messages",
            "release_messages",
            "reject_messages",
        ),
        _CONSUME_BY_ID,
    ),
}


def bearer(request: web.Request) -> str | None:
    """The secret of an ``Authorization: Bearer`` header; None when there is none (no
    header, another scheme, or no secret after the scheme)."""
    value = request.headers.get(hdrs.AUTHORIZATION)
    if value is None:
        return None
    scheme, _space, secret = value.strip().partition(" ")
    secret = secret.strip()
    return secret if scheme.lower() == "bearer" and secret else None


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def networks(text: str) -> Networks:
    """The networks of ``--trusted-proxies``."""
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()
    )


def client(request: web.Request, trusted: Networks) -> str:
    """Who sent a request: its peer, unless the peer is a trusted proxy, in which case
    the hop before it in ``X-Forwarded-For`` (every line of it, read from the right),
    and so on past every trusted proxy. Entries left of the first untrusted hop are what
    a client claims, and free to vary: they never count."""
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    current = request.remote or "-"
    while hops and _trusted(current, trusted):
        try:
            current = str(ipaddress.ip_address(hops.pop()))
        except ValueError:
            break  # not an address: the trusted proxy's own peer is as far as it goes
    return current


def budget_key(address: str) -> str:
    """The failure budget an address spends: an IPv6 client has a /64 to itself."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if parsed.version == 6 and parsed.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def _trusted(hop: str, trusted: Networks) -> bool:
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return hop == "-"  # a Unix socket, or a test transport: the proxy is local
    return any(address in network for network in trusted)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``--auth``, a request goes on only with a token whose scopes cover it."""
    guard = request.app.get(GUARD)
    if guard is None or request.path in OPEN_PATHS:
        return await handler(request)
    route = request.match_info.route.name
    sender = client(request, request.app[TRUSTED_PROXIES])
    verdict = await guard.verdict(bearer(request), budget_key(sender))
    if verdict.grant is None:
        if verdict.logged:
            logger.info(
                "authentication failed: %s%s, client %s",
                verdict.reason,
                f" (token {verdict.token.id})" if verdict.token else "",
                sender,
            )
        raise errors.Unauthenticated()
    request[VERDICT] = verdict
    grant = request[GRANT] = verdict.grant
    rule = RULES.get(route or "")
    if rule is not None and rule.action is not None:
        if rule.everywhere:
            allowed = grant.allows_everything(rule.action)
        elif not rule.names:  # by id: the statement checks, unless nothing could pass
            allowed = not grant.patterns(rule.action).nothing
        else:
            names = (params.name(request, segment, kind) for kind, segment in rule.names)
            allowed = all(grant.allows(rule.action, name) for name in names)
        if not allowed:
            assert verdict.token is not None
            logger.info(
                "not allowed: token %d, %s %s, client %s",
                verdict.token.id,
                request.method,
                request.rel_url.raw_path,
                sender,
            )
            raise errors.NotAllowed()
    return await handler(request)


def scope(request: web.Request, action: str) -> Patterns | None:
    """The patterns that limit ``action`` for this request's token; None when nothing
    limits it (no ``--auth``, or a token allowed it everywhere)."""
    grant: Grant | None = request.get(GRANT)
    if grant is None or grant.allows_everything(action):
        return None
    return grant.patterns(action)


def require(request: web.Request, action: str, names: Iterable[str | None]) -> None:
    """``NotAllowed`` unless this request's token may ``action`` on every name given."""
    grant: Grant | None = request.get(GRANT)
    if grant is not None and not all(n is None or grant.allows(action, n) for n in names):
        raise errors.NotAllowed()


def lasting(
    request: web.Request, alive: Callable[[], bool]
) -> contextlib.AbstractContextManager[Callable[[], bool]]:
    """``alive`` (the client is still there) and, with ``--auth``, the request's token
    still valid: a long-poll that outlives its token's revocation or expiry claims
    nothing. Without ``--auth``, ``alive`` as it is, at no cost to the request."""
    guard = request.app.get(GUARD)
    verdict: Verdict | None = request.get(VERDICT)
    if guard is None or verdict is None:
        return contextlib.nullcontext(alive)
    return _holding(guard, verdict.key, alive)


@contextlib.contextmanager
def _holding(
    guard: Authenticator, key: bytes, alive: Callable[[], bool]
) -> Iterator[Callable[[], bool]]:
    with guard.holding(key) as holds:
        yield lambda: alive() and holds()


async def listed(request: web.Request, names: list[str]) -> list[str]:
    """The names of a listing (or of a response) that this request's token may read,
    consume or produce; a long list is filtered off the event loop."""
    grant: Grant | None = request.get(GRANT)
    if grant is None or grant.lists_everything:
        return names
    if len(names) <= _LISTED_ON_LOOP:
        return [name for name in names if grant.lists(name)]
    return await asyncio.to_thread(lambda: [name for name in names if grant.lists(name)])


async def shown(request: web.Request, ids: dict[str, int]) -> dict[str, int]:
    """A publish's ids of each channel's copy, for the channels the token may see."""
    if request.get(GRANT) is None:
        return ids
    return {name: ids[name] for name in await listed(request, list(ids))}
