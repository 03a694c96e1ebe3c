"""A seconds-long smoke run of the benchmark, so that the harness keeps working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import samples

ROOT = Path(__file__).parent.parent


def _bench(backends: str, scenarios: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("wrk") is None:
        if os.environ.get("LINGER_TEST_REQUIRE_TOOLS") == "1":
            pytest.fail("wrk is required but not installed")
        pytest.skip("wrk not installed")
    command = [sys.executable, "-m", "bench", "--quick", "--no-original", "--backends", backends]
    result = subprocess.run(
        [*command, "--scenarios", scenarios],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _cpu(row: str) -> list[float]:
    """The CPU-per-message figures of a table row: Linger's and the database's (µs)."""
    cell = row.split(" | ")[3]
    return [float(part.split()[0].replace(",", "")) for part in cell.split(" + ")]


def test_benchmark_smoke_run_checks_and_prints_its_table() -> None:
    result = _bench("memory", "produce,consume,cycle,floor,depth,pubsub-4,longpoll")
    assert "load generator ceiling" in result.stdout
    ceiling = next(line for line in result.stdout.splitlines() if line.startswith("Python HTTP"))
    assert float(ceiling.split(": ")[1].split()[0].replace(",", "")) > 0, ceiling
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for scenario in ("produce", "consume", "cycle", "cycle floor", "depth", "pubsub-4", "longpoll"):
        assert any(row.startswith(f"| {scenario} ") for row in rows), scenario
    assert "FAILED" not in result.stdout
    for row in rows:
        if not row.startswith(("| longpoll", "| scenario")):
            (linger,) = _cpu(row)
            assert 0 < linger < 100_000, row


@pytest.mark.usefixtures("postgres_admin_url")
def test_benchmark_counts_the_database_cpu_per_message_with_and_without_auth() -> None:
    result = _bench("postgres", "cycle,cycle-1,batch,auth,floor")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert "FAILED" not in result.stdout, result.stdout
    # cycle-1's floor: the HTTP stack alone, by one connection.
    assert "Python HTTP ceiling by one connection: " in result.stdout, result.stdout
    # The cycle with --auth, beside the one without, in the same sitting.
    assert any(row.startswith("| cycle --auth | postgres |") for row in rows), rows
    for scenario in ("cycle", "cycle-1", "batch", "cycle --auth", "cycle floor"):
        row = next(row for row in rows if row.startswith(f"| {scenario} "))
        linger, database = _cpu(row)
        assert linger > 0, row
        assert database > 0, row


def test_profile_samples_are_counted_by_the_module_of_their_innermost_frame() -> None:
    raw = [
        "<module> (linger/__main__.py:5);run (asyncio/runners.py:118);"
        "_run_once (asyncio/base_events.py:1922);select (selectors.py:468) 7",
        "_run_once (asyncio/base_events.py:1936);data_received (aiohttp/web_protocol.py:380) 5",
        "handle (linger/http/server.py:90);claim (linger/store/messages.py:210) 3",
        "execute (/opt/venv/lib/python3.11/site-packages/asyncpg/connection.py:318) 2",
        "dumps (/usr/lib/python3.11/json/__init__.py:231) 1",
        "thread (0x7f3a);loop (bench/samples.py:40) 1",
        "a line that is not a sample",
        "",
    ]
    places = samples.count(raw)
    assert places == {
        "the event loop (asyncio, selectors, threads)": 7,
        "aiohttp": 5,
        "linger/store/messages.py": 3,
        "asyncpg": 2,
        "json": 1,
        "bench": 1,
    }
