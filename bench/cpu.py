"""CPU time of the processes under test, read from ``/proc`` before and after each
measurement: CPU per message is far steadier on a shared machine than throughput."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_seconds(pid: int) -> float:
    """CPU seconds (user and system) of ``pid`` and of the children it has reaped."""
    fields = _stat(pid)
    return sum(int(value) for value in fields[11:15]) / _TICKS


def tree_seconds(pid: int) -> float:
    """``process_seconds`` of ``pid`` and of each of its live children: a PostgreSQL
    server with its backends (those that exited count through the postmaster)."""
    total = process_seconds(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
            if int(fields[1]) == pid:
                total += sum(int(value) for value in fields[11:15]) / _TICKS
        except (OSError, ValueError):  # exited meanwhile
            continue
    return total


@dataclass
class Cpu:
    """CPU seconds a measurement cost the server and (if it has one) the database."""

    server: float = 0.0
    database: float | None = None


@contextmanager
def metered(server_pid: int, database_pid: int | None) -> Iterator[Cpu]:
    """The CPU used by the server (and database) while the block runs."""
    cpu = Cpu()
    server = process_seconds(server_pid)
    database = tree_seconds(database_pid) if database_pid else None
    try:
        yield cpu
    finally:
        cpu.server = process_seconds(server_pid) - server
        if database_pid and database is not None:
            cpu.database = tree_seconds(database_pid) - database
