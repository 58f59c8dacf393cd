"""All SQL of the preferences domain: one JSONB document per user, changed key by key in SQL.

A partial update is one statement: `(data - <cleared keys>) || <new values>` on the row, or an
insert of the new values when the user has no row yet. PostgreSQL applies it to the row as it is at
that moment (the conflicting row is locked and re-read), so two clients changing different fields at
the same time both keep their change; nothing is read into Python and written back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class StoredPreferences:
    data: dict
    created_at: datetime
    updated_at: datetime


_GET = text("SELECT data, created_at, updated_at FROM preferences WHERE user_id = :u")

_PATCH = text(
    """
    INSERT INTO preferences AS p (user_id, data) VALUES (:u, CAST(:set AS jsonb))
    ON CONFLICT (user_id) DO UPDATE
      SET data = (p.data - CAST(:clear AS text[])) || CAST(:set AS jsonb), updated_at = now()
    RETURNING data, created_at, updated_at
    """
)


async def get(db: AsyncSession, user_id: uuid.UUID) -> StoredPreferences | None:
    row = (await db.execute(_GET, {"u": user_id})).one_or_none()
    return StoredPreferences(row.data, row.created_at, row.updated_at) if row else None


async def patch(
    db: AsyncSession, user_id: uuid.UUID, *, set_values: dict, clear: list[str]
) -> StoredPreferences:
    """Set `set_values` (JSON-ready) and remove the keys in `clear`, atomically."""
    row = (
        await db.execute(
            _PATCH, {"u": user_id, "set": orjson.dumps(set_values).decode(), "clear": list(clear)}
        )
    ).one()
    return StoredPreferences(row.data, row.created_at, row.updated_at)
