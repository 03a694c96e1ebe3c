"""Each request's id, latency metrics and access log line.

The id is the client's ``X-Request-Id`` when it is a sane token (what nginx's
``$request_id`` or a client library sends), else a new one; it is echoed in the
response, set in ``linger.logs.REQUEST_ID`` for everything logged while the request is
served, and carried by its access log line. Every response also says ``Server: Linger``,
without a version.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from linger.http.keys import METRICS
from linger.http.responses import SERVER
from linger.logs import REQUEST_ID

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADER = "X-Request-Id"
_ID = web.RequestKey("request_id", str)
_TOKEN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Methods a route may have; anything else is counted as "other" (bounded labels).
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


# A made id: this process's random prefix and a counter (32 hex digits, as a uuid4's): unique
# across processes (drawn again in each forked worker) and restarts, without drawing
# randomness for every request.
_prefix = secrets.token_hex(8)
_counter = itertools.count(1)


def _new_prefix() -> None:
    global _prefix, _counter
    _prefix, _counter = secrets.token_hex(8), itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix)


def _new_id() -> str:
    return f"{_prefix}{next(_counter):016x}"


def request_id(request: BaseRequest) -> str:
    """The id of ``request`` (made on first use)."""
    current = request.get(_ID)
    if current is None:
        given = request.headers.get(HEADER, "")
        current = given if _TOKEN.fullmatch(given) else _new_id()
        request[_ID] = current
    return current


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: times every request (errors included) by route, method and status."""
    token = REQUEST_ID.set(request_id(request))
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        # The client closed the request (nginx's code for it): the connection was reset
        # while the handler read it, or lost and the handler cancelled.
        status = 499
        raise
    finally:
        REQUEST_ID.reset(token)
        route = request.match_info.route.name if request.match_info.route else None
        method = request.method if request.method in _METHODS else "other"
        request.app[METRICS].observe_request(
            route or "other", method, status, time.perf_counter() - started
        )


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed ones and those of ``Expect``
    handlers (which no middleware sees) too, names its request and says ``Server: Linger``
    (aiohttp's default names Python's and aiohttp's versions), and forbids sniffing."""
    headers = response.headers
    headers[HEADER] = request_id(request)
    headers[hdrs.SERVER] = SERVER
    # No response is to be read as anything but the type it says it is.
    headers[hdrs.X_CONTENT_TYPE_OPTIONS] = "nosniff"


def client_address(request: BaseRequest) -> str:
    """The client as the proxy in front saw it (the first ``X-Forwarded-For`` entry),
    else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    first = forwarded.split(",", 1)[0].strip()
    return first or request.remote or "-"


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, method, path, status, duration, request id (as
    fields of the JSON format, and in the text)."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        client = client_address(request)
        self.logger.info(
            '%s (peer %s) "%s %s" %d %.1f ms',
            client,
            request.remote or "-",
            request.method,
            request.path_qs,
            response.status,
            time * 1000,
            extra={
                "request_id": request_id(request),
                "method": request.method,
                "path": request.path_qs,
                "status": response.status,
                "duration": round(time, 6),
                "client": client,
            },
        )
