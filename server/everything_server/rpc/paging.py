"""Opaque keyset cursors: a page token is base64url JSON of the last row's sort key and id.

Keyset (not offset) paging stays fast and stable while rows are added. Tokens are not secrets: the
owner filter still applies, so a forged token can only move within the caller's own rows.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import Select, tuple_

from everything_server.errors import InvalidArgument


@dataclass(frozen=True)
class Cursor:
    at: datetime
    id: uuid.UUID


def encode(at: datetime, row_id: uuid.UUID) -> str:
    raw = orjson.dumps({"t": at.isoformat(), "i": str(row_id)})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, field: str = "page_token") -> Cursor | None:
    if not token:
        return None
    try:
        if len(token) > 512:
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = orjson.loads(raw)
        at = datetime.fromisoformat(data["t"])
        if at.tzinfo is None:
            raise ValueError
        return Cursor(at=at, id=uuid.UUID(data["i"]))
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise InvalidArgument(field, "is not a token returned by this list") from None


def keyset(stmt: Select, at_col, id_col, after: Cursor | None, *, descending: bool = True) -> Select:
    """Order `stmt` by (at, id) and start after the cursor's row: the one keyset rule of every list."""
    if after is not None:
        row, mark = tuple_(at_col, id_col), tuple_(after.at, after.id)
        stmt = stmt.where(row < mark if descending else row > mark)
    return stmt.order_by(*((at_col.desc(), id_col.desc()) if descending else (at_col, id_col)))


def page(rows: list, page_size: int, key) -> tuple[list, str]:
    """Rows fetched with limit page_size + 1 → (this page, the token of the next one)."""
    return rows[:page_size], next_token(rows, page_size, key)


def next_token(rows: list, page_size: int, key) -> str:
    """Rows were fetched with limit page_size + 1; a token exists when the extra row came back."""
    if len(rows) <= page_size:
        return ""
    at, row_id = key(rows[page_size - 1])
    return encode(at, row_id)
