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

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import hdrs, web

from linger import errors
from linger.auth.cache import Authenticator
from linger.auth.scopes import Grant, Patterns
from linger.http import params
from linger.http.observe import client_address

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GUARD = web.AppKey("guard", Authenticator)
GRANT = web.RequestKey("grant", Grant)
OPEN = frozenset({"health", "ready"})


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


def failure_key(request: web.Request) -> str:
    """Whose failure budget a request spends: its peer, unless the peer is a proxy on
    loopback or a private network, whose own entry (the last of ``X-Forwarded-For``)
    names the client. The first entry is what the client claims, and free to vary."""
    peer = request.remote or "-"
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and _is_proxy(peer):
        return forwarded.rsplit(",", 1)[-1].strip() or peer
    return peer


def _is_proxy(peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer == "-"  # a Unix socket, or a test transport
    return address.is_loopback or address.is_private


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``--auth``, a request goes on only with a token whose scopes cover it."""
    guard = request.app.get(GUARD)
    route = request.match_info.route.name
    if guard is None or route in OPEN:
        return await handler(request)
    verdict = await guard.verdict(bearer(request), failure_key(request))
    if verdict.grant is None:
        if verdict.logged:
            logger.info(
                "authentication failed: %s%s, client %s",
                verdict.reason,
                f" (token {verdict.token.id})" if verdict.token else "",
                client_address(request),
            )
        raise errors.Unauthenticated()
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
                client_address(request),
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


def listed(request: web.Request, names: list[str]) -> list[str]:
    """The names of a listing that this request's token may act on."""
    grant: Grant | None = request.get(GRANT)
    return names if grant is None else [name for name in names if grant.lists(name)]
