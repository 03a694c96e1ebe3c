"""Initial schema: messages, channels, subscriptions and the server id.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("channel", sa.String(250), nullable=False),
        sa.Column("priority", sa.BigInteger, nullable=False),
        sa.Column("timeout", sa.BigInteger, nullable=False),
        sa.Column("deliver", sa.BigInteger, nullable=False),
        sa.Column("linger", sa.BigInteger, nullable=False),
        sa.Column("topic", sa.String(250), nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("visible_at", sa.BigInteger, nullable=False),
        sa.Column("dead_at", sa.BigInteger, nullable=True),
        sa.Column("deliveries", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sqlite_autoincrement=True,
        postgresql_with={
            "fillfactor": 80,
            "autovacuum_vacuum_scale_factor": 0.0,
            "autovacuum_vacuum_threshold": 1000,
            "autovacuum_vacuum_insert_scale_factor": 0.0,
            "autovacuum_vacuum_insert_threshold": 10000,
            "autovacuum_vacuum_cost_delay": 0,
        },
    )
    op.create_index("ix_messages_channel_priority_id", "messages", ["channel", "priority", "id"])
    op.create_index("ix_messages_dead_at", "messages", ["dead_at"])
    op.create_table(
        "channels",
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("polled_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_channels"),
    )
    op.create_table(
        "subscriptions",
        sa.Column("topic", sa.String(250), nullable=False),
        sa.Column("channel", sa.String(250), nullable=False),
        sa.Column("priority", sa.BigInteger, nullable=False),
        sa.Column("timeout", sa.BigInteger, nullable=False),
        sa.Column("deliver", sa.BigInteger, nullable=False),
        sa.Column("linger", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("topic", "channel", name="pk_subscriptions"),
    )
    op.create_index("ix_subscriptions_channel", "subscriptions", ["channel"])
    op.create_table(
        "server",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_server"),
    )


def downgrade() -> None:
    op.drop_table("server")
    op.drop_index("ix_subscriptions_channel", table_name="subscriptions")
    op.drop_table("subscriptions")
    op.drop_table("channels")
    op.drop_index("ix_messages_dead_at", table_name="messages")
    op.drop_index("ix_messages_channel_priority_id", table_name="messages")
    op.drop_table("messages")
