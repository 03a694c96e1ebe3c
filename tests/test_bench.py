"""A seconds-long smoke run of the benchmark, so that the harness keeps working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_benchmark_smoke_run_checks_and_prints_its_table() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("LINGER_TEST_REQUIRE_TOOLS") == "1":
            pytest.fail("wrk is required but not installed")
        pytest.skip("wrk not installed")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--backends",
            "memory",
            "--no-original",
            "--scenarios",
            "produce,consume,cycle,depth,pubsub-4,longpoll",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "load generator ceiling" in result.stdout
    ceiling = next(line for line in result.stdout.splitlines() if line.startswith("Python HTTP"))
    assert float(ceiling.split(": ")[1].split()[0].replace(",", "")) > 0, ceiling
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for scenario in ("produce", "consume", "cycle", "depth", "pubsub-4", "longpoll"):
        assert any(row.startswith(f"| {scenario}") for row in rows), scenario
    assert "FAILED" not in result.stdout
