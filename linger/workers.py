"""``--workers N``: N server processes on one listening socket, under a supervisor.

The supervisor prepares the database once (migrations or the schema check), opens the
listening socket, then forks the workers, which all accept from it: one accept queue, so
a connection waiting in it is served by whichever worker is there, also while one stops.
SIGTERM or SIGINT stops every worker gracefully (each answers its waiting consumers 204,
finishes its requests and closes each connection after its response) and exits 0; SIGHUP
replaces the workers one by one, starting the new one and waiting until it accepts before
stopping the old, so that a deploy refuses and drops nothing. A worker that dies is
restarted; if the supervisor itself is killed, its workers stop gracefully too (Linux).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType

from linger import errors
from linger.app import run
from linger.config import Settings
from linger.http.server import listening_socket
from linger.store import db

logger = logging.getLogger(__name__)

_STOP_TIMEOUT = 10.0
_RESTART_DELAY = 1.0
# How long a new worker may take to start accepting before the old one stops anyway.
_START_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _stop_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when its supervisor dies,
    so that a supervisor killed with SIGKILL leaves no orphans serving the port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the request above
        sys.exit(0)


def _worker(settings: Settings, supervisor: int, sock: socket.socket, ready: Event) -> None:
    _stop_with(supervisor)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    run(settings, sock, ready.set)


async def _prepare(settings: Settings) -> None:
    engine = db.create_engine(
        settings.db,
        sqlite_synchronous=settings.sqlite_sync,
        sqlite_busy_timeout=settings.sqlite_busy_timeout,
    )
    try:
        await db.prepare(engine, migrate=settings.migrate)
    finally:
        await engine.dispose()


class Supervisor:
    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.context = multiprocessing.get_context("fork")
        self.workers: list[BaseProcess] = []
        self.stopping = False
        self.reload = False

    def spawn(self) -> tuple[BaseProcess, Event]:
        ready = self.context.Event()
        worker = self.context.Process(
            target=_worker, args=(self.settings, os.getpid(), self.sock, ready), daemon=False
        )
        worker.start()
        logger.info("worker %s started", worker.pid)
        return worker, ready

    def stop(self, worker: BaseProcess) -> None:
        if worker.is_alive() and worker.pid is not None:
            worker.terminate()  # SIGTERM: graceful
        worker.join(_STOP_TIMEOUT)
        if worker.is_alive():
            logger.warning(
                "worker %s did not stop in %.0f s; killing it", worker.pid, _STOP_TIMEOUT
            )
            worker.kill()
            worker.join()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stopping = True

    def _replace_all(self) -> None:
        for index, old in enumerate(list(self.workers)):
            new, ready = self.spawn()
            if not ready.wait(_START_TIMEOUT):
                logger.warning("worker %s not accepting after %.0f s", new.pid, _START_TIMEOUT)
            self.workers[index] = new
            self.stop(old)
        logger.info("all workers replaced")

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.workers = [self.spawn()[0] for _ in range(self.settings.workers)]
        while not self.stopping:
            time.sleep(0.1)
            if self.reload:
                self.reload = False
                self._replace_all()
            for index, worker in enumerate(self.workers):
                if not worker.is_alive() and not self.stopping:
                    logger.error(
                        "worker %s exited with %s; restarting it", worker.pid, worker.exitcode
                    )
                    time.sleep(_RESTART_DELAY)
                    self.workers[index] = self.spawn()[0]
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            self.stop(worker)
        logger.info("all workers stopped")


def supervise(settings: Settings) -> None:
    """Run ``settings.workers`` server processes until SIGTERM or SIGINT."""
    try:
        asyncio.run(_prepare(settings))
    except (errors.SchemaOutdated, errors.Unavailable, errors.Misconfigured) as error:
        sys.exit(f"linger: {error}")
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as error:
        sys.exit(f"linger: cannot start: {error}")
    Supervisor(settings, sock).run()
