"""Migrations go up, all the way down, and up again on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from everything_server.db import migrate
from tests.conftest import _with_database

EXPECTED_TABLES = {
    "users",
    "sessions",
    "refresh_tokens",
    "threads",
    "messages",
    "preferences",
    "search_queries",
    "images",
    "image_blobs",
}


async def _names(url: str, sql: str) -> set[str]:
    """The first column of `sql`'s rows, on a connection of its own."""
    conn = await asyncpg.connect(url)
    try:
        return {r[0] for r in await conn.fetch(sql)}
    finally:
        await conn.close()


async def tables(url: str) -> set[str]:
    return await _names(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") - {
        "alembic_version"
    }


async def unlogged(url: str) -> set[str]:
    return await _names(
        url,
        "SELECT relname FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r' "
        "AND relnamespace = 'public'::regnamespace",
    )


async def test_upgrade_downgrade_upgrade(pg_admin_url):
    name = f"everything_migr_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(pg_admin_url, name)
    try:
        await migrate.upgrade_async(url)
        assert EXPECTED_TABLES <= await tables(url)
        await migrate.upgrade_async(url)  # a second upgrade is a no-op
        await asyncio.to_thread(migrate.downgrade, url, "base")
        assert await tables(url) == set()
        await migrate.upgrade_async(url)
        assert EXPECTED_TABLES <= await tables(url)
        # Only the per-minute rate-limit counts are unlogged (their commits wait for no WAL flush);
        # everything people keep, the daily quotas included, is logged.
        assert await unlogged(url) == {"rate_limit_windows"}
        await asyncio.to_thread(migrate.downgrade, url, "0010_chat_checkpoints")
        assert await unlogged(url) == set()
        await migrate.upgrade_async(url)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_there_is_one_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused"))
    assert len(script.get_heads()) == 1


def test_a_replica_serves_at_head_or_at_a_newer_revision_but_not_behind():
    head = migrate.head_revision()
    known = migrate.known_revisions()
    assert migrate.is_current(head, head, known)
    assert migrate.is_current("9999_from_a_newer_release", head, known)  # a rolling deploy migrated ahead
    assert not migrate.is_current(None, head, known)
    assert not migrate.is_current("0001_auth", head, known)
