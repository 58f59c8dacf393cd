"""Rate-limit windows are UNLOGGED: counting a call no longer waits for a WAL flush.

Every authenticated call counts itself in `rate_limit_windows` with one autocommit upsert before
its handler runs. On a logged table that commit waits for the WAL to reach the disk, which
measured 0.3-1.3 ms of every call's latency (and of every reply's first token). A transaction that
writes only to unlogged tables writes no WAL to wait for.

What it costs: after a crash of PostgreSQL the table starts empty, and a standby does not have it,
so after a crash or a failover every user's current one-minute window starts again from zero. The
counts are short-lived and are not data anyone keeps; the daily quotas (`usage_counters`) and the
sign-in back-off (`auth_throttle`) stay logged.

Revision ID: 0011_unlogged_rate_limits
Revises: 0010_chat_checkpoints
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011_unlogged_rate_limits"
down_revision: str | None = "0010_chat_checkpoints"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE rate_limit_windows SET UNLOGGED")


def downgrade() -> None:
    op.execute("ALTER TABLE rate_limit_windows SET LOGGED")
