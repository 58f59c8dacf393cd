"""Row-level security, part 1: the application role, its grants, and the owner lookups.

Every table with a `user_id` column (and `users` by its `id`) gets RLS enabled and FORCED, with one
policy per command on `current_setting('app.user_id', true)`, which the server sets per transaction
with set_config(..., true). A query that forgets its owner filter sees nothing of anyone else's.

The server connects as `everything_app`: no superuser, no BYPASSRLS, owns nothing, may not create
anything. Migrations run as the owner. Paths that must find a row before anyone is signed in (sign
in, refresh, signed image URLs) go through SECURITY DEFINER functions that return only an owner id
for a secret handle; the rest of the work then runs as that user, under the policies. Because
FORCE ROW LEVEL SECURITY binds the table owner too, the owner (the migration role, which the server
never connects as) gets a policy of its own that lets it, and so those functions, see every row.

This revision creates the role, its grants and the functions; 0008 turns the policies on. A later
migration that adds a user-owned table calls `app_apply_row_level_security()` and
`app_grant_application_role()` again.

Revision ID: 0007_row_level_security
Revises: 0006_limits
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_row_level_security"
down_revision: str | None = "0006_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "everything_app"


def upgrade() -> None:
    op.execute(
        f"""
        DO $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            CREATE ROLE {APP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
          END IF;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_current_user_id() RETURNS uuid
        LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('app.user_id', true), '')::uuid $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_apply_row_level_security() RETURNS void LANGUAGE plpgsql AS $fn$
        DECLARE
          t record;
          owner_column text;
        BEGIN
          FOR t IN
            SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind = 'r'
              AND (c.relname = 'users' OR EXISTS (
                SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped))
          LOOP
            owner_column := CASE WHEN t.name = 'users' THEN 'id' ELSE 'user_id' END;
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.name);
            EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t.name);
            EXECUTE format('DROP POLICY IF EXISTS owner_select ON %I', t.name);
            EXECUTE format('DROP POLICY IF EXISTS owner_insert ON %I', t.name);
            EXECUTE format('DROP POLICY IF EXISTS owner_update ON %I', t.name);
            EXECUTE format('DROP POLICY IF EXISTS owner_delete ON %I', t.name);
            EXECUTE format('DROP POLICY IF EXISTS schema_owner_all ON %I', t.name);
            -- FORCE makes the owner obey the policies too; the SECURITY DEFINER lookups run as the
            -- owner, so it (and only it, a role the server never connects as) may see every row.
            EXECUTE format('CREATE POLICY schema_owner_all ON %I TO %I USING (true) WITH CHECK (true)',
                           t.name, current_user);
            EXECUTE format('CREATE POLICY owner_select ON %I FOR SELECT USING (%I = app_current_user_id())',
                           t.name, owner_column);
            EXECUTE format('CREATE POLICY owner_insert ON %I FOR INSERT WITH CHECK (%I = app_current_user_id())',
                           t.name, owner_column);
            EXECUTE format('CREATE POLICY owner_update ON %I FOR UPDATE USING (%I = app_current_user_id()) '
                           'WITH CHECK (%I = app_current_user_id())', t.name, owner_column, owner_column);
            EXECUTE format('CREATE POLICY owner_delete ON %I FOR DELETE USING (%I = app_current_user_id())',
                           t.name, owner_column);
          END LOOP;
        END
        $fn$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION app_grant_application_role() RETURNS void LANGUAGE plpgsql AS $fn$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            EXECUTE 'GRANT USAGE ON SCHEMA public TO {APP_ROLE}';
            EXECUTE 'REVOKE CREATE ON SCHEMA public FROM {APP_ROLE}';
            EXECUTE 'REVOKE CREATE ON SCHEMA public FROM PUBLIC';
            EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE}';
            EXECUTE 'REVOKE ALL ON alembic_version FROM {APP_ROLE}';
            EXECUTE 'GRANT SELECT ON alembic_version TO {APP_ROLE}';
            EXECUTE 'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}';
            EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {APP_ROLE}';
            EXECUTE 'REVOKE EXECUTE ON FUNCTION app_apply_row_level_security() FROM {APP_ROLE}, PUBLIC';
            EXECUTE 'REVOKE EXECUTE ON FUNCTION app_grant_application_role() FROM {APP_ROLE}, PUBLIC';
          END IF;
        END
        $fn$
        """
    )
    # Owner lookups for the paths that run before anyone is signed in. Each answers only "whose is
    # this handle", never the row itself.
    op.execute(
        """
        CREATE FUNCTION app_user_id_by_email(p_email text) RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
          SELECT id FROM users WHERE email = p_email
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_user_id_by_refresh_token(p_hash bytea) RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
          SELECT user_id FROM refresh_tokens WHERE token_hash = p_hash
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_user_id_by_image(p_image_id uuid) RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
          SELECT user_id FROM images WHERE id = p_image_id
        $$
        """
    )
    op.execute("SELECT app_grant_application_role()")


def downgrade() -> None:
    for fn in (
        "app_user_id_by_image(uuid)",
        "app_user_id_by_refresh_token(bytea)",
        "app_user_id_by_email(text)",
        "app_grant_application_role()",
        "app_apply_row_level_security()",
        "app_current_user_id()",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {fn}")
    op.execute(
        f"""
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {APP_ROLE}';
            EXECUTE 'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {APP_ROLE}';
            EXECUTE 'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {APP_ROLE}';
            EXECUTE 'REVOKE ALL ON SCHEMA public FROM {APP_ROLE}';
          END IF;
        END $$
        """
    )
