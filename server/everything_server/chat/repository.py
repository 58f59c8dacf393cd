"""All SQL of the chat domain. Functions take the session of the caller's transaction and always
filter by the owner, so another user's ids find nothing."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy import delete, exists, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from everything_server.chat.models import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GENERATING,
    ROLE_ASSISTANT,
    ROLE_USER,
    Message,
    MessageEvents,
    Thread,
)
from everything_server.rpc import paging
from everything_server.rpc.paging import Cursor

# The statements on the path of every reply (creating it, saving it) run on the transaction's own
# asyncpg connection: prepared once per connection, none of the ORM's per-statement work (measured:
# ~65 µs of CPU per statement instead of ~420 through the ORM). Their rows become detached model
# objects, as the ORM's would be after commit.

_MESSAGE_COLUMNS = ", ".join(c.name for c in Message.__table__.columns)
_THREAD_COLUMNS = ", ".join(c.name for c in Thread.__table__.columns)
# S608 below: only the constants above are interpolated, never a value.
_INSERT_THREAD = f"INSERT INTO threads (id, user_id, title) VALUES ($1, $2, $3) RETURNING {_THREAD_COLUMNS}"  # noqa: S608

_GET_THREAD = f"SELECT {_THREAD_COLUMNS} FROM threads WHERE id = $1 AND user_id = $2"  # noqa: S608

_TOUCH_THREAD = (
    f"UPDATE threads SET updated_at = now() WHERE id = $1 AND user_id = $2 RETURNING {_THREAD_COLUMNS}"  # noqa: S608
)

_INSERT_USER_MESSAGE = f"""
    INSERT INTO messages (id, thread_id, user_id, role, content, status, client_message_id, position, turn)
    SELECT $1, $2, $3, '{ROLE_USER}', $4, '{COMPLETED}', $5, v, v
      FROM (SELECT nextval('messages_position_seq') AS v) AS drawn
    ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
    RETURNING {_MESSAGE_COLUMNS}
"""  # noqa: S608

_THREAD_AS = ", ".join(f"t.{c.name} AS touched_{c.name}" for c in Thread.__table__.columns)
_START_REPLY = f"""
    WITH r AS (
      INSERT INTO messages
        (id, thread_id, user_id, role, status, parent_message_id, turn, seq, model, lease_expires_at)
      VALUES ($1, $2, $3, '{ROLE_ASSISTANT}', '{GENERATING}', $4, $5, 1, $6, now() + $7::interval)
      RETURNING {_MESSAGE_COLUMNS}
    ), e AS (
      INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data)
      SELECT id, 1, 1, user_id, $8 FROM r
    ), t AS (
      UPDATE threads SET updated_at = now() WHERE $9 AND id = $2 AND user_id = $3
      RETURNING {_THREAD_COLUMNS}
    )
    SELECT r.*, {_THREAD_AS}, pg_notify($10, $8)::text AS notified
      FROM r LEFT JOIN t ON true
"""  # noqa: S608

_FINISH = f"""
    UPDATE messages
       SET content = $2, seq = $3, status = $4, prompt_tokens = $5, completion_tokens = $6,
           usage_estimated = $7, error_reason = $8, lease_expires_at = NULL, updated_at = now()
     WHERE id = $1 AND status = '{GENERATING}'
    RETURNING {_MESSAGE_COLUMNS}
"""  # noqa: S608


async def _driver(db: AsyncSession) -> asyncpg.Connection:
    conn = await db.connection()
    return (await conn.get_raw_connection()).driver_connection


def _message(row: asyncpg.Record | None) -> Message | None:
    return None if row is None else Message(**{c.name: row[c.name] for c in Message.__table__.columns})


def _thread(row: asyncpg.Record | None, prefix: str = "") -> Thread | None:
    """The thread in `row`, its columns named `prefix` + name (None: no row, or no thread in it)."""
    if row is None or row[f"{prefix}id"] is None:
        return None
    return Thread(**{c.name: row[f"{prefix}{c.name}"] for c in Thread.__table__.columns})


# -- threads -------------------------------------------------------------------------------------


async def insert_thread(db: AsyncSession, *, user_id: uuid.UUID, title: str) -> Thread:
    row = await (await _driver(db)).fetchrow(
        _INSERT_THREAD,
        uuid.uuid4(),
        user_id,
        title,
    )
    thread = _thread(row)
    assert thread is not None
    return thread


async def get_thread(db: AsyncSession, user_id: uuid.UUID, thread_id: uuid.UUID) -> Thread | None:
    row = await (await _driver(db)).fetchrow(_GET_THREAD, thread_id, user_id)
    return _thread(row)


async def list_threads(
    db: AsyncSession, *, user_id: uuid.UUID, limit: int, after: Cursor | None
) -> list[Thread]:
    stmt = select(Thread).where(Thread.user_id == user_id)
    stmt = paging.keyset(stmt, Thread.updated_at, Thread.id, after).limit(limit)
    return list((await db.execute(stmt)).scalars())


async def set_title(
    db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID, title: str
) -> Thread | None:
    """A title the user chose (it is never replaced by a generated one)."""
    stmt = (
        update(Thread)
        .where(Thread.id == thread_id, Thread.user_id == user_id)
        .values(title=title, title_generated=False, updated_at=func.now())
        .returning(Thread)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def set_generated_title(
    db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID, title: str
) -> bool:
    """Only while the thread has no title, so a title the user set meanwhile wins."""
    stmt = (
        update(Thread)
        .where(Thread.id == thread_id, Thread.user_id == user_id, Thread.title == "")
        .values(title=title, title_generated=True, updated_at=func.now())
    )
    return (await db.execute(stmt)).rowcount > 0


async def touch_thread(db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID) -> Thread | None:
    row = await (await _driver(db)).fetchrow(
        _TOUCH_THREAD,
        thread_id,
        user_id,
    )
    return _thread(row)


async def delete_thread(db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID) -> bool:
    result = await db.execute(delete(Thread).where(Thread.id == thread_id, Thread.user_id == user_id))
    return result.rowcount > 0


# -- messages ------------------------------------------------------------------------------------


async def insert_user_message(
    db: AsyncSession,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    content: str,
    client_message_id: uuid.UUID | None,
) -> Message | None:
    """None when `client_message_id` was taken meanwhile (by a concurrent retry of the same send).
    Its turn is its position, drawn from the sequence in the same statement."""
    row = await (await _driver(db)).fetchrow(
        _INSERT_USER_MESSAGE,
        uuid.uuid4(),
        thread_id,
        user_id,
        content,
        client_message_id,
    )
    return _message(row)


async def start_reply(
    db: AsyncSession,
    *,
    message_id: uuid.UUID,
    parent: Message,
    model: str,
    lease: timedelta,
    first_events: str,
    channel: str,
    touch_thread: bool,
) -> tuple[Message, Thread | None]:
    """One statement: the assistant message, GENERATING at seq 1, its first stored events (and their
    NOTIFY, sent at commit), and with `touch_thread` the thread's updated_at (the thread returned)."""
    row = await (await _driver(db)).fetchrow(
        _START_REPLY,
        message_id,
        parent.thread_id,
        parent.user_id,
        parent.id,
        parent.turn,
        model,
        lease,
        first_events,
        touch_thread,
        channel,
    )
    reply = _message(row)
    assert reply is not None
    return reply, _thread(row, prefix="touched_")


async def get_message(
    db: AsyncSession, user_id: uuid.UUID, message_id: uuid.UUID, *, lock: bool = False
) -> Message | None:
    stmt = select(Message).where(Message.id == message_id, Message.user_id == user_id)
    if lock:
        stmt = stmt.with_for_update()
    return (await db.execute(stmt)).scalar_one_or_none()


async def user_message_by_client_id(
    db: AsyncSession, user_id: uuid.UUID, client_message_id: uuid.UUID
) -> Message | None:
    stmt = select(Message).where(
        Message.user_id == user_id,
        Message.client_message_id == client_message_id,
        Message.role == ROLE_USER,
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def latest_reply(db: AsyncSession, user_id: uuid.UUID, parent_id: uuid.UUID) -> Message | None:
    stmt = (
        select(Message)
        .where(Message.parent_message_id == parent_id, Message.user_id == user_id)
        .order_by(Message.position.desc())
        .limit(1)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def has_generating_reply(db: AsyncSession, user_id: uuid.UUID, parent_id: uuid.UUID) -> bool:
    stmt = select(
        exists().where(
            Message.parent_message_id == parent_id,
            Message.user_id == user_id,
            Message.status == GENERATING,
        )
    )
    return bool((await db.execute(stmt)).scalar())


async def is_first_turn(db: AsyncSession, thread_id: uuid.UUID, turn: int) -> bool:
    stmt = select(
        exists().where(Message.thread_id == thread_id, Message.role == ROLE_USER, Message.turn < turn)
    )
    return not (await db.execute(stmt)).scalar()


# Built once: aliasing a mapped class costs about a millisecond, on the path of every reply.
_NEWER = aliased(Message, name="newer")


def _active_branch(m):
    """Users' messages, and for each of them only its newest reply."""
    return or_(
        m.role == ROLE_USER,
        ~exists().where(_NEWER.parent_message_id == m.parent_message_id, _NEWER.position > m.position),
    )


async def list_messages(
    db: AsyncSession,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    limit: int,
    after: tuple[int, int] | None,
    all_branches: bool,
) -> list[Message]:
    stmt = select(Message).where(Message.thread_id == thread_id, Message.user_id == user_id)
    if not all_branches:
        stmt = stmt.where(_active_branch(Message))
    if after is not None:
        stmt = stmt.where(tuple_(Message.turn, Message.position) > tuple_(*after))
    stmt = stmt.order_by(Message.turn, Message.position).limit(limit)
    return list((await db.execute(stmt)).scalars())


async def history(
    db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID, before_turn: int | None, limit: int
) -> list[tuple[str, str]]:
    """(role, content) of the active branch before `before_turn` (None: all of it), NEWEST first;
    replies that failed, are still generating or are empty are left out."""
    stmt = select(Message.role, Message.content).where(
        Message.thread_id == thread_id,
        Message.user_id == user_id,
        Message.status.in_((COMPLETED, CANCELLED)),
        Message.content != "",
        _active_branch(Message),
    )
    if before_turn is not None:
        stmt = stmt.where(Message.turn < before_turn)
    stmt = stmt.order_by(Message.turn.desc(), Message.position.desc()).limit(limit)
    return [(r.role, r.content) for r in await db.execute(stmt)]


async def set_feedback(
    db: AsyncSession, *, user_id: uuid.UUID, message_id: uuid.UUID, rating: int, comment: str
) -> Message | None:
    stmt = (
        update(Message)
        .where(Message.id == message_id, Message.user_id == user_id, Message.role == ROLE_ASSISTANT)
        .values(
            feedback_rating=rating,
            feedback_comment=comment,
            feedback_at=func.now() if rating else None,
            updated_at=func.now(),
        )
        .returning(Message)
    )
    return (await db.execute(stmt)).scalar_one_or_none()


# -- generations -----------------------------------------------------------------------------------


async def finish(
    db: AsyncSession,
    *,
    message_id: uuid.UUID,
    content: str,
    seq: int,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool,
    error_reason: str,
) -> Message | None:
    row = await (await _driver(db)).fetchrow(
        _FINISH,
        message_id,
        content,
        seq,
        status,
        prompt_tokens,
        completion_tokens,
        usage_estimated,
        error_reason,
    )
    return _message(row)


async def fail_expired(
    db: AsyncSession,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    reason: str,
) -> list[Message]:
    """Mark FAILED the generations whose lease ran out (their replica is gone). The caller stores
    their `done` event at the new seq (one past the last stored event)."""
    stmt = update(Message).where(
        Message.user_id == user_id,
        Message.status == GENERATING,
        Message.lease_expires_at < func.now(),
    )
    if thread_id is not None:
        stmt = stmt.where(Message.thread_id == thread_id)
    if message_id is not None:
        stmt = stmt.where(Message.id == message_id)
    stmt = stmt.values(
        status=FAILED,
        seq=Message.seq + 2,  # an (estimated) usage event and the done event, stored by the caller
        error_reason=reason,
        usage_estimated=True,
        prompt_tokens=0,
        completion_tokens=(func.length(Message.content) + 3) // 4,
        lease_expires_at=None,
        updated_at=func.now(),
    ).returning(Message)
    return list((await db.execute(stmt)).scalars())


async def insert_events(
    db: AsyncSession,
    *,
    message_id: uuid.UUID,
    user_id: uuid.UUID,
    seq_first: int,
    seq_last: int,
    data: str,
    channel: str,
    payloads: list[str],
) -> None:
    """One stored batch of events and, in the same statement, its NOTIFY payloads in order
    (delivered when the transaction commits)."""
    await (await _driver(db)).execute(
        """
        WITH stored AS (
          INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data)
          VALUES ($1, $2, $3, $4, $5)
        )
        SELECT pg_notify($6, n.payload)
          FROM unnest($7::text[]) WITH ORDINALITY AS n(payload, i)
         ORDER BY n.i
        """,
        message_id,
        seq_first,
        seq_last,
        user_id,
        data,
        channel,
        payloads,
    )


async def events_after(
    db: AsyncSession, *, user_id: uuid.UUID, message_id: uuid.UUID, after_seq: int
) -> list[str]:
    """The stored batches holding events after `after_seq`, in order."""
    stmt = (
        select(MessageEvents.data)
        .where(
            MessageEvents.message_id == message_id,
            MessageEvents.user_id == user_id,
            MessageEvents.seq_last > after_seq,
        )
        .order_by(MessageEvents.seq_first)
    )
    return list((await db.execute(stmt)).scalars())


async def count_event_batches(db: AsyncSession, message_id: uuid.UUID) -> int:
    stmt = select(func.count()).select_from(MessageEvents).where(MessageEvents.message_id == message_id)
    return (await db.execute(stmt)).scalar_one()


# -- export ---------------------------------------------------------------------------------------


async def threads_for_export(
    db: AsyncSession, *, user_id: uuid.UUID, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[Thread]:
    stmt = select(Thread).where(Thread.user_id == user_id)
    if after is not None:
        stmt = stmt.where(tuple_(Thread.created_at, Thread.id) > tuple_(*after))
    stmt = stmt.order_by(Thread.created_at, Thread.id).limit(limit)
    return list((await db.execute(stmt)).scalars())


async def messages_of_threads(
    db: AsyncSession, *, user_id: uuid.UUID, thread_ids: list[uuid.UUID]
) -> list[Message]:
    if not thread_ids:
        return []
    stmt = (
        select(Message)
        .where(Message.user_id == user_id, Message.thread_id.in_(thread_ids))
        .order_by(Message.thread_id, Message.turn, Message.position)
    )
    return list((await db.execute(stmt)).scalars())
