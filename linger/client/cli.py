"""``linger send | recv | peek | stats | redrive | drain``: the client on the command line,
against the server at ``--url`` (LINGER_URL) with ``--token`` (LINGER_TOKEN)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from typing import IO, Any, NoReturn

from linger.client import progress
from linger.client.aio import AsyncClient
from linger.client.errors import BadRequest, LingerError
from linger.client.messages import ChannelDetail, Item, Message
from linger.client.transport import DEFAULT_URL

COMMANDS = ("send", "recv", "peek", "stats", "redrive", "drain")
# Messages per request of ``send --lines`` and ``recv -n`` (the server takes up to its
# --max-batch, 1000 by default).
BATCH = 500
# Dead letters moved per request of a redrive (the server's own transaction size).
REDRIVE_CHUNK = 1000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """The command cannot run as given (exit status 2)."""


class Failed(Exception):
    """The command failed, as its one-line text says (exit status 1)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive.__name__ = "integer from 1"


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1e9:
        raise ValueError(text)
    return value


_seconds.__name__ = "number of seconds"


def _options(parser: argparse.ArgumentParser) -> None:
    for option in ("priority", "timeout", "deliver", "linger", "delay"):
        parser.add_argument(f"--{option}", type=int, help=f"message option {option}")
    parser.add_argument("--dead", metavar="CHANNEL", help="dead-letter channel")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="linger", description="Linger's client commands.")
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("LINGER_URL", DEFAULT_URL),
        help=f"the server (default: {DEFAULT_URL}; env: LINGER_URL)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("LINGER_TOKEN"),
        help="bearer token, for a server with --auth (env: LINGER_TOKEN)",
    )
    common.add_argument(
        "--request-timeout", type=_seconds, default=30.0, help="seconds per request (30)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = commands.add_parser("send", parents=[common], help="add a message, or many")
    send.add_argument("channel")
    send.add_argument("message", nargs="?", help="the message; '-' or none: standard input")
    send.add_argument("--file", help="read the message (or the lines) from this file")
    send.add_argument(
        "--lines", action="store_true", help="each line is a message, sent in batches"
    )
    send.add_argument("--batch", type=_positive, default=BATCH, help=f"lines per request ({BATCH})")
    send.add_argument(
        "--content-type",
        help="default: text/plain; charset=utf-8 (application/octet-stream when not UTF-8)",
    )
    send.add_argument(
        "--retry",
        action="store_true",
        help="try again on 503 and broken connections (a message may then be stored twice)",
    )
    _options(send)
    recv = commands.add_parser("recv", parents=[common], help="receive messages, print them")
    recv.add_argument("channel")
    recv.add_argument("-n", type=_positive, default=1, help="at most N messages (1)")
    recv.add_argument(
        "--wait", type=_seconds, default=0.0, help="long-poll up to S seconds (0: answer at once)"
    )
    recv.add_argument("--ack", action="store_true", help="delete them once printed")
    recv.add_argument("--json", action="store_true", help="one JSON object per message")
    recv.add_argument("--batch", type=_positive, default=BATCH, help=f"per request ({BATCH})")
    peek = commands.add_parser("peek", parents=[common], help="look at messages, lease none")
    peek.add_argument("channel")
    peek.add_argument("-n", type=_positive, default=10, help="at most N messages (10)")
    peek.add_argument("--state", choices=("ready", "hidden", "delayed"), default="ready")
    peek.add_argument("--json", action="store_true", help="one JSON object per message")
    stats = commands.add_parser("stats", parents=[common], help="counts, as a table")
    stats.add_argument("channel", nargs="?", help="one channel (default: every channel)")
    stats.add_argument("--json", action="store_true", help="JSON instead of a table")
    redrive = commands.add_parser("redrive", parents=[common], help="dead letters back")
    redrive.add_argument("dead", help="the dead channel")
    redrive.add_argument("--to", help="their new channel (default: each one's own)")
    redrive.add_argument("-n", type=_positive, help="at most N (default: all)")
    drain = commands.add_parser("drain", parents=[common], help="discard a channel's messages")
    drain.add_argument("channel")
    drain.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for command, sub in commands.choices.items():
        sub.set_defaults(command_parser=sub, command=command)
    return parser


# send


def _source(args: argparse.Namespace) -> IO[bytes]:
    """Where the message (or the lines) come from: MESSAGE, --file or standard input."""
    if args.message not in (None, "-"):
        if args.file is not None:
            raise UsageError("give MESSAGE or --file, not both")
        return io.BytesIO(args.message.encode("utf-8", "surrogateescape"))
    if args.file is not None:
        try:
            return open(args.file, "rb")
        except OSError as error:
            raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    if args.message is None and sys.stdin.isatty():
        raise UsageError("no message: give MESSAGE, --file, or '-' to read standard input")
    return sys.stdin.buffer


def _lines(source: IO[bytes]) -> Iterator[bytes | str]:
    """The non-empty lines of ``source``, without their line ends: text when UTF-8."""
    for raw in source:
        line = raw.rstrip(b"\r\n")
        if line:
            yield _text_or_bytes(line)


def _line_count(source: IO[bytes]) -> int | None:
    """The lines of a regular file (for the progress bar), None for a pipe."""
    if not progress.wanted() or not source.seekable():
        return None
    count = sum(chunk.count(b"\n") for chunk in iter(lambda: source.read(1 << 20), b""))
    source.seek(0)
    return count


def _text_or_bytes(data: bytes) -> bytes | str:
    """Text when it is UTF-8 (sent as text/plain), else the bytes (octet-stream)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _chunks(items: Iterator[bytes | str], size: int) -> Iterator[list[bytes | str]]:
    chunk: list[bytes | str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _send(client: AsyncClient, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        key: getattr(args, key) for key in ("priority", "timeout", "deliver", "linger", "delay")
    }
    options["dead"] = args.dead
    source = _source(args)
    try:
        if not args.lines:
            body = _text_or_bytes(source.read())
            kind = args.content_type
            print(await client.add(args.channel, body, content_type=kind, retry=args.retry,
                                   **options))  # fmt: skip
            return 0
        sent = await _send_lines(client, args, source, options)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(f"{sent} messages sent to {args.channel}", file=sys.stderr)
    return 0


async def _send_lines(
    client: AsyncClient, args: argparse.Namespace, source: IO[bytes], options: dict[str, Any]
) -> int:
    sent = 0
    with progress.bar(f"sending to {args.channel}", _line_count(source), "lines") as advance:
        for chunk in _chunks(_lines(source), args.batch):
            items = [Item(line, content_type=args.content_type) for line in chunk]
            try:
                ids = await client.add_many(args.channel, items, retry=args.retry, **options)
            except LingerError as error:
                text = f"{error} (in the batch after the first {sent} messages, all sent)"
                raise Failed(text) from None
            sent += len(ids)
            advance(len(ids))
    return sent


# recv, peek


def _write(messages: list[Message], as_json: bool) -> None:
    out = sys.stdout.buffer
    for message in messages:
        if as_json:
            out.write(json.dumps(message.to_json()).encode() + b"\n")
        else:
            out.write(message.body + b"\n")
    out.flush()


async def _recv(client: AsyncClient, args: argparse.Namespace) -> int:
    remaining, wait, got, undeleted, size = args.n, args.wait, 0, 0, args.batch
    while remaining > 0:
        if args.n == 1:
            single = await client.receive(args.channel, wait=wait, nowait=not wait)
            received = [] if single is None else [single]
        else:
            count = min(remaining, size)
            try:
                received = await client.receive_many(
                    args.channel, count, wait=wait, nowait=not wait
                )
            except BadRequest as error:  # above the server's --max-batch: fewer a request
                if error.text != "Invalid batch size." or count == 1:
                    raise
                size = count // 2
                continue
        if not received:
            break
        _write(received, args.json)
        if args.ack:
            outcome = await client.delete_many(received)
            if len(outcome.done) < len(received):
                undeleted += len(received) - len(outcome.done)
        got += len(received)
        remaining -= len(received)
        wait = 0.0  # after the first: what is ready now
    if got and not args.ack:
        print(
            f"{got} received, not acknowledged: they come back after their visibility timeout",
            file=sys.stderr,
        )
    if undeleted:
        print(
            f"{undeleted} of the {got} printed were not deleted: their leases were stale "
            "(delivered again, or their visibility timeout ran out)",
            file=sys.stderr,
        )
        return 1
    return 0


def _clip(body: bytes, width: int = 60) -> str:
    """The body on one line: what is not printable escaped, the rest cut at ``width``."""
    text = body.decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


async def _peek(client: AsyncClient, args: argparse.Namespace) -> int:
    found = await client.peek(args.channel, args.n, state=args.state)
    if args.json:
        _write(found, as_json=True)
        return 0
    rows = [["ID", "PRIORITY", "DELIVERED", "AGE", "DEAD FROM", "REASON", "BODY"]]
    for m in found:
        row = [str(m.id), str(m.priority), str(m.delivered), _age(m.received)]
        rows.append([*row, m.dead_from or "-", m.dead_reason or "-", _clip(m.body)])
    _table(rows, 3)
    return 0


# stats


def _age(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _table(rows: list[list[str]], numbers: int) -> None:
    """Columns aligned, the ``numbers`` after the first to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (
            c.rjust(w) if 0 < i <= numbers else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())


async def _details(client: AsyncClient, names: list[str]) -> list[ChannelDetail]:
    limit = asyncio.Semaphore(8)

    async def one(name: str) -> ChannelDetail:
        async with limit:
            return await client.channel_detail(name)

    return list(await asyncio.gather(*(one(name) for name in names)))


async def _stats(client: AsyncClient, args: argparse.Namespace) -> int:
    names = [args.channel] if args.channel else await client.channels()
    details = await _details(client, names)
    server = None if args.channel else await client.stats()
    if args.json:
        shown = {name: asdict(d) for name, d in zip(names, details, strict=True)}
        print(json.dumps({"channels": shown, "server": server} if server else shown[names[0]]))
        return 0
    rows = [["CHANNEL", "READY", "HIDDEN", "DELAYED", "OLDEST READY", "DEAD FROM"]]
    for name, d in zip(names, details, strict=True):
        oldest = _age(d.oldest_ready_age) if d.ready else "-"
        counts = [str(d.ready), str(d.hidden), str(d.delayed)]
        rows.append([name, *counts, oldest, ", ".join(d.dead_from) or "-"])
    _table(rows, 4)
    if server is not None:
        print(
            f"\n{server.get('current-messages')} messages "
            f"({server.get('current-messages-ready')} ready, "
            f"{server.get('current-messages-hidden')} hidden) in "
            f"{server.get('current-channels')} channels, {server.get('current-topics')} topics, "
            f"{server.get('current-subscriptions')} subscriptions; Linger "
            f"{server.get('version')}, up {_age(int(server.get('current-uptime') or 0))}"
        )
    return 0


# redrive, drain


async def _redrive(client: AsyncClient, args: argparse.Namespace) -> int:
    """In requests of REDRIVE_CHUNK, at most the ready dead letters there were at the start
    (others may keep arriving)."""
    ready = (await client.channel_stats(args.dead)).ready
    total = ready if args.n is None else min(args.n, ready)
    moved = 0
    with progress.bar(f"redriving {args.dead}", total, "messages") as advance:
        while moved < total:
            step = await client.redrive(args.dead, to=args.to, n=min(REDRIVE_CHUNK, total - moved))
            moved += step
            advance(step)
            if step < min(REDRIVE_CHUNK, total - moved + step):
                break
    print(f"{moved} dead letters moved")
    return 0


async def _drain(client: AsyncClient, args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not draining {args.channel} without confirmation: pass --yes")
        counts = await client.channel_stats(args.channel)
        question = (
            f"Drain {args.channel}: discard its {counts.ready} ready and {counts.hidden} "
            "hidden messages? [y/N] "
        )
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            print("not drained", file=sys.stderr)
            return 1
    await client.drain(args.channel)
    print(f"{args.channel} drained", file=sys.stderr)
    return 0


_RUN: dict[str, Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]] = {
    "send": _send,
    "recv": _recv,
    "peek": _peek,
    "stats": _stats,
    "redrive": _redrive,
    "drain": _drain,
}


async def _run(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, token=args.token, timeout=args.request_timeout) as client:
        return await _RUN[args.command](client, args)


def main(argv: Sequence[str]) -> None:
    """Run one command; exit 0, 1 (the server refused or could not be reached) or 2 (a
    usage error), with a one-line message on standard error."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the command's own usage line, as every other usage error
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = f"linger {args.command}"
    try:
        code = asyncio.run(_run(args))
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (LingerError, ValueError, Failed) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        sys.stderr.close()
        os._exit(1)
    except OSError as error:  # standard output cannot be written (a full disk), say
        text = error.strerror or str(error)
        print(f"{prog}: {error.filename}: {text}" if error.filename else f"{prog}: {text}",
              file=sys.stderr)  # fmt: skip
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
