"""Indexes for monitoring reads that never scan the table.

- ``ix_messages_priority``: the messages whose priority is not 0, for /stats' urgent and
  niced counts. Most messages have priority 0: the index holds only the others, so
  counting them reads that many entries, and adds of priority 0 do not write to it.
- ``ix_messages_queue`` gains ``created_at``: the age of a channel's oldest queued message
  is read from the index alone (the claim still reads it in (priority, id) order).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_QUEUE = ("channel", "priority", "id")


def _queue_index(columns: Sequence[str]) -> None:
    op.drop_index("ix_messages_queue", table_name="messages")
    op.create_index(
        "ix_messages_queue",
        "messages",
        list(columns),
        sqlite_where=sa.text("visible_at = 0"),
        postgresql_where=sa.text("visible_at = 0"),
    )


def upgrade() -> None:
    _queue_index((*_QUEUE, "created_at"))
    op.create_index(
        "ix_messages_priority",
        "messages",
        ["priority"],
        sqlite_where=sa.text("priority != 0"),
        postgresql_where=sa.text("priority <> 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_priority", table_name="messages")
    _queue_index(_QUEUE)
