"""Database.transaction with a caller: BEGIN, the RLS caller and the session check go out in one round
trip, and the transaction still behaves as one (commit, rollback, nothing left on the connection)."""

from __future__ import annotations

import asyncio
import uuid

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


async def _scalar(session, sql: str):
    return (await session.execute(text(sql))).scalar()


async def _run(session, sql: str) -> None:
    await session.execute(text(sql))


async def test_the_caller_is_set_for_the_transaction_only(one_connection, user):
    db = one_connection
    uid, sid = _ids(user)
    async with db.transaction(uid, sid) as s:
        assert await _scalar(s, "SELECT current_setting('app.user_id', true)") == str(uid)
        first = await _scalar(s, "SELECT now()")
        await asyncio.sleep(0.02)
        # One transaction: now() is the transaction's start time.
        assert await _scalar(s, "SELECT now()") == first
        assert await _scalar(s, "SELECT pg_current_xact_id() IS NOT NULL")
    async with db.transaction() as s:
        assert await _scalar(s, "SELECT coalesce(current_setting('app.user_id', true), '')") == ""
        assert await _scalar(s, "SELECT now()") != first


async def test_an_ended_session_is_refused_and_leaves_nothing_open(one_connection, user):
    db = one_connection
    uid, _ = _ids(user)
    with pytest.raises(errors.Unauthenticated) as err:
        async with db.transaction(uid, uuid.uuid4()):
            raise AssertionError("the body must not run")
    assert err.value.reason == "SESSION_REVOKED"
    # The same (only) connection is usable, outside any transaction, with no caller left on it.
    async with db.transaction() as s:
        assert await _scalar(s, "SELECT coalesce(current_setting('app.user_id', true), '')") == ""
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert not raw.driver_connection.is_in_transaction()


async def test_an_error_in_the_body_rolls_the_work_back(one_connection, user):
    db = one_connection
    uid, sid = _ids(user)
    name = f"caller_tx_{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError):
        async with db.transaction(uid, sid) as s:
            await _run(s, f"CREATE TABLE {name} (x int)")
            raise RuntimeError("boom")
    async with db.transaction(uid, sid) as s:
        assert await _scalar(s, f"SELECT to_regclass('{name}')") is None
        await _run(s, f"CREATE TABLE {name} (x int)")
    async with db.transaction() as s:
        assert await _scalar(s, f"SELECT to_regclass('{name}') IS NOT NULL")
        await _run(s, f"DROP TABLE {name}")


async def test_a_user_only_transaction_sets_the_caller_without_a_session_check(one_connection):
    uid = uuid.uuid4()
    async with one_connection.transaction(uid) as s:
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
    assert taken == [True]
