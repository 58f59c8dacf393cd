"""Search: saved searches with their sources, status and usage; full-text search over history.

The `history` search provider finds the user's own past chat messages and searches. Both tables get
a generated `tsvector` column (kept in step with the text by PostgreSQL) with a GIN index. The
'english' configuration stems words ("trips" finds "trip"); the text indexed is capped so a huge
message costs a bounded amount and can never exceed the tsvector size limit.

Revision ID: 0004_search
Revises: 0003_preferences
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0004_search"
down_revision: str | None = "0003_preferences"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
UUID = pg.UUID(as_uuid=True)
INDEXED_CHARS = 100_000


def upgrade() -> None:
    op.create_table(
        "search_queries",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("query", sa.Text, nullable=False),
        sa.Column("summary", sa.Text, nullable=False, server_default=""),
        # [{"index": 1, "title": ..., "url": ..., "snippet": ..., "provider": ...}, ...]
        sa.Column("sources", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("providers", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False, server_default=""),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("usage_estimated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("error_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("client_request_id", UUID),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column(
            "search_vector",
            pg.TSVECTOR,
            sa.Computed(
                f"to_tsvector('english'::regconfig, left(query || ' ' || summary, {INDEXED_CHARS}))",
                persisted=True,
            ),
            nullable=False,
        ),
        sa.CheckConstraint("status IN ('running', 'completed', 'cancelled', 'failed')", name="status"),
    )
    op.create_index(
        "ix_search_queries_user_created",
        "search_queries",
        ["user_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_index(
        "uq_search_queries_user_client_request_id",
        "search_queries",
        ["user_id", "client_request_id"],
        unique=True,
        postgresql_where=sa.text("client_request_id IS NOT NULL"),
    )
    op.create_index(
        "ix_search_queries_search_vector", "search_queries", ["search_vector"], postgresql_using="gin"
    )

    op.add_column(
        "messages",
        sa.Column(
            "search_vector",
            pg.TSVECTOR,
            # Chat checkpoints rewrite a generating reply several times a second; index it once it
            # is final (history search skips generating rows anyway).
            sa.Computed(
                "CASE WHEN status = 'generating' THEN ''::tsvector "
                f"ELSE to_tsvector('english'::regconfig, left(content, {INDEXED_CHARS})) END",
                persisted=True,
            ),
            nullable=False,
        ),
    )
    op.create_index("ix_messages_search_vector", "messages", ["search_vector"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("ix_messages_search_vector", table_name="messages")
    op.drop_column("messages", "search_vector")
    op.drop_table("search_queries")
