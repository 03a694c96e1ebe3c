"""Settings: one frozen dataclass, built by the CLI (or tests) and passed in."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa

DEFAULT_DB = "sqlite+aiosqlite://"
# URL query parameters whose values are hidden wherever the URL is shown.
_SECRET_KEY = re.compile(r"pass|secret|token|key", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8989
    db: str = DEFAULT_DB
    hlm: int = 0
    max_size: int = 262_144
    poll_max: float = 120.0
    max_waiters: int = 20_000
    poll_interval: float = 1.0
    sweep_interval: float = 1.0
    sqlite_sync: str = "FULL"
    sqlite_busy_timeout: float = 10.0
    migrate: bool = False
    access_log: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_channels: int = 1000
    workers: int = 1
    # 0: what the open-files limit allows.
    max_connections: int = 0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_batch: int = 1000
    max_batch_bytes: int = 16 * 1024 * 1024
    # Copies one batch publish may write (messages x subscribed channels), about as long
    # as the largest batch add holds the writer.
    max_copies: int = 10_000
    # Bearer tokens from the database on every route but /health and /ready.
    auth: bool = False
    # Peers whose X-Forwarded-For is believed (who the client is, for --auth's budget of
    # failures and its log lines): comma-separated addresses or networks.
    trusted_proxies: str = "127.0.0.1,::1"

    @property
    def in_memory(self) -> bool:
        return is_memory_sqlite(sa.make_url(self.db))

    @property
    def db_display(self) -> str:
        """The database in use, every secret hidden (the password, and query parameters
        that may carry one, such as ``?password=`` or ``?sslpassword=``)."""
        url = sa.make_url(self.db)
        if url.get_backend_name() == "sqlite":
            return url.database or ":memory:"
        shown = url.set(query={}).render_as_string(hide_password=True)
        pairs = [
            f"{key}={'***' if _SECRET_KEY.search(key) else value}"
            for key, values in url.query.items()
            for value in ((values,) if isinstance(values, str) else values)
        ]
        return shown + ("?" + "&".join(pairs) if pairs else "")


def is_memory_sqlite(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_url(path: str) -> str:
    return f"sqlite+aiosqlite:///{path}"
