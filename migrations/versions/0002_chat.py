"""Chat: threads and messages (status, seq, branches, usage, feedback, idempotency keys).

Revision ID: 0002_chat
Revises: 0001_auth
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0002_chat"
down_revision: str | None = "0001_auth"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
UUID = pg.UUID(as_uuid=True)


def upgrade() -> None:
    op.create_table(
        "threads",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("title", sa.Text, nullable=False, server_default=""),
        sa.Column("title_generated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "ix_threads_user_updated", "threads", ["user_id", sa.text("updated_at DESC"), sa.text("id DESC")]
    )

    op.create_table(
        "messages",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("thread_id", UUID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
        # The owner, repeated here so ownership checks and row-level security need no join.
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("content", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("parent_message_id", UUID, sa.ForeignKey("messages.id", ondelete="CASCADE")),
        sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("model", sa.Text, nullable=False, server_default=""),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("usage_estimated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("error_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("client_message_id", UUID),
        sa.Column("feedback_rating", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("feedback_comment", sa.Text, nullable=False, server_default=""),
        sa.Column("feedback_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("role IN ('user', 'assistant')", name="role"),
        sa.CheckConstraint("status IN ('generating', 'completed', 'cancelled', 'failed')", name="status"),
    )
    op.create_index("ix_messages_thread_created", "messages", ["thread_id", "created_at", "id"])
    op.create_index("ix_messages_parent", "messages", ["parent_message_id"])
    op.create_index(
        "uq_messages_user_client_message_id",
        "messages",
        ["user_id", "client_message_id"],
        unique=True,
        postgresql_where=sa.text("client_message_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("threads")
