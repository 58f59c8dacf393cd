"""All SQL of the search domain. Functions take the session of the caller's transaction and always
filter by owner."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.rpc import paging
from everything_server.rpc.paging import Cursor
from everything_server.search.models import SearchQuery, Status


async def insert_search(
    db: AsyncSession,
    *,
    search_id: uuid.UUID,
    user_id: uuid.UUID,
    query: str,
    providers: list[str],
    model: str,
    client_request_id: uuid.UUID | None,
) -> SearchQuery | None:
    """Insert a RUNNING search; None when the client_request_id was used already (no exception,
    so the transaction survives and the caller can read the existing one)."""
    stmt = (
        insert(SearchQuery)
        .values(
            id=search_id,
            user_id=user_id,
            query=query,
            providers=providers,
            model=model,
            status=Status.RUNNING.value,
            client_request_id=client_request_id,
        )
        .on_conflict_do_nothing(
            index_elements=[SearchQuery.user_id, SearchQuery.client_request_id],
            index_where=SearchQuery.client_request_id.is_not(None),
        )
        .returning(SearchQuery)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def by_client_request_id(
    db: AsyncSession, user_id: uuid.UUID, client_request_id: uuid.UUID
) -> SearchQuery | None:
    stmt = select(SearchQuery).where(
        SearchQuery.user_id == user_id, SearchQuery.client_request_id == client_request_id
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def get(db: AsyncSession, user_id: uuid.UUID, search_id: uuid.UUID) -> SearchQuery | None:
    stmt = select(SearchQuery).where(SearchQuery.id == search_id, SearchQuery.user_id == user_id)
    return (await db.execute(stmt)).scalar_one_or_none()


async def status_of(db: AsyncSession, user_id: uuid.UUID, search_id: uuid.UUID) -> str | None:
    stmt = select(SearchQuery.status).where(SearchQuery.id == search_id, SearchQuery.user_id == user_id)
    return (await db.execute(stmt)).scalar_one_or_none()


async def list_searches(
    db: AsyncSession, user_id: uuid.UUID, *, limit: int, after: Cursor | None
) -> list[SearchQuery]:
    stmt = select(SearchQuery).where(SearchQuery.user_id == user_id)
    stmt = paging.keyset(stmt, SearchQuery.created_at, SearchQuery.id, after).limit(limit)
    return list((await db.execute(stmt)).scalars())


async def save_sources(
    db: AsyncSession, user_id: uuid.UUID, search_id: uuid.UUID, *, sources: list[dict], providers: list[str]
) -> None:
    await db.execute(
        update(SearchQuery)
        .where(SearchQuery.id == search_id, SearchQuery.user_id == user_id)
        .values(sources=sources, providers=providers, updated_at=func.now())
    )


async def finish(
    db: AsyncSession,
    user_id: uuid.UUID,
    search_id: uuid.UUID,
    *,
    status: Status,
    summary: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool,
    error_reason: str = "",
) -> SearchQuery | None:
    """The final save of a search: the record as saved, or None when it was deleted meanwhile."""
    stmt = (
        update(SearchQuery)
        .where(SearchQuery.id == search_id, SearchQuery.user_id == user_id)
        .values(
            status=status.value,
            summary=summary,
            error_reason=error_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            usage_estimated=usage_estimated,
            updated_at=func.now(),
        )
        .returning(SearchQuery)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def cancel_if_running(db: AsyncSession, user_id: uuid.UUID, search_id: uuid.UUID) -> SearchQuery | None:
    """Mark a search CANCELLED unless it finished meanwhile (for one whose process is gone)."""
    stmt = (
        update(SearchQuery)
        .where(
            SearchQuery.id == search_id,
            SearchQuery.user_id == user_id,
            SearchQuery.status == Status.RUNNING.value,
        )
        .values(status=Status.CANCELLED.value, updated_at=func.now())
        .returning(SearchQuery)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def delete_search(db: AsyncSession, user_id: uuid.UUID, search_id: uuid.UUID) -> bool:
    result = await db.execute(
        delete(SearchQuery).where(SearchQuery.id == search_id, SearchQuery.user_id == user_id)
    )
    return result.rowcount > 0


async def provider_preference(db: AsyncSession, user_id: uuid.UUID) -> list[str] | None:
    """The user's own `search_providers` preference, or None when they never set one (the effective
    settings fill in a default, which must not be mistaken for a choice)."""
    row = await db.execute(
        text("SELECT data -> 'search_providers' FROM preferences WHERE user_id = :u"), {"u": user_id}
    )
    value = row.scalar_one_or_none()
    if not isinstance(value, list) or not value:
        return None
    return [v for v in value if isinstance(v, str)]
