"""Connections: aiohttp's runner and protocol with Linger's limits, and a graceful stop.

What aiohttp leaves open, closed here: a request head that never completes (408 after
``--header-timeout``), more connections than file descriptors (503 beyond
``--max-connections``, before the process runs out), parser errors as plain text (JSON
here, like every other error), the version banner (``Server: Linger``), and a stop that
closes keep-alive connections under clients that are sending (a stopping process answers
every request it still gets with ``Connection: close`` and closes idle connections only
after a short grace).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from linger.config import Settings
from linger.http.keys import DRAINING, SETTINGS
from linger.http.observe import HEADER as REQUEST_ID_HEADER
from linger.http.observe import AccessLogger, request_id
from linger.http.responses import SERVER, error_response, header_value

logger = logging.getLogger(__name__)

# Idle keep-alive connections are closed after this long; above nginx's upstream
# keepalive_timeout (60 s), so that nginx, not Linger, closes them first.
KEEPALIVE_TIMEOUT = 75.0
# File descriptors kept free for the database, the listener and log files.
_RESERVED_FDS = 64
# A stopping process waits this long for idle connections to bring one more request.
_IDLE_GRACE = 1.0
_DRAIN_POLL = 0.02


def max_connections(settings: Settings) -> int:
    """``--max-connections``, or (0) what the open-files limit allows."""
    if settings.max_connections > 0:
        return settings.max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - _RESERVED_FDS)


def _raw_error(status: int, text: str) -> bytes:
    """A complete JSON error response, for a connection that has no request object."""
    body = json.dumps({"error": text}).encode()
    head = (
        f"HTTP/1.1 {status} {header_value(text)}\r\nServer: {SERVER}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass(slots=True)
class _Limits:
    max_connections: int
    header_timeout: float


class _Protocol(web.RequestHandler):
    """aiohttp's protocol, with a deadline on request heads, JSON errors and a count of
    the open connections kept by its server."""

    def __init__(self, manager: _Server, *, limits: _Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._counter = manager
        self._clock = manager.clock
        # When the head of a request began to arrive (None: no head is due); the server's
        # watchdog answers 408 to heads older than --header-timeout.
        self.head_since: float | None = None
        self.busy = False
        # Close right after the response, without reading the rest of the request.
        self.abandon = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counter.open_connections += 1
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._counter.open_connections -= 1
        self.head_since = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_since is None and not self.busy:
            self.head_since = self._clock()
        super().data_received(data)

    def request_started(self) -> None:
        self.busy = True
        self.head_since = None

    def log_access(
        self, request: BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        super().log_access(request, response, time)
        self.busy = False  # called once the response is written, logged or not
        if self.abandon:
            self.force_close()

    def head_expired(self) -> None:
        self.head_since = None
        if self.busy or self.transport is None:
            return
        self.transport.write(_raw_error(408, "Request head not received in time."))
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionResetError):
            # The client went away mid-request (an upload it aborted): its fault, and
            # nobody is left to answer. Not an error of the server.
            self.log_debug("client disconnected during the request: %s", exc)
            response = error_response(499, "Client closed the request.")
            response.force_close()
            return response
        super().handle_error(request, status, exc, message)  # logs, checks nothing was sent
        if status >= 500:
            text = "Internal server error."
        else:
            text = (message or HTTPStatus(status).phrase).split("\n", 1)[0][:200]
        response = error_response(status, text)
        response.headers["Server"] = SERVER
        # A request the parser refused has no app to prepare its response: name it here,
        # with the id its access line carries.
        response.headers[REQUEST_ID_HEADER] = request_id(request)
        response.force_close()
        return response


class _Refusal(web.RequestHandler):
    """Answers a connection beyond the cap with 503 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_raw_error(503, "Too many connections, try again later."))
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


class _Server(web.Server):
    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        limits: _Limits,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        # The server's own arguments; the rest are the protocol's.
        request_factory = kwargs.pop("request_factory")
        cancellation = kwargs.pop("handler_cancellation", False)
        super().__init__(
            _tracked(handler),
            request_factory=request_factory,
            handler_cancellation=cancellation,
            loop=loop,
            **kwargs,
        )
        self._protocol_loop = loop
        self._protocol_kwargs = kwargs
        self._limits = limits
        self.clock = loop.time
        self.open_connections = 0
        self._watchdog = loop.create_task(self._watch_heads())

    async def _watch_heads(self) -> None:
        """Answer 408 to request heads that take longer than the limit (a check of every
        connection a few times per limit, rather than a timer per request)."""
        timeout = self._limits.header_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            cutoff = self.clock() - timeout
            for connection in self.connections:
                if (
                    isinstance(connection, _Protocol)
                    and connection.head_since is not None
                    and connection.head_since < cutoff
                ):
                    connection.head_expired()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's signature
        self._watchdog.cancel()
        with suppress(asyncio.CancelledError):
            await self._watchdog
        await super().shutdown(timeout)

    def __call__(self) -> web.RequestHandler:
        if self.open_connections >= self._limits.max_connections:
            return _Refusal(self, loop=self._protocol_loop)
        return _Protocol(
            self, limits=self._limits, loop=self._protocol_loop, **self._protocol_kwargs
        )


def abandon(request: web.Request) -> None:
    """Close ``request``'s connection as soon as its response is sent, without reading
    what is left of the request (a client too slow to finish it)."""
    if isinstance(request.protocol, _Protocol):
        request.protocol.abandon = True


def _tracked(
    handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The app's handler, noting that a request started, with aiohttp's HTTP errors that
    no middleware saw as JSON errors: those of an ``Expect`` handler, which runs before the
    middlewares (aiohttp's default answers an expectation other than ``100-continue`` with
    a text/plain 417)."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        if isinstance(request.protocol, _Protocol):
            request.protocol.request_started()
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400 or not isinstance(request, web.Request):
                raise
            return finish(request, error_response(error.status, error.reason))

    return handle


class Runner(web.AppRunner):
    """aiohttp's AppRunner serving with Linger's protocol and limits (from the app's
    settings)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        settings = app[SETTINGS]
        kwargs.setdefault("max_field_size", 8190)
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        # Compressed request bodies are refused (415), never inflated.
        kwargs.setdefault("auto_decompress", False)
        super().__init__(app, **kwargs)
        self._limits = _Limits(max_connections(settings), settings.header_timeout)
        self._server_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("handle_signals", "shutdown_timeout")
        }

    async def _make_server(self) -> web.Server:
        stock = await super()._make_server()  # starts the application
        return _Server(
            stock.request_handler,
            request_factory=stock.request_factory,
            limits=self._limits,
            loop=asyncio.get_running_loop(),
            access_log_class=AccessLogger,
            **self._server_kwargs,
        )


def connected(request: web.Request) -> Callable[[], bool]:
    """Whether ``request``'s client is still connected (a long-poll's ``alive``)."""

    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return alive


def finish(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """A stopping process closes each connection after its response (``Server: Linger``
    is set on every response as it is prepared: ``observe.echo_request_id``)."""
    if not response.prepared and request.app[DRAINING].is_set():
        response.force_close()
    return response


def listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket, made before the server starts so that worker processes can
    share one (and one accept queue)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.set_inheritable(True)
    return sock


async def serve(
    app: web.Application,
    sock: socket.socket,
    stop: asyncio.Event,
    started: Callable[[], None] = lambda: None,
    **runner_kwargs: Any,
) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set, then stop gracefully: stop
    accepting (other processes on the socket go on), answer waiting consumers, let every
    connection finish with ``Connection: close``, then clean up."""
    runner = Runner(app, **runner_kwargs)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        started()
        await stop.wait()
        await site.stop()
        app[DRAINING].set()
        for callback in app.on_shutdown:  # wake the long-polls: they answer 204 now
            await callback(app)
        await _drain(runner, runner_kwargs.get("shutdown_timeout", 5.0))
    finally:
        await runner.cleanup()


async def _drain(runner: web.AppRunner, grace: float) -> None:
    """Wait for the connections to close; idle ones get ``_IDLE_GRACE`` to bring one more
    request (answered with ``Connection: close``) before they are closed."""
    server = runner.server
    if server is None:
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    while server.connections and loop.time() - started < grace:
        if loop.time() - started >= _IDLE_GRACE:
            for connection in server.connections:
                if isinstance(connection, _Protocol) and not connection.busy:
                    connection.force_close()
        await asyncio.sleep(_DRAIN_POLL)
