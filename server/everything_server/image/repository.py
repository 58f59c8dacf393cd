"""All SQL of the image domain (records; the bytes go through image.storage). Functions take the
session of the caller's transaction and always filter by owner."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.image.models import COMPLETED, FAILED, GENERATING, Image
from everything_server.rpc import paging
from everything_server.rpc.paging import Cursor


async def insert_images(db: AsyncSession, rows: list[dict]) -> list[Image]:
    """Insert the records of one request. Rows whose (client_request_id, request_index) exists
    already are skipped (not an error), so a retried request finds the first one's rows."""
    stmt = (
        insert(Image)
        .values(rows)
        .on_conflict_do_nothing(
            index_elements=[Image.user_id, Image.client_request_id, Image.request_index],
            index_where=Image.client_request_id.is_not(None),
        )
        .returning(Image)
    )
    return list((await db.execute(stmt)).scalars())


async def by_client_request(
    db: AsyncSession, user_id: uuid.UUID, client_request_id: uuid.UUID
) -> list[Image]:
    stmt = (
        select(Image)
        .where(Image.user_id == user_id, Image.client_request_id == client_request_id)
        .order_by(Image.request_index)
    )
    return list((await db.execute(stmt)).scalars())


async def get(
    db: AsyncSession, user_id: uuid.UUID, image_id: uuid.UUID, *, for_update: bool = False
) -> Image | None:
    stmt = select(Image).where(Image.id == image_id, Image.user_id == user_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await db.execute(stmt)).scalar_one_or_none()


async def get_many(db: AsyncSession, user_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> list[Image]:
    stmt = select(Image).where(Image.user_id == user_id, Image.id.in_(list(ids)))
    return list((await db.execute(stmt)).scalars())


async def list_images(
    db: AsyncSession, user_id: uuid.UUID, *, limit: int, after: Cursor | None, newest_first: bool = True
) -> list[Image]:
    stmt = select(Image).where(Image.user_id == user_id)
    stmt = paging.keyset(stmt, Image.created_at, Image.id, after, descending=newest_first)
    return list((await db.execute(stmt.limit(limit))).scalars())


async def finish(db: AsyncSession, user_id: uuid.UUID, image_id: uuid.UUID, **values) -> Image | None:
    """Move a GENERATING image to its final state; None when it is gone (deleted meanwhile) or final."""
    stmt = (
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id, Image.status == GENERATING)
        .values(updated_at=func.now(), **values)
        .returning(Image)
        .execution_options(synchronize_session=False)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def complete(
    db: AsyncSession,
    user_id: uuid.UUID,
    image_id: uuid.UUID,
    *,
    content_type: str,
    byte_size: int,
    storage_key: str,
    revised_prompt: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> Image | None:
    return await finish(
        db,
        user_id,
        image_id,
        status=COMPLETED,
        content_type=content_type,
        byte_size=byte_size,
        storage_key=storage_key,
        revised_prompt=revised_prompt,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


async def fail(db: AsyncSession, user_id: uuid.UUID, image_id: uuid.UUID, reason: str) -> Image | None:
    return await finish(db, user_id, image_id, status=FAILED, error_reason=reason)


async def delete_image(db: AsyncSession, user_id: uuid.UUID, image_id: uuid.UUID) -> bool:
    result = await db.execute(delete(Image).where(Image.id == image_id, Image.user_id == user_id))
    return result.rowcount > 0


async def owner_of(db: AsyncSession, image_id: uuid.UUID) -> uuid.UUID | None:
    """Whose image this is, before any caller is known: the one lookup a signed image URL needs.
    A SECURITY DEFINER function (migration 0007) so it works under row-level security; it reveals
    only the owner's id, and only to code that has checked the URL's signature."""
    return (await db.execute(text("SELECT app_user_id_by_image(:i)"), {"i": image_id})).scalar_one_or_none()
