"""Images: generated image records and their bytes (kept apart so listings never load bytes).

One GenerateImage request makes `count` rows sharing its client_request_id, told apart by
request_index; the partial unique index makes a retried request find the rows of the first one.

Revision ID: 0005_images
Revises: 0004_search
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0005_images"
down_revision: str | None = "0004_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
UUID = pg.UUID(as_uuid=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("revised_prompt", sa.Text, nullable=False, server_default=""),
        sa.Column("size", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False, server_default=""),
        sa.Column("byte_size", sa.BigInteger, nullable=False, server_default="0"),
        # Which ImageStore holds the bytes and under what key ("postgres" = the image_blobs row).
        sa.Column("storage_key", sa.Text, nullable=False, server_default=""),
        sa.Column("error_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("client_request_id", UUID),
        sa.Column("request_index", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("status IN ('generating', 'completed', 'failed')", name="status"),
    )
    op.create_index(
        "ix_images_user_created", "images", ["user_id", sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "uq_images_user_client_request_id",
        "images",
        ["user_id", "client_request_id", "request_index"],
        unique=True,
        postgresql_where=sa.text("client_request_id IS NOT NULL"),
    )

    op.create_table(
        "image_blobs",
        sa.Column("image_id", UUID, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("image_blobs")
    op.drop_table("images")
