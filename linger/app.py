"""The application factory, its resources and the server runner."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from aiohttp import web

from linger import __version__, errors
from linger.auth import cache
from linger.auth.cache import Authenticator
from linger.config import Settings
from linger.http import server
from linger.http.access import GUARD, TRUSTED_PROXIES, access_middleware, networks
from linger.http.budget import BUDGET_BATCHES, Budget
from linger.http.keys import (
    BATCH_BUDGET,
    BROKER,
    DRAINING,
    ENGINE,
    LISTENER,
    METRICS,
    SERVER_ID,
    SETTINGS,
    STARTED,
)
from linger.http.metrics import Metrics
from linger.http.middleware import error_middleware
from linger.http.observe import echo_request_id, observe_middleware
from linger.http.routes import ROUTES
from linger.http.ui import OVERVIEW, OverviewCache
from linger.queue.broker import Broker
from linger.queue.listener import Listener
from linger.queue.notifier import Notifier
from linger.store import db
from linger.store.storage import Storage

logger = logging.getLogger(__name__)

# How often a process writes when its tokens were last used.
USE_NOTED_EVERY = 60.0


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def _resources(clock: Callable[[], float]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        engine = db.create_engine(
            settings.db,
            sqlite_synchronous=settings.sqlite_sync,
            sqlite_busy_timeout=settings.sqlite_busy_timeout,
        )
        try:
            app[ENGINE] = engine
            await db.prepare(engine, migrate=settings.migrate)
            async with engine.begin() as conn:
                app[SERVER_ID] = await db.server_id(conn, uuid.uuid4().hex)
            origin = uuid.uuid4().hex
            storage = Storage(engine, clock, origin)
            broker = Broker(
                storage,
                Notifier(),
                hlm=settings.hlm,
                max_copies=settings.max_copies,
                poll_interval=settings.poll_interval,
                max_waiters=settings.max_waiters,
            )
            app[BROKER] = broker
            metrics = app[METRICS] = Metrics(broker, settings.metrics_channels)
            tasks = [
                asyncio.create_task(broker.run_poller()),
                asyncio.create_task(broker.run_sweeper(settings.sweep_interval)),
            ]
            if storage.driver.postgres:
                listener = Listener(
                    engine, origin, broker.notifier.notify, on_connect=broker.poll_soon
                )
                app[LISTENER] = listener
                metrics.listener_connected = listener.connected
                tasks.append(asyncio.create_task(listener.run()))
            if settings.auth:
                guard = app[GUARD] = Authenticator(
                    storage.tokens.lookup, storage.now, fresh_for=cache.FRESH_FOR
                )
                tasks.append(asyncio.create_task(_note_use(guard, storage)))
                tasks.append(asyncio.create_task(guard.run()))
            logger.info(
                "Linger %s on http://%s:%d, database %s",
                __version__,
                settings.host,
                settings.port,
                settings.db_display,
            )
            yield
            for task in tasks:
                await _stop(task)
            if GUARD in app:
                await _noted(app[GUARD], storage)
            await storage.close()
        finally:
            await engine.dispose()

    return resources


async def _noted(guard: Authenticator, storage: Storage) -> None:
    """Write when tokens were last used (at most once a minute: never on a request's
    path)."""
    try:
        await storage.tokens.mark_used(guard.take_used().items())
    except errors.LingerError as error:
        logger.warning("token use not recorded: %s", error)
    except Exception:  # the next minute tries again: this task must not end
        logger.exception("token use not recorded")


async def _note_use(guard: Authenticator, storage: Storage) -> None:
    while True:
        await asyncio.sleep(USE_NOTED_EVERY)
        await _noted(guard, storage)


async def _wake_waiters(app: web.Application) -> None:
    """Answer every long-polling consumer (204) before the server stops."""
    if BROKER in app:
        app[BROKER].notifier.close()


def create_app(settings: Settings, clock: Callable[[], float] = time.time) -> web.Application:
    """The Linger application; its database is opened when the app starts."""
    # Without --auth the access check is not in the chain at all: a middleware costs every
    # request a few microseconds even when it only passes the request on.
    middlewares = [observe_middleware, error_middleware]
    if settings.auth:
        middlewares.append(access_middleware)
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[BATCH_BUDGET] = Budget(BUDGET_BATCHES * settings.max_batch_bytes)
    app[STARTED] = time.time()
    app[TRUSTED_PROXIES] = networks(settings.trusted_proxies)
    app[OVERVIEW] = OverviewCache()
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.append(_resources(clock))
    app.on_shutdown.append(_wake_waiters)
    app.on_response_prepare.append(echo_request_id)
    app.router.add_routes(ROUTES)
    return app


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional (not on Windows)
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _serve(settings: Settings, sock: socket.socket, started: Callable[[], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.serve(
        create_app(settings),
        sock,
        stop,
        started,
        access_log=logging.getLogger("linger.access") if settings.access_log else None,
        shutdown_timeout=5.0,
    )


def run(
    settings: Settings,
    sock: socket.socket | None = None,
    started: Callable[[], None] = lambda: None,
) -> None:
    """Serve until SIGINT or SIGTERM, on ``sock`` (shared by worker processes) or a socket
    of its own; ``started`` is called once requests are accepted. Exit 1 with one line when
    the database is unusable or the address is taken."""
    try:
        if sock is None:
            sock = server.listening_socket(settings.host, settings.port)
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(_serve(settings, sock, started))
    except (errors.SchemaOutdated, errors.Unavailable, errors.Misconfigured) as error:
        sys.exit(f"linger: {error}")
    except OSError as error:
        sys.exit(f"linger: cannot start: {error}")
