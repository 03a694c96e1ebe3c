"""``python -m bench``: every scenario on every backend and on the original Linger 1.0.1,
side by side, as one table (medians of several runs)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import scenarios, worker
from bench.observe import observe
from bench.scenarios import QUICK, Failed, Run, Size
from bench.servers import (
    ROOT,
    Server,
    free_port,
    fresh_database,
    linger_command,
    postgres_cluster,
    raise_open_files,
)

if TYPE_CHECKING:
    from tests.pgcluster import Cluster

BACKENDS = ("memory", "file", "postgres")
Figure = Callable[[Server, Size], Run]
Row = tuple[str, str, str, str, str, str, str]
SCENARIOS: dict[str, tuple[Figure, str]] = {
    "produce": (scenarios.produce, "msg/s"),
    "consume": (scenarios.consume, "msg/s"),
    "cycle": (scenarios.cycle, "cycles/s"),
    "cycle-1": (lambda server, size: scenarios.cycle(server, size, 1), "cycles/s"),
    "depth": (scenarios.depth, "cycles/s"),
    "inflight": (scenarios.inflight, "cycles/s"),
    "batch": (scenarios.batch, "msg/s"),
    "batch-produce": (scenarios.batch_produce, "msg/s"),
    "pubsub-4": (lambda server, size: scenarios.pubsub(server, size, 4), "deliveries/s"),
    "pubsub-100": (lambda server, size: scenarios.pubsub(server, size, 100), "deliveries/s"),
    "worker-1": (lambda server, size: worker.worker(server, size, 1), "msg/s"),
    "worker-100": (lambda server, size: worker.worker(server, size, 100), "msg/s"),
}


@contextmanager
def started(name: str, command: list[str], database_pid: int | None = None) -> Iterator[Server]:
    server = Server(name, command, database_pid=database_pid)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Measured:
    """Medians over runs: the rate, and CPU microseconds per message moved."""

    rate: float
    server_us: float
    database_us: float | None

    def cpu(self) -> str:
        if self.database_us is None:
            return f"{self.server_us:,.0f} µs"
        return f"{self.server_us:,.0f} + {self.database_us:,.0f} µs"


def measure(
    command: list[str],
    name: str,
    figure: Figure,
    size: Size,
    runs: int,
    database_pid: int | None = None,
) -> Measured:
    """The medians of ``runs`` runs, each on a freshly started server."""
    results = []
    for _ in range(runs):
        with started(name, command, database_pid) as server:
            results.append(figure(server, size))
    database = [r.database_us for r in results if r.database_us is not None]
    return Measured(
        statistics.median(r.rate for r in results),
        statistics.median(r.server_us for r in results),
        statistics.median(database) if database else None,
    )


def http_ceiling(size: Size, connections: int = 16) -> str:
    """The cycle against aiohttp with nothing behind it: the Python HTTP stack's own
    ceiling, which bounds every Linger figure (by one connection: what a lightly loaded
    server's requests cost, the floor of ``cycle-1``)."""
    with started("noop", [sys.executable, "-m", "bench.noop"]) as server, server.metered() as cpu:
        result = scenarios.wrk(
            server, "cycle.lua", ["noop"], connections=connections, seconds=size.seconds
        )
    return (
        f"{result.rate:,.0f} cycles/s, {cpu.server / result.ops * 1e6:,.0f} µs CPU per cycle "
        "(aiohttp answering the cycle with no database)"
    )


def generator_ceiling(seconds: float) -> str:
    """wrk's own ceiling on this machine: requests/s against nginx answering 204."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        return "unknown (nginx not installed)"
    prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        textwrap.dedent(f"""\
        {user}daemon off; worker_processes 1; pid {prefix}/pid; error_log {prefix}/error.log;
        events {{ worker_connections 1024; }}
        http {{ access_log off; client_body_temp_path {prefix};
          server {{ listen 127.0.0.1:{port}; location / {{ return 204; }} }} }}
        """)
    )
    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.DEVNULL
    )
    try:
        server = Server("nginx", [])
        server.port = port
        time.sleep(0.5)
        output = subprocess.run(
            ["wrk", "-t16", "-c16", f"-d{max(1, round(seconds))}s", server.base],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rate = next(
            line.split()[-1] for line in output.splitlines() if line.startswith("Requests/sec")
        )
        return f"{float(rate):,.0f} requests/s (wrk, 16 connections, nginx answering 204)"
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(prefix, ignore_errors=True)


# Scenarios the original is measured in once: it scans its unindexed queue on every
# operation, so filling it with the depth scenario's 110,000 messages takes minutes.
SLOW_ON_ORIGINAL = frozenset({"depth", "inflight"})
# Routes that Linger 1.0.1 does not have.
NOT_IN_ORIGINAL = frozenset({"batch", "batch-produce", "worker-1", "worker-100"})


def ratio(value: float, original: float | None) -> str:
    return f"{value / original:.2f}x" if original else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run with tiny sizes (CI)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated: memory, file, postgres"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join([*SCENARIOS, "floor", "longpoll", "observe", "auth"]),
        help="comma-separated scenario names",
    )
    parser.add_argument("--no-original", action="store_true", help="skip the original Linger 1.0.1")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the Python of the Linger installation to measure (default: this one), to "
        "compare versions side by side",
    )
    args = parser.parse_args(argv)
    # A run stopped with SIGTERM still stops its servers and removes its PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = QUICK if args.quick else Size()
    if args.seconds:
        size = Size(**{**size.__dict__, "seconds": args.seconds})
    runs = 1 if args.quick else args.runs
    backends = [b for b in args.backends.split(",") if b]
    chosen = [s for s in args.scenarios.split(",") if s]
    raise_open_files()

    print(
        f"machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.platform()}, Python {platform.python_version()}"
    )
    print(f"load generator ceiling: {generator_ceiling(size.seconds)}")
    print(f"Python HTTP ceiling: {http_ceiling(size)}")
    if "cycle-1" in chosen:
        print(f"Python HTTP ceiling by one connection: {http_ceiling(size, 1)}")
    print(
        f"{runs} run(s) per figure, {size.seconds:g} s each; medians "
        f"(the original's {', '.join(sorted(SLOW_ON_ORIGINAL))}: one run)\n"
    )
    rows: list[Row] = []
    failures = 0
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        cluster = stack.enter_context(postgres_cluster()) if "postgres" in backends else None

        def command(backend: str) -> list[str]:
            url = cluster.url if cluster else None
            return linger_command(backend, Path(workdir), url, args.python)

        database_pid = cluster.pid if cluster else None
        # Scenarios that make rows of their own, rather than one figure per backend.
        own_rows: dict[str, Callable[[], list[Row]]] = {
            "auth": lambda: _auth_rows(backends, command, size, runs, database_pid),
            "floor": lambda: _floor_rows(backends, Path(workdir), cluster, size, runs),
            "observe": lambda: _observe_rows(backends, command, size),
            "longpoll": lambda: _longpoll_rows(backends, command, size, args.no_original),
        }
        for name in chosen:
            if name in own_rows:
                new = own_rows[name]()
                failures += sum(row[2].startswith("FAILED") for row in new)
                rows.extend(new)
                print_table(new, header=False)
                continue
            figure, unit = SCENARIOS[name]
            original = None
            if not args.no_original and name not in NOT_IN_ORIGINAL:
                try:
                    # Filling the original for depth takes it about ten minutes: once.
                    times = 1 if name in SLOW_ON_ORIGINAL else runs
                    original = measure(command("original"), "original", figure, size, times)
                except Failed as error:
                    print(f"original {name}: FAILED {error}", file=sys.stderr)
            for backend in backends:
                try:
                    pid = cluster.pid if cluster and backend == "postgres" else None
                    value = measure(command(backend), backend, figure, size, runs, pid)
                except Failed as error:
                    failures += 1
                    rows.append((name, backend, f"FAILED: {error}", "", "", "", ""))
                    continue
                rows.append(
                    (
                        name,
                        backend,
                        f"{value.rate:,.0f} {unit}",
                        value.cpu(),
                        f"{original.rate:,.0f}" if original else "-",
                        original.cpu() if original else "-",
                        ratio(value.rate, original.rate if original else None),
                    )
                )
            print_table(rows[-len(backends) :], header=not rows[: -len(backends)])
    print()
    print_table(rows, header=True)
    return 1 if failures else 0


def _token(command: list[str]) -> str:
    """A token for the cycle's channel, made by ``linger token create`` on the database of
    the Linger that ``command`` runs."""
    database = next(i for i, arg in enumerate(command) if arg in ("--dbfile", "--db"))
    created = subprocess.run(
        [*command[:4], "token", "create", "--name", "bench", "--scope", "produce:cyc*",
         "--scope", "consume:cyc*", *command[database : database + 2]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return created.stdout.strip()


def _authorized(figure: Figure, command: list[str]) -> Figure:
    """``figure`` with every request carrying a token scoped to the channel (``cyc*``):
    the statements that act on a message by id check its channel, as in production."""

    def run(server: Server, size: Size) -> Run:
        server.headers = {"Authorization": f"Bearer {_token(command)}"}
        return figure(server, size)

    return run


def _auth_rows(
    backends: list[str],
    command: Callable[[str], list[str]],
    size: Size,
    runs: int,
    postgres_pid: int | None,
) -> list[Row]:
    """The cycle without and with ``--auth``, on the same backend in the same sitting
    (the in-memory database cannot hold tokens: ``--auth`` refuses it)."""
    figure, unit = SCENARIOS["cycle"]
    rows: list[Row] = []
    for backend in (b for b in backends if b != "memory"):
        pid = postgres_pid if backend == "postgres" else None
        try:
            plain = measure(command(backend), backend, figure, size, runs, pid)
            guarded = [*command(backend), "--auth"]
            auth = measure(guarded, backend, _authorized(figure, guarded), size, runs, pid)
        except (Failed, subprocess.CalledProcessError) as error:
            rows.append(("cycle --auth", backend, f"FAILED: {error}", "", "", "", ""))
            continue
        rows.append(("cycle", backend, f"{plain.rate:,.0f} {unit}", plain.cpu(), "-", "-", "-"))
        change = f"{auth.rate / plain.rate:.2f}x of without"
        rows.append(
            ("cycle --auth", backend, f"{auth.rate:,.0f} {unit}", auth.cpu(), "-", "-", change)
        )
    return rows


def _floor_rows(
    backends: list[str], workdir: Path, cluster: Cluster | None, size: Size, runs: int
) -> list[Row]:
    """The cycle's statements alone on each backend (``bench.floor``): what the database
    and its driver cost per cycle, under Linger's own figure."""
    rows: list[Row] = []
    for backend in backends:
        results: list[dict[str, Any]] = []
        for _ in range(runs):
            command = [sys.executable, "-m", "bench.floor", "--backend", backend]
            command += ["--seconds", str(size.seconds)]
            if backend == "file":
                command += ["--db", str(workdir / f"floor-{time.monotonic_ns()}.db")]
            elif backend == "postgres":
                assert cluster is not None
                command += ["--db", fresh_database(cluster.url)]
                command += ["--database-pid", str(cluster.pid)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                results = []
                failed = f"FAILED: {done.stderr[-300:]}"
                rows.append(("cycle floor", backend, failed, "", "", "", ""))
                break
            results.append(json.loads(done.stdout))
        if not results:
            continue
        rate = statistics.median(r["cycles"] / r["seconds"] for r in results)
        client = statistics.median(r["cpu"] / r["cycles"] * 1e6 for r in results)
        database = [r["database_cpu"] / r["cycles"] * 1e6 for r in results if r["database_cpu"]]
        cpu = Measured(rate, client, statistics.median(database) if database else None).cpu()
        rows.append(("cycle floor", backend, f"{rate:,.0f} cycles/s", cpu, "-", "-", "-"))
    return rows


def _observe_rows(
    backends: list[str], command: Callable[[str], list[str]], size: Size
) -> list[Row]:
    """The monitoring reads on a big queue (Linger only: the original has no /metrics)."""
    rows: list[Row] = []
    for backend in backends:
        try:
            with started(backend, command(backend)) as server:
                result = observe(server, size.observe_messages, size.observe_channels)
        except (Failed, RuntimeError) as error:
            rows.append(("observe", backend, f"FAILED: {error}", "", "", "", ""))
            continue
        rows.append(("observe", backend, result.describe(), "-", "-", "-", "-"))
    return rows


def _longpoll_rows(
    backends: list[str], command: Callable[[str], list[str]], size: Size, no_original: bool
) -> list[Row]:
    rows: list[Row] = []
    original = None
    if not no_original:
        try:
            with started("original", command("original")) as server:
                original = scenarios.longpoll(server, size, waiters_stat=False)
        except Failed as error:
            print(f"original longpoll: FAILED {error}", file=sys.stderr)
    for backend in backends:
        try:
            with started(backend, command(backend)) as server:
                result = scenarios.longpoll(server, size)
        except Failed as error:
            name = f"longpoll {size.waiters:,} waiters"
            rows.append((name, backend, f"FAILED: {error}", "", "", "", ""))
            continue
        rows.append(
            (
                f"longpoll {size.waiters:,} waiters",
                backend,
                _describe(result),
                "-",
                (_describe(original)) if original else "-",
                "-",
                ratio(original.p99_ms, result.p99_ms) if original else "-",
            )
        )
    return rows


def _describe(result: scenarios.LongPoll) -> str:
    return f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, RSS {result.rss_mb:.0f} MB"


def print_table(rows: list[Row], *, header: bool) -> None:
    if header:
        print(
            "| scenario | backend | Linger | CPU per message (Linger + database) "
            "| original 1.0.1 | original's CPU | ratio |"
        )
        print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
