"""``python -m bench.samples PROFILE.txt``: py-spy's raw samples (``py-spy record -f raw``)
counted by where they were taken: each sample's innermost Python frame, by module.

A flame graph shows where the time goes down one stack; this shows where it goes across
all of them, which is what tells whether one block is big enough to be worth a rewrite.
Frames of the standard library's event loop and selectors count as the loop, those of
installed packages by package, those of Linger by module (``linger/http/server.py``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# "function (path/to/file.py:123)", py-spy's way of naming a frame.
FRAME = re.compile(r"^.* \((?P<file>[^():]+)(?::\d+)?\)$")
LOOP = ("asyncio/", "selectors.py", "threading.py", "concurrent/futures/")


def place(file: str) -> str:
    """The module or package of a frame's file, as the table names it. py-spy names files
    relative to the import path (``aiohttp/web_protocol.py``, ``selectors.py``) unless
    asked for full names, which are cut the same way here."""
    file = file.replace("\\", "/")
    if "/site-packages/" in file:
        file = file.rsplit("/site-packages/", 1)[1]
    elif "/lib/python3." in file:
        file = file.rsplit("/lib/python3.", 1)[1].split("/", 1)[-1]
    if file.startswith("linger/") or "/linger/" in file:
        return "linger/" + file.rsplit("linger/", 1)[1]
    if any(file.startswith(part) or f"/{part}" in file for part in LOOP):
        return "the event loop (asyncio, selectors, threads)"
    if file.startswith("/") or "/" not in file:
        return Path(file).name
    return file.split("/", 1)[0]


def count(lines: list[str]) -> Counter[str]:
    """Samples by place: a raw line is ``frame;frame;...;frame COUNT``, outermost first;
    frames that name no file (py-spy's thread and process labels) are skipped."""
    places: Counter[str] = Counter()
    for line in lines:
        stack, _, samples = line.rstrip("\n").rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        files = [m["file"] for m in map(FRAME.match, map(str.strip, stack.split(";"))) if m]
        places[place(files[-1]) if files else "?"] += int(samples)
    return places


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.samples", description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    args = parser.parse_args(argv)
    places = count(args.profile.read_text(encoding="utf-8").splitlines())
    total = sum(places.values())
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total:,} samples")
    print("| where | share of samples |\n|---|---|")
    for name, samples in places.most_common(args.top):
        print(f"| {name} | {100 * samples / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
