"""Errors as JSON responses: domain errors mapped to status codes, and aiohttp's own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from linger import errors
from linger.http import bodies, params, server
from linger.http.responses import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: dict[type[errors.LingerError], int] = {
    errors.InvalidParameter: 400,
    errors.Unauthenticated: 401,
    errors.NotAllowed: 403,
    errors.NotFound: 404,
    errors.NotHidden: 409,
    errors.LeaseStale: 409,
    errors.MessageTooLarge: 413,
    errors.UnsupportedEncoding: 415,
    errors.UnsupportedMediaType: 415,
    errors.RequestTimeout: 408,
    errors.Unavailable: 503,
    errors.DatabaseError: 500,
    errors.ChannelFull: 507,
    errors.StorageFull: 507,
    errors.Overloaded: 503,
}
# Errors after which the rest of the request is not read: the connection closes.
_CLOSING = (errors.MessageTooLarge, errors.UnsupportedEncoding, errors.RequestTimeout)


def _status(error: errors.LingerError) -> int:
    return next(code for cls, code in _STATUS.items() if isinstance(error, cls))


def _headers(error: errors.LingerError) -> dict[str, str] | None:
    if isinstance(error, errors.Unavailable | errors.Overloaded):
        return {"Retry-After": "1"}
    if isinstance(error, errors.Unauthenticated):
        return {"WWW-Authenticate": 'Bearer realm="linger"'}
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors and aiohttp's own HTTP errors become JSON error responses."""
    if not params.path_allowed(request.rel_url.raw_path):
        return server.finish(request, error_response(404, "Not Found"))
    try:
        bodies.check_encoding(request)
        return server.finish(request, await handler(request))
    except errors.LingerError as error:
        headers = _headers(error)
        response = error_response(_status(error), str(error), headers)
        if isinstance(error, _CLOSING):
            response.force_close()
        if isinstance(error, errors.RequestTimeout):
            server.abandon(request)
        return server.finish(request, response)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return server.finish(request, error_response(error.status, error.reason, allow))
