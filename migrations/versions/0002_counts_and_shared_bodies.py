"""Per-channel message counts, published bodies stored once, the dead-row index.

- ``channels.messages``: the rows each channel holds, kept by every change to them, so
  that the high-level mark is one row read instead of a count of the channel.
- ``bodies`` and ``messages.body_id``: a body published to many channels is stored once.
- ``ix_messages_dead_at`` becomes ``(dead_at, channel)``, of the rows that have a
  ``dead_at`` only: the dead rows of one channel are counted from the index alone, and
  messages that can never die cost it nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column(
        "channels", sa.Column("messages", sa.BigInteger, nullable=False, server_default="0")
    )
    op.execute(
        "UPDATE channels SET messages = "
        "(SELECT count(*) FROM messages WHERE messages.channel = channels.name)"
    )
    op.execute(
        "INSERT INTO channels (name, polled_at, messages) "
        "SELECT channel, 0, count(*) FROM messages "
        "WHERE channel NOT IN (SELECT name FROM channels) GROUP BY channel"
    )
    op.create_table(
        "bodies",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("refs", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bodies"),
        sqlite_autoincrement=True,
    )
    op.add_column("messages", sa.Column("body_id", sa.BigInteger, nullable=True))
    op.drop_index("ix_messages_dead_at", table_name="messages")
    op.create_index(
        "ix_messages_dead_at_channel",
        "messages",
        ["dead_at", "channel"],
        sqlite_where=sa.text("dead_at IS NOT NULL"),
        postgresql_where=sa.text("dead_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_dead_at_channel", table_name="messages")
    op.create_index("ix_messages_dead_at", "messages", ["dead_at"])
    # Every copy gets its body back before the shared ones go.
    op.execute(
        "UPDATE messages SET body = (SELECT body FROM bodies WHERE bodies.id = messages.body_id) "
        "WHERE body_id IS NOT NULL"
    )
    # A plain DROP COLUMN on both backends: SQLite's batch mode would rebuild the table and
    # lose its AUTOINCREMENT, and with it the promise that ids are never reused.
    op.execute("ALTER TABLE messages DROP COLUMN body_id")
    op.drop_table("bodies")
    op.execute("ALTER TABLE channels DROP COLUMN messages")
