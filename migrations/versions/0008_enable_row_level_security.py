"""Row-level security, part 2: enable and FORCE it on every user-owned table, with owner policies.

See 0007 for the role, the functions and why the schema owner has a policy of its own.

Revision ID: 0008_enable_row_level_security
Revises: 0007_row_level_security
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_enable_row_level_security"
down_revision: str | None = "0007_row_level_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SELECT app_apply_row_level_security()")


def downgrade() -> None:
    op.execute(
        """
        DO $$
        DECLARE t record;
        BEGIN
          FOR t IN SELECT DISTINCT tablename FROM pg_policies WHERE schemaname = 'public' LOOP
            EXECUTE format('DROP POLICY IF EXISTS owner_select ON %I', t.tablename);
            EXECUTE format('DROP POLICY IF EXISTS owner_insert ON %I', t.tablename);
            EXECUTE format('DROP POLICY IF EXISTS owner_update ON %I', t.tablename);
            EXECUTE format('DROP POLICY IF EXISTS owner_delete ON %I', t.tablename);
            EXECUTE format('DROP POLICY IF EXISTS schema_owner_all ON %I', t.tablename);
            EXECUTE format('ALTER TABLE %I NO FORCE ROW LEVEL SECURITY', t.tablename);
            EXECUTE format('ALTER TABLE %I DISABLE ROW LEVEL SECURITY', t.tablename);
          END LOOP;
        END $$
        """
    )
