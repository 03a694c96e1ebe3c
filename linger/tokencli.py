"""``linger token create|list|revoke``: tokens in the configured database (the server's
``--db`` / ``--dbfile`` / ``--config`` and their LINGER_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa

from linger import errors
from linger.auth import scopes
from linger.auth.tokens import Token
from linger.cli import parse_settings
from linger.config import Settings
from linger.store import db, tokens

_DAY_MS = 86_400_000
_MAX_DAYS = 36_500
_MIN_DAYS = 1 / 1440  # a minute


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _days(text: str) -> float:
    value = float(text)
    if not _MIN_DAYS <= value <= _MAX_DAYS:
        raise ValueError(text)
    return value


_days.__name__ = f"number of days from {_MIN_DAYS:.6f} (a minute) to {_MAX_DAYS}"


def _token_id(text: str) -> int:
    value = int(text)
    if not 1 <= value < 2**63:
        raise ValueError(text)
    return value


_token_id.__name__ = "token id"


def _scope(text: str) -> str:
    try:
        scopes.parse(text)
    except scopes.InvalidScope as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _name(text: str) -> str:
    if not 1 <= len(text) <= db.NAME_LENGTH or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"a token name has 1 to {db.NAME_LENGTH} printable characters"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linger token",
        description="Create, list and revoke the bearer tokens that --auth requires.",
    )
    database = _Parser(add_help=False)
    database.add_argument("--db", help="database URL, as for the server (env: LINGER_DB)")
    database.add_argument("--dbfile", help="SQLite database file (env: LINGER_DBFILE)")
    database.add_argument("--config", metavar="FILE", help="TOML config file (env: LINGER_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser(
        "create",
        parents=[database],
        help="create a token and print its secret (shown only once)",
        description="Scopes are <action>:<pattern>, actions produce, consume, manage, read "
        "and admin, patterns globs over channel and topic names (* is any run of "
        "characters): --scope produce:orders.* --scope consume:orders.*",
    )
    create.add_argument("--scope", action="append", type=_scope, required=True)
    create.add_argument("--name", type=_name, default="token", help="what it is for")
    create.add_argument("--expires", type=_days, metavar="DAYS", help="days until it expires")
    listing = commands.add_parser("list", parents=[database], help="every token (no secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = commands.add_parser("revoke", parents=[database], help="revoke a token for good")
    revoke.add_argument("id", type=_token_id, help="the token's id (see list)")
    return parser


def _database(args: argparse.Namespace) -> str:
    given = {key: getattr(args, key) for key in ("db", "dbfile", "config")}
    settings = parse_settings([f"--{key}={value}" for key, value in given.items() if value])
    if settings.in_memory:
        sys.exit(
            "linger token: no database configured: give the server's --dbfile or --db "
            "(or LINGER_DBFILE / LINGER_DB)"
        )
    url = sa.make_url(settings.db)
    if url.get_backend_name() == "sqlite" and not Path(str(url.database)).is_file():
        # A mistyped path must not quietly make a database that no server reads.
        where = f"no database at {url.database}"
        sys.exit(f"linger token: {where} (the server makes it when it first starts)")
    return settings.db


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(token: Token, now: int) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and now >= token.expires_at:
        return "expired"
    return "active"


def _record(token: Token, now: int) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "scopes": list(token.scopes),
        "created": _when(token.created_at),
        "expires": _when(token.expires_at),
        "last_used": _when(token.last_used_at),
        "status": _status(token, now),
    }


async def _run(args: argparse.Namespace, url: str) -> int:
    engine = db.create_engine(url)
    try:
        await db.prepare(engine, migrate=False)
        now = int(time.time() * 1000)
        async with engine.begin() as conn:
            if args.command == "create":
                expires = None if args.expires is None else now + int(args.expires * _DAY_MS)
                token, secret = await tokens.create(conn, args.name, args.scope, expires, now)
            elif args.command == "list":
                every = await tokens.every(conn)
            elif not await tokens.revoke(conn, args.id, now):
                print(f"linger token: no token {args.id}", file=sys.stderr)
                return 1
    finally:
        await engine.dispose()
    if args.command == "create":
        print(secret)
        print(
            f"token {token.id} ({token.name}) created, expires {_when(token.expires_at)}: "
            "keep the secret above, it is shown only this once",
            file=sys.stderr,
        )
    elif args.command == "list":
        records = [_record(token, now) for token in every]
        if args.json:
            for record in records:
                print(json.dumps(record))
        else:
            _print_table(records)
    else:
        print(f"token {args.id} revoked", file=sys.stderr)
    return 0


def _print_table(records: list[dict[str, Any]]) -> None:
    columns = ("id", "name", "status", "scopes", "created", "expires", "last_used")
    rows = [[str(c).upper().replace("_", " ") for c in columns]]
    rows += [[" ".join(r[c]) if c == "scopes" else str(r[c]) for c in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    url = _database(args)
    try:
        sys.exit(asyncio.run(_run(args, url)))
    except (errors.SchemaOutdated, errors.Unavailable, errors.Misconfigured) as error:
        sys.exit(f"linger token: {error}")
    except (OSError, sa.exc.DBAPIError) as error:
        reason = getattr(error, "orig", None) or error
        sys.exit(f"linger token: cannot use the database {Settings(db=url).db_display}: {reason}")
