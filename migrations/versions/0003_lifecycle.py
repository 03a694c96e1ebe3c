"""Message lifecycle: leases, delays, dead-letter channels, and a claim index without the
messages in flight.

- ``messages.lease``: the current delivery's lease (set by each delivery); messages that
  are delivered when this runs get lease 0, so that they count as in flight.
- ``messages.dead`` (the option), ``dead_from``, ``dead_reason``, ``origin_deliver``,
  ``origin_linger`` (a dead letter's origin, for a redrive).
- ``subscriptions.delay`` and ``subscriptions.dead``: the new options of a subscription.
- ``ix_messages_channel_priority_id`` becomes ``ix_messages_queue`` (queued messages
  only, ``visible_at = 0``) and ``ix_messages_parked`` (``(visible_at, channel)`` of the
  others): a claim no longer steps over the messages in flight.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = sa.String(250)


def upgrade() -> None:
    for column in (
        sa.Column("lease", sa.BigInteger, nullable=True),
        sa.Column("dead", _NAME, nullable=True),
        sa.Column("dead_from", _NAME, nullable=True),
        sa.Column("dead_reason", sa.String(16), nullable=True),
        sa.Column("origin_deliver", sa.BigInteger, nullable=True),
        sa.Column("origin_linger", sa.BigInteger, nullable=True),
    ):
        op.add_column("messages", column)
    op.execute("UPDATE messages SET lease = 0 WHERE visible_at > 0 AND deliveries > 0")
    op.add_column(
        "subscriptions", sa.Column("delay", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column("subscriptions", sa.Column("dead", _NAME, nullable=True))
    op.drop_index("ix_messages_channel_priority_id", table_name="messages")
    op.create_index(
        "ix_messages_queue",
        "messages",
        ["channel", "priority", "id"],
        sqlite_where=sa.text("visible_at = 0"),
        postgresql_where=sa.text("visible_at = 0"),
    )
    op.create_index(
        "ix_messages_parked",
        "messages",
        ["visible_at", "channel"],
        sqlite_where=sa.text("visible_at > 0"),
        postgresql_where=sa.text("visible_at > 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_parked", table_name="messages")
    op.drop_index("ix_messages_queue", table_name="messages")
    op.create_index("ix_messages_channel_priority_id", "messages", ["channel", "priority", "id"])
    # Dead letters stay where they are, as ordinary messages of their dead channel.
    # Plain DROP COLUMN on both backends (see 0002: batch mode would lose AUTOINCREMENT).
    for column in ("dead", "delay"):
        op.execute(f"ALTER TABLE subscriptions DROP COLUMN {column}")
    for column in ("origin_linger", "origin_deliver", "dead_reason", "dead_from", "dead", "lease"):
        op.execute(f"ALTER TABLE messages DROP COLUMN {column}")
