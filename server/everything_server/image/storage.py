"""Where image bytes live: a small interface, and the default store in PostgreSQL.

The service only talks to `ImageStore`, so an S3-compatible store (or any other) can be added without
touching it: `put` returns the key the store wants recorded in `images.storage_key`, and every call
gets the caller's database session so a store that keeps bytes in PostgreSQL commits them with the
image row (a store elsewhere ignores it). Calls always name the owner, so a store can lay out or
check keys per user.

PostgresImageStore keeps the bytes in `image_blobs` (bytea, TOAST-compressed where that helps), apart
from `images` so listings never read bytes. Rows go with their image (and with the account) through
ON DELETE CASCADE.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.image.models import ImageBlob


class ImageStore(Protocol):
    async def put(
        self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID, data: bytes, content_type: str
    ) -> str:
        """Store the bytes (replacing any); returns the storage key to record on the image."""
        ...

    async def get(self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID) -> bytes | None:
        """The bytes, or None when the store has none for this image of this user."""
        ...

    async def delete(self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Remove the bytes; nothing happens when there are none."""
        ...


class PostgresImageStore:
    KEY = "postgres"

    async def put(
        self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID, data: bytes, content_type: str
    ) -> str:
        stmt = insert(ImageBlob).values(image_id=image_id, user_id=user_id, data=data)
        stmt = stmt.on_conflict_do_update(index_elements=[ImageBlob.image_id], set_={"data": data})
        await session.execute(stmt)
        return self.KEY

    async def get(self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID) -> bytes | None:
        stmt = select(ImageBlob.data).where(ImageBlob.image_id == image_id, ImageBlob.user_id == user_id)
        return (await session.execute(stmt)).scalar_one_or_none()

    async def delete(self, session: AsyncSession, image_id: uuid.UUID, user_id: uuid.UUID) -> None:
        await session.execute(
            delete(ImageBlob).where(ImageBlob.image_id == image_id, ImageBlob.user_id == user_id)
        )
