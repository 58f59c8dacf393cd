"""All SQL of the preferences domain: one JSONB document per user, changed key by key in SQL.

A partial update is one statement: `(data - <cleared keys>) || <new values>` on the row, or an
insert of the new values when the user has no row yet. PostgreSQL applies it to the row as it is at
that moment (the conflicting row is locked and re-read), so two clients changing different fields at
the same time both keep their change; nothing is read into Python and written back. The statements
are written for the driver (asyncpg), without SQLAlchemy's per-statement work (GetPreferences is a
hot read).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.db.database import driver_of


@dataclass(frozen=True)
class StoredPreferences:
    data: dict
    created_at: datetime
    updated_at: datetime


_GET = "SELECT data, created_at, updated_at FROM preferences WHERE user_id = $1"

_PATCH = """
    INSERT INTO preferences AS p (user_id, data) VALUES ($1, $2::jsonb)
    ON CONFLICT (user_id) DO UPDATE
      SET data = (p.data - $3::text[]) || $2::jsonb, updated_at = now()
    RETURNING data, created_at, updated_at
"""


def _stored(row: asyncpg.Record) -> StoredPreferences:
    return StoredPreferences(row["data"], row["created_at"], row["updated_at"])


async def get(db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID) -> StoredPreferences | None:
    row = await (await driver_of(db)).fetchrow(_GET, user_id)
    return _stored(row) if row else None


async def patch(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, *, set_values: dict, clear: list[str]
) -> StoredPreferences:
    """Set `set_values` (JSON-ready) and remove the keys in `clear`, atomically."""
    # jsonb goes through SQLAlchemy's codec, installed on every pooled connection: it takes the
    # document as JSON text and gives it back decoded.
    document = orjson.dumps(set_values).decode()
    return _stored(await (await driver_of(db)).fetchrow(_PATCH, user_id, document, list(clear)))
