"""Handler of redrive: dead letters back to their channels."""

from __future__ import annotations

from aiohttp import web

from linger import errors
from linger.http import access, params
from linger.http.keys import broker_of

_INVALID_TARGET = "Invalid redrive target."


async def redrive(request: web.Request) -> web.Response:
    channel = params.channel(request)
    to = params.name_option(request, "to", _INVALID_TARGET)
    if to == channel:
        raise errors.InvalidParameter(_INVALID_TARGET)
    access.require(request, "produce", (to,))
    limit = None
    if "n" in request.query:
        limit = params.bounded(request.query["n"], 0, 1, params.INT64_MAX, "Invalid batch size.")
    # Back to their origins: only the dead letters whose origin the token may produce to.
    scope = access.scope(request, "produce") if to is None else None
    moved = await broker_of(request).redrive(channel, to, limit, scope)
    return web.json_response({"moved": moved})
