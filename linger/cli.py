"""Command line: options with LINGER_<NAME> environment and TOML config-file fallbacks."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from aiohttp.http_exceptions import HttpProcessingError

from linger import __version__, logs
from linger.config import Settings, sqlite_url

_DEFAULTS = Settings()


def _bounded_int(low: int, high: int = 2**63 - 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(str(text).strip())
        if not low <= value <= high:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer from {low}" + ("" if high == 2**63 - 1 else f" to {high}")
    return parse


def _seconds(text: str) -> float:
    value = float(str(text))
    if not 0 < value < 1e9:
        raise ValueError(text)
    return value


_seconds.__name__ = "positive number of seconds"


def _boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_boolean.__name__ = "boolean"


def _networks(text: str) -> str:
    value = str(text).strip()
    for part in value.split(","):
        if part.strip():
            ipaddress.ip_network(part.strip(), strict=False)
    return value


_networks.__name__ = "comma-separated addresses or networks"


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        for choice in choices:  # in any case, given as spelled in ``choices``
            if choice.lower() == value:
                return choice
        raise ValueError(text)

    parse.__name__ = " or ".join(choices)
    return parse


# (option, type, default, help). Each option is also LINGER_<NAME> and a config-file key.
_OPTIONS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    ("host", str, _DEFAULTS.host, "address to listen on"),
    ("port", _bounded_int(1, 65535), _DEFAULTS.port, "port to listen on"),
    ("dbfile", str, None, "SQLite database file (WAL); default: an in-memory database"),
    ("db", str, None, "SQLAlchemy async database URL, e.g. postgresql+asyncpg://u:p@host/db"),
    (
        "hlm",
        _bounded_int(0),
        _DEFAULTS.hlm,
        "high-level mark: most messages a channel may hold; 0 = no limit",
    ),
    ("max-size", _bounded_int(1, 2**31), _DEFAULTS.max_size, "largest message in bytes"),
    ("poll-max", _seconds, _DEFAULTS.poll_max, "longest long-poll in seconds, then 204"),
    (
        "max-batch",
        _bounded_int(1, 100_000),
        _DEFAULTS.max_batch,
        "most messages in one batch request (and in one peek)",
    ),
    (
        "max-batch-bytes",
        _bounded_int(1024, 2**31),
        _DEFAULTS.max_batch_bytes,
        "largest body of a batch request in bytes",
    ),
    (
        "max-copies",
        _bounded_int(1, 100_000_000),
        _DEFAULTS.max_copies,
        "most copies one batch publish may write (messages x subscribed channels); "
        "a batch of one message, like a single publish, is never refused",
    ),
    (
        "max-waiters",
        _bounded_int(1, 10_000_000),
        _DEFAULTS.max_waiters,
        "most consumers long-polling this process at once; more get 503",
    ),
    (
        "poll-interval",
        _seconds,
        _DEFAULTS.poll_interval,
        "how often waiting consumers look for messages that no local add announced",
    ),
    (
        "sweep-interval",
        _seconds,
        _DEFAULTS.sweep_interval,
        "how often expired and exhausted messages are deleted",
    ),
    (
        "sqlite-sync",
        _choice("FULL", "NORMAL"),
        _DEFAULTS.sqlite_sync,
        "SQLite synchronous mode for --dbfile: FULL (a 202 is on disk) or NORMAL "
        "(faster; the last commits may be lost on power failure, not on a crash)",
    ),
    (
        "sqlite-busy-timeout",
        _seconds,
        _DEFAULTS.sqlite_busy_timeout,
        "how long a write waits for another process's lock on a --dbfile, then 503",
    ),
    (
        "migrate",
        _boolean,
        _DEFAULTS.migrate,
        "apply pending database migrations at start (SQLite always does)",
    ),
    (
        "workers",
        _bounded_int(1, 256),
        _DEFAULTS.workers,
        "server processes sharing the port (SO_REUSEPORT); needs --dbfile or --db",
    ),
    (
        "max-connections",
        _bounded_int(0, 10_000_000),
        _DEFAULTS.max_connections,
        "most open client connections; more get 503 (0: the open-files limit less a reserve)",
    ),
    (
        "header-timeout",
        _seconds,
        _DEFAULTS.header_timeout,
        "seconds a client may take to send a request's head once it started, then 408",
    ),
    (
        "body-timeout",
        _seconds,
        _DEFAULTS.body_timeout,
        "seconds a client may take to send a request's body, then 408",
    ),
    (
        "auth",
        _boolean,
        _DEFAULTS.auth,
        "require a bearer token (see `linger token`) on every route but /health and /ready",
    ),
    (
        "trusted-proxies",
        _networks,
        _DEFAULTS.trusted_proxies,
        "addresses or networks of the proxies in front, whose X-Forwarded-For names the "
        "client (for --auth's failure budget and log lines)",
    ),
    ("access-log", _boolean, _DEFAULTS.access_log, "log every request"),
    (
        "log-level",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        _DEFAULTS.log_level,
        "logging level",
    ),
    ("log-format", _choice("text", "json"), _DEFAULTS.log_format, "log lines as text or JSON"),
    (
        "metrics-channels",
        _bounded_int(1, 100_000),
        _DEFAULTS.metrics_channels,
        "the deepest channels whose depth and age /metrics shows",
    ),
]
_FLAGS = {"migrate", "access-log", "auth"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env_name(option: str) -> str:
    return "LINGER_" + option.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linger",
        description="Linger: message queue and pub-sub service with a REST HTTP API.",
        epilog="Every option can also be set by its LINGER_<NAME> environment variable or "
        "in the TOML file given by --config (keys as the option names); the command line "
        "wins over the environment, which wins over the file. Other commands, each with "
        "its own --help: linger token create|list|revoke (access tokens, on the server's "
        "database); linger send|recv|peek|stats|redrive|drain (a client of a running "
        "server, --url and --token).",
    )
    parser.add_argument("--version", action="version", version=f"linger {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (env: LINGER_CONFIG)")
    for option, type_, default, text in _OPTIONS:
        help_text = f"{text} (default: {default}; env: {_env_name(option)})"
        if option in _FLAGS:
            parser.add_argument(
                f"--{option}", nargs="?", const="true", type=type_, metavar="BOOL", help=help_text
            )
        else:
            parser.add_argument(
                f"--{option}", type=type_, metavar=option.upper().replace("-", "_"), help=help_text
            )
    return parser


def _load_config(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read config file {path}: {error}") from None
    return {str(key).replace("_", "-"): value for key, value in data.items()}


def parse_settings(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Settings from the command line, then LINGER_* variables, then the config file.
    Exits with status 2 and a one-line message on a bad value."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    environ = dict(os.environ if environ is None else environ)
    config_path = args.pop("config") or environ.get("LINGER_CONFIG")
    try:
        config = _load_config(config_path) if config_path else {}
    except ValueError as error:
        parser.error(str(error))
    known = {option for option, *_ in _OPTIONS}
    for key in config.keys() - known:
        parser.error(f"unknown key {key!r} in config file {config_path}")
    values: dict[str, Any] = {}
    for option, type_, default, _text in _OPTIONS:
        name = option.replace("-", "_")
        value, source = args[name], f"--{option}"
        if value is None and _env_name(option) in environ:
            value, source = environ[_env_name(option)], _env_name(option)
        elif value is None and option in config:
            value, source = config[option], f"{option} in {config_path}"
        if value is None:
            values[name] = default
            continue
        try:
            values[name] = type_(value)
        except (TypeError, ValueError):
            parser.error(
                f"invalid value for {source}: {value!r} "
                f"(expected {getattr(type_, '__name__', 'text')})"
            )
    if values["dbfile"] and values["db"]:
        parser.error("--dbfile and --db cannot be used together")
    dbfile, db = values.pop("dbfile"), values.pop("db")
    database = sqlite_url(str(Path(dbfile).absolute())) if dbfile else db or _DEFAULTS.db
    settings = Settings(db=database, **values)
    if settings.auth and settings.in_memory:
        parser.error(
            "--auth needs a database that `linger token` can reach (--dbfile or --db): "
            "tokens cannot be created in another process's in-memory database"
        )
    if settings.workers > 1 and settings.in_memory:
        parser.error(
            "--workers needs a database the processes share (--dbfile or --db): "
            "the in-memory database lives in one process"
        )
    return settings


class _MalformedRequestFilter(logging.Filter):
    """aiohttp answers a request it cannot parse with 400 and logs a traceback: that is the
    client's fault, not the server's, so it is not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        from linger import tokencli

        tokencli.main(argv[1:])
        return
    if argv[:1] in (["send"], ["recv"], ["peek"], ["stats"], ["redrive"], ["drain"]):
        from linger.client import cli as client_cli

        client_cli.main(argv)
        return
    settings = parse_settings(argv)
    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("aiohttp.server").addFilter(_MalformedRequestFilter())
    if settings.workers > 1:
        from linger.workers import supervise

        supervise(settings)
    else:
        from linger.app import run

        run(settings)
