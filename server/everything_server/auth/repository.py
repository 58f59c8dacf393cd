"""All SQL of the auth domain. Functions take the session of the caller's transaction."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.auth.models import RefreshToken, Session, User
from everything_server.db.database import columns, driver_of, from_row
from everything_server.rpc import paging
from everything_server.rpc.paging import Cursor


async def insert_user(
    db: AsyncSession, *, user_id: uuid.UUID, email: str, password_hash: str, display_name: str
) -> User | None:
    """Insert the user; None when the email is taken (no exception, so the transaction survives)."""
    stmt = (
        insert(User)
        .values(id=user_id, email=email, password_hash=password_hash, display_name=display_name)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def owner_of_email(db: AsyncSession, email: str) -> uuid.UUID | None:
    """Before sign-in nobody is set for row-level security: a SECURITY DEFINER lookup tells only
    whose the email is; the user's row is then read as that user."""
    return (await db.execute(select(func.app_user_id_by_email(email)))).scalar_one_or_none()


async def owner_of_refresh_token(db: AsyncSession, token_hash: bytes) -> uuid.UUID | None:
    return (await db.execute(select(func.app_user_id_by_refresh_token(token_hash)))).scalar_one_or_none()


async def user_by_email(db: AsyncSession, email: str) -> User | None:
    return (await db.execute(select(User).where(User.email == email))).scalar_one_or_none()


# For the driver: every authenticated call of GetCurrentUser runs it.
_USER_BY_ID = f"SELECT {columns(User)} FROM users WHERE id = $1"  # noqa: S608 - constants only


async def user_by_id(db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID) -> User | None:
    return from_row(User, await (await driver_of(db)).fetchrow(_USER_BY_ID, user_id))


async def set_password_hash(db: AsyncSession, user_id: uuid.UUID, password_hash: str) -> None:
    await db.execute(
        update(User).where(User.id == user_id).values(password_hash=password_hash, updated_at=func.now())
    )


async def delete_user(db: AsyncSession, user_id: uuid.UUID) -> None:
    await db.execute(delete(User).where(User.id == user_id))


async def insert_session(
    db: AsyncSession, *, session_id: uuid.UUID, user_id: uuid.UUID, user_agent: str, expires_at: datetime
) -> None:
    db.add(Session(id=session_id, user_id=user_id, user_agent=user_agent, expires_at=expires_at))
    await db.flush()


async def insert_refresh_token(
    db: AsyncSession, *, token_hash: bytes, session_id: uuid.UUID, user_id: uuid.UUID, expires_at: datetime
) -> None:
    db.add(RefreshToken(token_hash=token_hash, session_id=session_id, user_id=user_id, expires_at=expires_at))
    await db.flush()


async def lock_refresh_token(db: AsyncSession, token_hash: bytes) -> tuple[RefreshToken, Session] | None:
    """The token and its session, locked, so two refreshes with one token are serialised."""
    stmt = (
        select(RefreshToken, Session)
        .join(Session, Session.id == RefreshToken.session_id)
        .where(RefreshToken.token_hash == token_hash)
        .with_for_update()
    )
    row = (await db.execute(stmt)).one_or_none()
    return (row[0], row[1]) if row else None


async def mark_refresh_token_used(db: AsyncSession, token_hash: bytes) -> None:
    await db.execute(
        update(RefreshToken).where(RefreshToken.token_hash == token_hash).values(used_at=func.now())
    )


async def extend_session(db: AsyncSession, session_id: uuid.UUID, expires_at: datetime) -> None:
    await db.execute(
        update(Session).where(Session.id == session_id).values(last_used_at=func.now(), expires_at=expires_at)
    )


async def revoke_session(db: AsyncSession, *, user_id: uuid.UUID, session_id: uuid.UUID, reason: str) -> bool:
    result = await db.execute(
        update(Session)
        .where(Session.id == session_id, Session.user_id == user_id, Session.revoked_at.is_(None))
        .values(revoked_at=func.now(), revoked_reason=reason)
    )
    return result.rowcount > 0


async def revoke_other_sessions(db: AsyncSession, *, user_id: uuid.UUID, keep: uuid.UUID, reason: str) -> int:
    result = await db.execute(
        update(Session)
        .where(Session.user_id == user_id, Session.id != keep, Session.revoked_at.is_(None))
        .values(revoked_at=func.now(), revoked_reason=reason)
    )
    return result.rowcount


async def session_exists(db: AsyncSession, *, user_id: uuid.UUID, session_id: uuid.UUID) -> bool:
    stmt = select(Session.id).where(Session.id == session_id, Session.user_id == user_id)
    return (await db.execute(stmt)).first() is not None


async def list_live_sessions(
    db: AsyncSession, *, user_id: uuid.UUID, limit: int, after: Cursor | None
) -> list[Session]:
    stmt = select(Session).where(
        Session.user_id == user_id, Session.revoked_at.is_(None), Session.expires_at > func.now()
    )
    stmt = paging.keyset(stmt, Session.created_at, Session.id, after).limit(limit)
    return list((await db.execute(stmt)).scalars())


async def all_sessions(db: AsyncSession, user_id: uuid.UUID) -> list[Session]:
    stmt = select(Session).where(Session.user_id == user_id).order_by(Session.created_at)
    return list((await db.execute(stmt)).scalars())
