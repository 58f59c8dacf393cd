"""Searches and images whose replica died: a sweeper marks them FAILED.

Chat replies carry a lease; searches and images are short, so instead a record still RUNNING or
GENERATING long after any legitimate run could last (the caller passes the age) is failed with reason
SHUTTING_DOWN. The application role cannot see other users' rows, so this runs as the schema owner
(SECURITY DEFINER) and returns only a count.

Revision ID: 0009_stale_work
Revises: 0008_enable_row_level_security
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_stale_work"
down_revision: str | None = "0008_enable_row_level_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION app_fail_stale_work(p_older_than_seconds double precision) RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
        DECLARE
          searches integer;
          images integer;
        BEGIN
          UPDATE search_queries SET status = 'failed', error_reason = 'SHUTTING_DOWN', updated_at = now()
          WHERE status = 'running' AND updated_at < now() - make_interval(secs => p_older_than_seconds);
          GET DIAGNOSTICS searches = ROW_COUNT;
          UPDATE images SET status = 'failed', error_reason = 'SHUTTING_DOWN', updated_at = now()
          WHERE status = 'generating' AND updated_at < now() - make_interval(secs => p_older_than_seconds);
          GET DIAGNOSTICS images = ROW_COUNT;
          RETURN searches + images;
        END
        $$
        """
    )
    op.execute("SELECT app_grant_application_role()")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS app_fail_stale_work(double precision)")
