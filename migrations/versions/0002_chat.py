"""Chat: threads, messages (status, event seq, branches, usage, feedback, idempotency keys, a lease for
generations in flight) and the coalesced event log that lets a reply be replayed from any seq.

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

    # Conversation order: `position` grows with every insert; `turn` is the position of the user
    # message a row belongs to (its own for a user message, its parent's for a reply), so a
    # regenerated reply sorts next to its siblings, not after later messages.
    op.execute("CREATE SEQUENCE messages_position_seq AS bigint")
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
        sa.Column(
            "position",
            sa.BigInteger,
            nullable=False,
            server_default=sa.text("nextval('messages_position_seq')"),
        ),
        sa.Column("turn", sa.BigInteger, nullable=False),
        # seq of the last stored stream event (see message_events).
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
        # While GENERATING: the replica running the generation pushes this forward at every
        # checkpoint and heartbeat. Past it, nobody runs the generation any more (the replica died)
        # and whoever looks marks the message FAILED.
        sa.Column("lease_expires_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.CheckConstraint("role IN ('user', 'assistant')", name="role"),
        sa.CheckConstraint("status IN ('generating', 'completed', 'cancelled', 'failed')", name="status"),
        sa.CheckConstraint("(role = 'assistant') = (parent_message_id IS NOT NULL)", name="parent"),
    )
    op.execute("ALTER SEQUENCE messages_position_seq OWNED BY messages.position")
    op.create_index("ix_messages_thread_turn", "messages", ["thread_id", "turn", "position"])
    op.create_index("ix_messages_parent", "messages", ["parent_message_id", "position"])
    op.create_index(
        "ix_messages_generating",
        "messages",
        ["thread_id"],
        postgresql_where=sa.text("status = 'generating'"),
    )
    op.create_index(
        "uq_messages_user_client_message_id",
        "messages",
        ["user_id", "client_message_id"],
        unique=True,
        postgresql_where=sa.text("client_message_id IS NOT NULL"),
    )

    # The stream events of assistant messages, coalesced: one row per checkpoint (every few hundred
    # milliseconds while generating), never one per token. `data` is a compact JSON array of the
    # events seq_first..seq_last (see everything_server.chat.events).
    op.create_table(
        "message_events",
        sa.Column("message_id", UUID, sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq_first", sa.BigInteger, primary_key=True),
        sa.Column("seq_last", sa.BigInteger, nullable=False),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("seq_last >= seq_first", name="seq_range"),
    )


def downgrade() -> None:
    op.drop_table("message_events")
    op.drop_table("messages")
    op.drop_table("threads")
