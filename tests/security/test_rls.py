"""Row-level security: with the application's owner filter gone, another user's rows are invisible
and cannot be written; the caller never leaks to the next user of a pooled connection; the app role
cannot escalate."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from everything_server.auth import repository as auth_repo
from everything_server.db import Database

APP_ROLE = "everything_app"


@pytest.fixture
def app_url(database_url, app) -> str:
    # The `app` fixture's server has already let the app role log in (development mode).
    return make_url(database_url).set(username=APP_ROLE, password=None).render_as_string(hide_password=False)


@pytest.fixture
async def app_conn(app_url):
    conn = await asyncpg.connect(app_url)
    yield conn
    await conn.close()


async def _thread(db_conn, owner: str) -> uuid.UUID:
    tid = uuid.uuid4()
    await db_conn.execute(
        "INSERT INTO threads (id, user_id, title) VALUES ($1, $2, 'secret plans')", tid, uuid.UUID(owner)
    )
    return tid


async def as_user(conn, user_id: str | None):
    if user_id is not None:
        await conn.execute("SELECT set_config('app.user_id', $1, true)", user_id)


async def test_without_an_owner_filter_only_the_callers_rows_are_visible(app_conn, db_conn, user, other_user):
    mine = await _thread(db_conn, user.id)
    await _thread(db_conn, other_user.id)
    async with app_conn.transaction():
        await as_user(app_conn, user.id)
        threads = await app_conn.fetch("SELECT id, user_id FROM threads")
        assert [r["id"] for r in threads] == [mine]
        assert [r["id"] for r in await app_conn.fetch("SELECT id FROM users")] == [uuid.UUID(user.id)]
        owners = {r["user_id"] for r in await app_conn.fetch("SELECT user_id FROM sessions")}
        assert owners == {uuid.UUID(user.id)}
    # Nobody set: nothing at all.
    async with app_conn.transaction():
        assert await app_conn.fetchval("SELECT count(*) FROM users") == 0
        assert await app_conn.fetchval("SELECT count(*) FROM threads") == 0


async def test_another_users_rows_cannot_be_inserted_updated_or_deleted(app_conn, db_conn, user, other_user):
    theirs = await _thread(db_conn, other_user.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await as_user(app_conn, user.id)
            await app_conn.execute(
                "INSERT INTO threads (id, user_id, title) VALUES ($1, $2, 'planted')",
                uuid.uuid4(),
                uuid.UUID(other_user.id),
            )
    async with app_conn.transaction():
        await as_user(app_conn, user.id)
        assert (
            await app_conn.execute("UPDATE threads SET title = 'hijacked' WHERE id = $1", theirs)
            == "UPDATE 0"
        )
        assert await app_conn.execute("DELETE FROM threads WHERE id = $1", theirs) == "DELETE 0"
        # Moving one's own row to someone else is refused too.
        mine = uuid.uuid4()
        await app_conn.execute(
            "INSERT INTO threads (id, user_id, title) VALUES ($1, $2, 'x')", mine, uuid.UUID(user.id)
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with app_conn.transaction():
            await as_user(app_conn, user.id)
            await app_conn.execute(
                "UPDATE threads SET user_id = $1 WHERE id = $2", uuid.UUID(other_user.id), mine
            )
    assert await db_conn.fetchval("SELECT title FROM threads WHERE id = $1", theirs) == "secret plans"


async def test_a_repository_query_for_someone_else_returns_nothing(app_url, user, other_user):
    db = Database(app_url, pool_size=1)
    try:
        async with db.transaction(uuid.UUID(user.id)) as session:
            assert await auth_repo.all_sessions(session, uuid.UUID(other_user.id)) == []
            assert await auth_repo.user_by_id(session, uuid.UUID(other_user.id)) is None
            assert len(await auth_repo.all_sessions(session, uuid.UUID(user.id))) == 1
    finally:
        await db.dispose()


async def test_a_cancelled_request_leaves_no_caller_on_the_pooled_connection(app_url, user):
    db = Database(app_url, pool_size=1, max_overflow=0)
    entered = asyncio.Event()

    async def request():
        async with db.transaction(uuid.UUID(user.id)) as session:
            await session.execute(text("SELECT count(*) FROM threads"))
            entered.set()
            await asyncio.sleep(30)

    try:
        task = asyncio.create_task(request())
        await asyncio.wait_for(entered.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The one pooled connection serves the next request, which set no caller.
        async with db.transaction() as session:
            setting = (await session.execute(text("SELECT current_setting('app.user_id', true)"))).scalar()
            assert setting in (None, "")
            assert (await session.execute(text("SELECT count(*) FROM users"))).scalar() == 0
    finally:
        await db.dispose()


async def test_the_app_role_cannot_escalate_or_bypass(app_conn):
    row = await app_conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    )
    assert tuple(row) == (False, False, False)
    assert await app_conn.fetchval("SELECT count(*) FROM pg_tables WHERE tableowner = current_user") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("SET ROLE postgres")
    await app_conn.execute("SET row_security = off")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await app_conn.fetch("SELECT * FROM users")
    await app_conn.execute("RESET row_security")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("CREATE TABLE sneaky (id int)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("ALTER TABLE users DISABLE ROW LEVEL SECURITY")


async def test_every_user_owned_table_forces_row_level_security(db_conn):
    rows = await db_conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               (SELECT count(*) FROM pg_policies p WHERE p.tablename = c.relname) AS policies
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r'
          AND (c.relname = 'users' OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                                              AND a.attname = 'user_id' AND NOT a.attisdropped))
        """
    )
    assert {"users", "sessions", "threads", "messages", "preferences", "search_queries", "images"} <= {
        r["relname"] for r in rows
    }
    for r in rows:
        assert r["relrowsecurity"] and r["relforcerowsecurity"], r["relname"]
        assert r["policies"] == 5, r["relname"]
