"""Database.transaction (and driver_transaction, its form without an ORM session) with a caller:
BEGIN, the RLS caller and the session check go out in one round trip, and the transaction still
behaves as one (commit, rollback, nothing left on the connection)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import jwt
import pytest
from sqlalchemy import text

from everything_server import errors
from everything_server.db import Database


@pytest.fixture
async def one_connection(database_url):
    """A pool of exactly one connection, so every transaction reuses the previous one's connection."""
    db = Database(database_url, pool_size=1, max_overflow=0)
    yield db
    await db.dispose()


def _ids(user) -> tuple[uuid.UUID, uuid.UUID]:
    claims = jwt.decode(user.access_token, options={"verify_signature": False})
    return uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"])


@pytest.fixture(params=["session", "driver"])
def begin(request, one_connection):
    """A caller's transaction: through an ORM session, or on the driver connection."""
    return one_connection.transaction if request.param == "session" else one_connection.driver_transaction


async def _scalar(unit, sql: str):
    if isinstance(unit, asyncpg.Connection):
        return await unit.fetchval(sql)
    return (await unit.execute(text(sql))).scalar()


async def _run(unit, sql: str) -> None:
    if isinstance(unit, asyncpg.Connection):
        await unit.execute(sql)
    else:
        await unit.execute(text(sql))


async def _nothing_left_open(db: Database) -> None:
    async with db.transaction() as s:
        assert await _scalar(s, "SELECT coalesce(current_setting('app.user_id', true), '')") == ""
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert not raw.driver_connection.is_in_transaction()


async def test_the_caller_is_set_for_the_transaction_only(one_connection, begin, user):
    db = one_connection
    uid, sid = _ids(user)
    async with begin(uid, sid) as s:
        assert await _scalar(s, "SELECT current_setting('app.user_id', true)") == str(uid)
        first = await _scalar(s, "SELECT now()")
        await asyncio.sleep(0.02)
        # One transaction: now() is the transaction's start time.
        assert await _scalar(s, "SELECT now()") == first
        assert await _scalar(s, "SELECT pg_current_xact_id() IS NOT NULL")
    async with db.transaction() as s:
        assert await _scalar(s, "SELECT coalesce(current_setting('app.user_id', true), '')") == ""
        assert await _scalar(s, "SELECT now()") != first


async def test_an_ended_session_is_refused_and_leaves_nothing_open(one_connection, begin, user):
    uid, _ = _ids(user)
    with pytest.raises(errors.Unauthenticated) as err:
        async with begin(uid, uuid.uuid4()):
            raise AssertionError("the body must not run")
    assert err.value.reason == "SESSION_REVOKED"
    # The same (only) connection is usable, outside any transaction, with no caller left on it.
    await _nothing_left_open(one_connection)


@pytest.mark.parametrize("error", [RuntimeError("boom"), errors.NotFound("thread", "x")])
async def test_an_error_in_the_body_rolls_the_work_back(one_connection, begin, user, error):
    db = one_connection
    uid, sid = _ids(user)
    name = f"caller_tx_{uuid.uuid4().hex[:8]}"
    with pytest.raises(type(error)):
        async with begin(uid, sid) as s:
            await _run(s, f"CREATE TABLE {name} (x int)")
            raise error
    await _nothing_left_open(db)
    async with begin(uid, sid) as s:
        assert await _scalar(s, f"SELECT to_regclass('{name}')") is None
        await _run(s, f"CREATE TABLE {name} (x int)")
    async with db.transaction() as s:
        assert await _scalar(s, f"SELECT to_regclass('{name}') IS NOT NULL")
        await _run(s, f"DROP TABLE {name}")


async def test_a_cancelled_body_rolls_back_and_leaves_the_pool_usable(one_connection, begin, user):
    db = one_connection
    uid, sid = _ids(user)
    name = f"caller_tx_{uuid.uuid4().hex[:8]}"
    started = asyncio.Event()

    async def body():
        async with begin(uid, sid) as s:
            await _run(s, f"CREATE TABLE {name} (x int)")
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _nothing_left_open(db)
    async with db.transaction() as s:
        assert await _scalar(s, f"SELECT to_regclass('{name}')") is None


async def test_a_user_only_transaction_sets_the_caller_without_a_session_check(one_connection, begin):
    uid = uuid.uuid4()
    async with begin(uid) as s:
        assert await _scalar(s, "SELECT current_setting('app.user_id', true)") == str(uid)


async def test_the_one_round_trip_path_is_the_one_taken(one_connection, user, monkeypatch):
    """If SQLAlchemy's adapter changes so that the shortcut no longer applies, this says so (the
    transactions above would still pass, on the slower path)."""
    from everything_server.db import database

    taken = []
    original = database._begin_as_caller

    async def spy(*args):
        taken.append(await original(*args))
        return taken[-1]

    monkeypatch.setattr(database, "_begin_as_caller", spy)
    uid, sid = _ids(user)
    async with one_connection.transaction(uid, sid) as s:
        assert await _scalar(s, "SELECT current_setting('app.user_id', true)") == str(uid)
    # Also on a connection that served an AUTOCOMMIT statement (the checkpointer's): SQLAlchemy
    # sets its isolation level back to "read_committed" when it returns to the pool.
    async with one_connection.autocommit() as conn:
        await conn.execute(text("SELECT 1"))
    async with one_connection.transaction(uid, sid) as s:
        assert await _scalar(s, "SELECT current_setting('transaction_isolation')") == "read committed"
    assert taken == [True, True]


async def test_a_pool_that_stays_busy_answers_unavailable_not_internal(database_url, user):
    """Every connection busy for the pool's whole timeout (a process past what its connections
    serve) is DATABASE_BUSY, a retryable UNAVAILABLE with a delay, on both kinds of transaction."""
    db = Database(database_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    user_id, session_id = _ids(user)
    try:
        async with db.transaction():  # holds the only connection
            for begin in (db.transaction, lambda: db.driver_transaction(user_id, session_id)):
                with pytest.raises(errors.Unavailable) as caught:
                    async with begin():
                        pass
                assert caught.value.reason == "DATABASE_BUSY" and caught.value.retry_after
        async with db.driver_transaction(user_id, session_id) as conn:  # and free again after
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.dispose()


async def test_the_pool_queue_knows_who_waits_for_a_connection_and_for_how_long(database_url, user):
    db = Database(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    user_id, session_id = _ids(user)
    try:
        assert len(db.queue) == 0 and db.queue.oldest_wait() == 0.0
        async with db.transaction():  # holds the only connection
            waiters = [
                asyncio.create_task(_briefly(db.driver_transaction(user_id, session_id))),
                asyncio.create_task(_briefly(db.transaction(user_id, session_id))),
            ]
            await asyncio.sleep(0.3)
            assert len(db.queue) == 2 and 0.25 <= db.queue.oldest_wait() < 5
        await asyncio.gather(*waiters)
        assert len(db.queue) == 0 and db.queue.oldest_wait() == 0.0
    finally:
        await db.dispose()


async def _briefly(unit) -> None:
    async with unit:
        pass


async def test_while_callers_queue_for_a_connection_health_reads_the_last_revision(database_url):
    """A loaded process's health check must not wait in the pool's queue (and time out into
    NOT_SERVING): while others queue, every connection is in use, so the database is there."""
    db = Database(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        revision = await db.current_revision()
        assert revision is not None  # the test database is migrated
        async with db.transaction():  # holds the only connection
            waiter = asyncio.create_task(_briefly(db.transaction()))
            await asyncio.sleep(0.1)
            assert len(db.queue) == 1
            assert await asyncio.wait_for(db.current_revision(), 1) == revision
        await waiter
        assert await db.current_revision() == revision  # read again once the queue is gone
    finally:
        await db.dispose()
