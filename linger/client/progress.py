"""A progress bar for long command-line operations: drawn on a terminal when ``rich`` (the
``client`` extra) is installed, nothing otherwise."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Advance = Callable[[float], None]


def _nothing(amount: float) -> None:
    return None


def wanted() -> bool:
    """Only on a terminal: piped or redirected, the commands stay quiet."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def bar(description: str, total: float | None, unit: str) -> Iterator[Advance]:
    """A bar to ``total`` (None: a count without an end) of ``unit``; yields the function
    that moves it on."""
    if not wanted():
        yield _nothing
        return
    try:  # imported here: the commands work without the extra
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        yield _nothing
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda amount: progress.advance(task, amount)
