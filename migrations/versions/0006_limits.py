"""Limits that hold across replicas: rate-limit windows, daily usage quotas, sign-in throttling.

Every counter is updated with one atomic statement (INSERT ... ON CONFLICT DO UPDATE ... RETURNING),
so two replicas can never both let the last request through.

Revision ID: 0006_limits
Revises: 0005_images
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0006_limits"
down_revision: str | None = "0005_images"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Fixed windows: one row per (key, window start). Keys name the subject, e.g. "rpc:<user>:chat".
    op.create_table(
        "rate_limit_windows",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("window_start", TS, primary_key=True),
        sa.Column("hits", sa.Integer, nullable=False),
    )
    op.create_index("ix_rate_limit_windows_start", "rate_limit_windows", ["window_start"])

    # Daily quotas per user and kind ("chat_tokens", "searches", "images"), days in UTC.
    op.create_table(
        "usage_counters",
        sa.Column(
            "user_id", pg.UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("amount", sa.BigInteger, nullable=False),
    )

    # Failed sign-ins per account and per client address, with exponential back-off.
    op.create_table(
        "auth_throttle",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("blocked_until", TS),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("auth_throttle")
    op.drop_table("usage_counters")
    op.drop_table("rate_limit_windows")
