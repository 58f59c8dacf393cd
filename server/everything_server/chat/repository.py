"""All SQL of the chat domain. Functions take the caller's transaction (a `driver_transaction`'s
connection, or a session: `driver_of`) and always filter by the owner, so another user's ids find
nothing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.chat.models import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GENERATING,
    ROLE_ASSISTANT,
    ROLE_USER,
    Message,
    Thread,
)
from everything_server.db.database import columns, driver_of, from_row
from everything_server.limits import add_sql, used_today_sql
from everything_server.preferences.effective import data_sql as preferences_sql
from everything_server.rpc.paging import Cursor

# Every statement runs on the transaction's own asyncpg connection: prepared once per connection,
# none of the ORM's per-statement work (measured: ~65 µs of CPU per statement instead of ~420
# through the ORM). Their rows become detached model objects, as the ORM's would be after commit.

_MESSAGE_COLUMNS = columns(Message)
_THREAD_COLUMNS = columns(Thread)
# S608 below: only the constants above are interpolated, never a value.
_INSERT_THREAD = f"INSERT INTO threads (id, user_id, title) VALUES ($1, $2, $3) RETURNING {_THREAD_COLUMNS}"  # noqa: S608

_GET_THREAD = f"SELECT {_THREAD_COLUMNS} FROM threads WHERE id = $1 AND user_id = $2"  # noqa: S608

_BY_CLIENT_ID = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages
     WHERE user_id = $1 AND client_message_id = $2 AND role = '{ROLE_USER}'
"""  # noqa: S608

_LATEST_REPLY = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages
     WHERE parent_message_id = $1 AND user_id = $2 ORDER BY position DESC LIMIT 1
"""  # noqa: S608

# A new reply: the assistant message GENERATING at seq 1 after its parent `p` (a CTE giving the user
# message's id and turn), its first stored events ($6), and with $7 the thread's updated_at. $1 reply
# id, $2 thread, $3 user, $4 model, $5 lease. No NOTIFY: its channel is named after the new reply's
# id, which no one can listen for before this commits (and a NOTIFY makes the commit take a global
# lock).
_THREAD_AS = ", ".join(f"t.{c.name} AS touched_{c.name}" for c in Thread.__table__.columns)
_REPLY_AFTER_P = f"""
    r AS (
      INSERT INTO messages
        (id, thread_id, user_id, role, status, parent_message_id, turn, seq, model, lease_expires_at)
      SELECT $1, $2, $3, '{ROLE_ASSISTANT}', '{GENERATING}', p.id, p.turn, 1, $4, now() + $5::interval
        FROM p
      RETURNING {_MESSAGE_COLUMNS}
    ), e AS (
      INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data)
      SELECT id, 1, 1, user_id, $6 FROM r
    ), t AS (
      UPDATE threads SET updated_at = now()
       WHERE $7 AND id = $2 AND user_id = $3 AND EXISTS (SELECT 1 FROM p)
      RETURNING {_THREAD_COLUMNS}
    )
"""  # noqa: S608

# A reply to an existing user message ($8 id, $9 turn).
_START_REPLY = f"""
    WITH p AS (SELECT $8::uuid AS id, $9::bigint AS turn), {_REPLY_AFTER_P}
    SELECT r.*, {_THREAD_AS} FROM r LEFT JOIN t ON true
"""  # noqa: S608

# The user's message ($8 id, $9 content, $10 client_message_id; its turn is its position, drawn
# from the sequence) and the reply to it, in one statement. No row: client_message_id was taken.
_USER_AS = ", ".join(f"p.{c.name} AS um_{c.name}" for c in Message.__table__.columns)
_SEND = f"""
    WITH p AS (
      INSERT INTO messages
        (id, thread_id, user_id, role, content, status, client_message_id, position, turn)
      SELECT $8, $2, $3, '{ROLE_USER}', $9, '{COMPLETED}', $10, v, v
        FROM (SELECT nextval('messages_position_seq') AS v) AS drawn
      ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
      RETURNING {_MESSAGE_COLUMNS}
    ), {_REPLY_AFTER_P}
    SELECT r.*, {_USER_AS}, {_THREAD_AS} FROM r CROSS JOIN p LEFT JOIN t ON true
"""  # noqa: S608

# A reply's last save, in one statement: the message finished ($1 id, $2 content, $3 its last seq,
# $4 status, $5-$7 usage, $8 error reason) if it is still GENERATING, its unstored events ($9 the
# first seq, $10 them encoded) with their NOTIFY payloads ($11 channel, $12 payloads, in order,
# delivered at commit), the thread's updated_at, and the cost added to today's quota ($13 kind, $14
# tokens; 0: none). No row, and nothing written or announced, when the message was no longer
# GENERATING (its lease ran out, its thread was deleted, or a retry finds it saved). `n` is read by
# the last line because a CTE that modifies nothing runs only when read: once, and only for a row.
_FINISH = f"""
    WITH f AS (
      UPDATE messages
         SET content = $2, seq = $3, status = $4, prompt_tokens = $5, completion_tokens = $6,
             usage_estimated = $7, error_reason = $8, lease_expires_at = NULL, updated_at = now()
       WHERE id = $1 AND status = '{GENERATING}'
      RETURNING {_MESSAGE_COLUMNS}
    ), e AS (
      INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data)
      SELECT f.id, $9, $3, f.user_id, $10 FROM f
    ), t AS (
      UPDATE threads SET updated_at = now() FROM f WHERE threads.id = f.thread_id AND threads.user_id = f.user_id
    ), q AS ({add_sql("f.user_id", "$13::text", "$14::bigint", "FROM f")}
    ), n AS (
      SELECT count(pg_notify($11, p.payload)) AS notified
        FROM (SELECT payload FROM unnest($12::text[]) WITH ORDINALITY AS u(payload, i) ORDER BY i) AS p
    )
    SELECT f.*, (SELECT notified FROM n) AS notified FROM f
"""  # noqa: S608


def _message(row: asyncpg.Record | None, prefix: str = "") -> Message | None:
    """The message in `row`, its columns named `prefix` + name (None: no row)."""
    return from_row(Message, row, prefix)


def _thread(row: asyncpg.Record | None, prefix: str = "") -> Thread | None:
    """The thread in `row`, its columns named `prefix` + name (None: no row, or no thread in it)."""
    if row is None or row[f"{prefix}id"] is None:
        return None
    return from_row(Thread, row, prefix)


# -- threads -------------------------------------------------------------------------------------


async def insert_thread(db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, title: str) -> Thread:
    row = await (await driver_of(db)).fetchrow(
        _INSERT_THREAD,
        uuid.uuid4(),
        user_id,
        title,
    )
    thread = _thread(row)
    assert thread is not None
    return thread


async def get_thread(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, thread_id: uuid.UUID
) -> Thread | None:
    row = await (await driver_of(db)).fetchrow(_GET_THREAD, thread_id, user_id)
    return _thread(row)


# Newest first, after the cursor's (updated_at, id) for a later page (paging.keyset's rule; index
# ix_threads_user_updated).
_LIST_THREADS = f"""
    SELECT {_THREAD_COLUMNS} FROM threads WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT $2
"""  # noqa: S608
_LIST_THREADS_AFTER = f"""
    SELECT {_THREAD_COLUMNS} FROM threads WHERE user_id = $1 AND (updated_at, id) < ($3, $4)
     ORDER BY updated_at DESC, id DESC LIMIT $2
"""  # noqa: S608


async def list_threads(
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, limit: int, after: Cursor | None
) -> list[Thread]:
    conn = await driver_of(db)
    if after is None:
        rows = await conn.fetch(_LIST_THREADS, user_id, limit)
    else:
        rows = await conn.fetch(_LIST_THREADS_AFTER, user_id, limit, after.at, after.id)
    return [from_row(Thread, row) for row in rows]


_SET_TITLE = f"""
    UPDATE threads SET title = $3, title_generated = false, updated_at = now()
     WHERE id = $1 AND user_id = $2
    RETURNING {_THREAD_COLUMNS}
"""  # noqa: S608


async def set_title(
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, thread_id: uuid.UUID, title: str
) -> Thread | None:
    """A title the user chose (it is never replaced by a generated one)."""
    return _thread(await (await driver_of(db)).fetchrow(_SET_TITLE, thread_id, user_id, title))


_SET_GENERATED_TITLE = """
    UPDATE threads SET title = $3, title_generated = true, updated_at = now()
     WHERE id = $1 AND user_id = $2 AND title = ''
"""


async def set_generated_title(
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, thread_id: uuid.UUID, title: str
) -> bool:
    """Only while the thread has no title, so a title the user set meanwhile wins."""
    status = await (await driver_of(db)).execute(_SET_GENERATED_TITLE, thread_id, user_id, title)
    return status != "UPDATE 0"


async def delete_thread(
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, thread_id: uuid.UUID
) -> bool:
    status = await (await driver_of(db)).execute(
        "DELETE FROM threads WHERE id = $1 AND user_id = $2", thread_id, user_id
    )
    return status != "DELETE 0"


# -- messages ------------------------------------------------------------------------------------


async def send(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    content: str,
    client_message_id: uuid.UUID | None,
    reply_id: uuid.UUID,
    model: str,
    lease: timedelta,
    first_events: str,
    touch_thread: bool,
) -> tuple[Message, Message, Thread | None] | None:
    """One statement: the user's message, and the reply to it as `start_reply` makes it. None when
    `client_message_id` was taken meanwhile (by a concurrent retry of the same send)."""
    row = await (await driver_of(db)).fetchrow(
        _SEND,
        reply_id,
        thread_id,
        user_id,
        model,
        lease,
        first_events,
        touch_thread,
        uuid.uuid4(),
        content,
        client_message_id,
    )
    if row is None:
        return None
    user_message, reply = _message(row, prefix="um_"), _message(row)
    assert user_message is not None and reply is not None
    return user_message, reply, _thread(row, prefix="touched_")


async def start_reply(
    db: AsyncSession | asyncpg.Connection,
    *,
    reply_id: uuid.UUID,
    parent: Message,
    model: str,
    lease: timedelta,
    first_events: str,
    touch_thread: bool,
) -> tuple[Message, Thread | None]:
    """One statement: the assistant message, GENERATING at seq 1, its first stored events, and with
    `touch_thread` the thread's updated_at (the thread returned)."""
    row = await (await driver_of(db)).fetchrow(
        _START_REPLY,
        reply_id,
        parent.thread_id,
        parent.user_id,
        model,
        lease,
        first_events,
        touch_thread,
        parent.id,
        parent.turn,
    )
    reply = _message(row)
    assert reply is not None
    return reply, _thread(row, prefix="touched_")


_GET_MESSAGE = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND user_id = $2"  # noqa: S608


async def get_message(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, message_id: uuid.UUID, *, lock: bool = False
) -> Message | None:
    query = _GET_MESSAGE + " FOR UPDATE" if lock else _GET_MESSAGE
    return _message(await (await driver_of(db)).fetchrow(query, message_id, user_id))


async def user_message_by_client_id(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, client_message_id: uuid.UUID
) -> Message | None:
    return _message(await (await driver_of(db)).fetchrow(_BY_CLIENT_ID, user_id, client_message_id))


async def latest_reply(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, parent_id: uuid.UUID
) -> Message | None:
    return _message(await (await driver_of(db)).fetchrow(_LATEST_REPLY, parent_id, user_id))


_HAS_GENERATING_REPLY = f"""
    SELECT EXISTS (SELECT 1 FROM messages
                    WHERE parent_message_id = $1 AND user_id = $2 AND status = '{GENERATING}')
"""  # noqa: S608


async def has_generating_reply(
    db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, parent_id: uuid.UUID
) -> bool:
    return await (await driver_of(db)).fetchval(_HAS_GENERATING_REPLY, parent_id, user_id)


_IS_FIRST_TURN = f"""
    SELECT NOT EXISTS (SELECT 1 FROM messages WHERE thread_id = $1 AND role = '{ROLE_USER}' AND turn < $2)
"""  # noqa: S608


async def is_first_turn(db: AsyncSession | asyncpg.Connection, thread_id: uuid.UUID, turn: int) -> bool:
    return await (await driver_of(db)).fetchval(_IS_FIRST_TURN, thread_id, turn)


def _active_branch(m: str) -> str:
    """SQL: message `m` (a table alias) is on the active branch: a user's message, or the newest
    reply to one."""
    return f"""({m}.role = '{ROLE_USER}' OR NOT EXISTS (
                 SELECT 1 FROM messages newer
                  WHERE newer.parent_message_id = {m}.parent_message_id AND newer.position > {m}.position))"""  # noqa: S608


# A page of a thread's messages in (turn, position) order, after ($5, $6) when $5 is not NULL; with
# $3 every branch, else the active one.
_LIST_MESSAGES = f"""
    SELECT {columns(Message, "m.")} FROM messages m
     WHERE m.thread_id = $1 AND m.user_id = $2 AND ($3 OR {_active_branch("m")})
       AND ($5::bigint IS NULL OR (m.turn, m.position) > ($5, $6::bigint))
     ORDER BY m.turn, m.position LIMIT $4
"""  # noqa: S608


async def list_messages(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    limit: int,
    after: tuple[int, int] | None,
    all_branches: bool,
) -> list[Message]:
    turn, position = after if after is not None else (None, None)
    rows = await (await driver_of(db)).fetch(
        _LIST_MESSAGES, thread_id, user_id, all_branches, limit, turn, position
    )
    return [from_row(Message, row) for row in rows]


def _history_sql(thread: str, user: str, before_turn: str, limit: str) -> str:
    """The active branch's (role, content, turn, position) before turn `before_turn` (NULL: all of
    it), newest first, at most `limit`; replies that failed, are still generating or are empty are
    left out. The arguments are SQL expressions."""
    return f"""
        SELECT m.role, m.content, m.turn, m.position FROM messages m
         WHERE m.thread_id = {thread} AND m.user_id = {user}
           AND m.status IN ('{COMPLETED}', '{CANCELLED}') AND m.content <> ''
           AND ({before_turn} IS NULL OR m.turn < {before_turn}) AND {_active_branch("m")}
         ORDER BY m.turn DESC, m.position DESC
         LIMIT {limit}
    """  # noqa: S608


_HISTORY = _history_sql("$1", "$2", "$3::bigint", "$4")

# Everything a new reply is planned from, in one round trip: the thread (none when $1 is NULL or
# not the user's), its history, today's use of quota $3 and the user's stored preferences.
_T_COLUMNS = ", ".join(f"t.{c.name} AS {c.name}" for c in Thread.__table__.columns)
_SEND_CONTEXT = f"""
    SELECT {_T_COLUMNS},
           coalesce(({used_today_sql("$2", "$3")}), 0) AS quota_used,
           ({preferences_sql("$2")}) AS preferences,
           h.roles, h.contents
      FROM (SELECT 1) AS one
      LEFT JOIN threads t ON t.id = $1 AND t.user_id = $2
      LEFT JOIN LATERAL (
        SELECT array_agg(role ORDER BY turn DESC, position DESC) AS roles,
               array_agg(content ORDER BY turn DESC, position DESC) AS contents
          FROM ({_history_sql("t.id", "$2", "NULL::bigint", "$4")}) AS past
      ) h ON t.id IS NOT NULL
"""  # noqa: S608


@dataclass(frozen=True)
class SendContext:
    thread: Thread | None
    past: list[tuple[str, str]]  # (role, content), newest first
    quota_used: int
    preferences: dict


async def send_context(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID | None,
    quota_kind: str,
    limit: int,
) -> SendContext:
    row = await (await driver_of(db)).fetchrow(_SEND_CONTEXT, thread_id, user_id, quota_kind, limit)
    assert row is not None
    return SendContext(
        thread=_thread(row),
        past=list(zip(row["roles"] or (), row["contents"] or (), strict=True)),
        quota_used=row["quota_used"],
        preferences=row["preferences"] or {},  # jsonb, decoded by SQLAlchemy's codec on every connection
    )


async def history(
    db: AsyncSession, *, user_id: uuid.UUID, thread_id: uuid.UUID, before_turn: int | None, limit: int
) -> list[tuple[str, str]]:
    """(role, content) of the active branch before `before_turn` (None: all of it), NEWEST first;
    replies that failed, are still generating or are empty are left out."""
    rows = await (await driver_of(db)).fetch(_HISTORY, thread_id, user_id, before_turn, limit)
    return [(r["role"], r["content"]) for r in rows]


_SET_FEEDBACK = f"""
    UPDATE messages
       SET feedback_rating = $3::smallint, feedback_comment = $4,
           feedback_at = CASE WHEN $3::smallint <> 0 THEN now() END, updated_at = now()
     WHERE id = $1 AND user_id = $2 AND role = '{ROLE_ASSISTANT}'
    RETURNING {_MESSAGE_COLUMNS}
"""  # noqa: S608


async def set_feedback(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    message_id: uuid.UUID,
    rating: int,
    comment: str,
) -> Message | None:
    row = await (await driver_of(db)).fetchrow(_SET_FEEDBACK, message_id, user_id, rating, comment)
    return _message(row)


# -- generations -----------------------------------------------------------------------------------


async def finish(
    db: AsyncSession | asyncpg.Connection,
    *,
    message_id: uuid.UUID,
    content: str,
    seq: int,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_estimated: bool,
    error_reason: str,
    events_first: int,
    events_data: str,
    channel: str,
    payloads: list[str],
    quota_kind: str,
    quota_amount: int,
) -> Message | None:
    """The reply's last save (`_FINISH`): its final row, or None when it was no longer GENERATING."""
    row = await (await driver_of(db)).fetchrow(
        _FINISH,
        message_id,
        content,
        seq,
        status,
        prompt_tokens,
        completion_tokens,
        usage_estimated,
        error_reason,
        events_first,
        events_data,
        channel,
        payloads,
        quota_kind,
        quota_amount,
    )
    return _message(row)


# Generations whose lease ran out, of user $1, in thread $3 or the message $3 (`_FAIL_EXPIRED`'s
# key says which), marked FAILED ($2 the reason): seq grows by two for an (estimated) usage event and
# the done event, which the caller stores.
def _fail_expired_sql(column: str) -> str:
    return f"""
        UPDATE messages
           SET status = '{FAILED}', seq = seq + 2, error_reason = $2, usage_estimated = true,
               prompt_tokens = 0, completion_tokens = (length(content) + 3) / 4,
               lease_expires_at = NULL, updated_at = now()
         WHERE user_id = $1 AND status = '{GENERATING}' AND lease_expires_at < now() AND {column} = $3
        RETURNING {_MESSAGE_COLUMNS}
    """  # noqa: S608


_FAIL_EXPIRED = {"thread": _fail_expired_sql("thread_id"), "message": _fail_expired_sql("id")}


async def fail_expired(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    reason: str,
) -> list[Message]:
    """Mark FAILED the generations of a thread, or one message, whose lease ran out (their replica
    is gone). The caller stores their `done` event at the new seq (one past the last stored event)."""
    if (thread_id is None) == (message_id is None):
        raise ValueError("fail_expired takes a thread_id or a message_id")
    key, value = ("thread", thread_id) if thread_id is not None else ("message", message_id)
    rows = await (await driver_of(db)).fetch(_FAIL_EXPIRED[key], user_id, reason, value)
    return [from_row(Message, row) for row in rows]


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
    await (await driver_of(db)).execute(
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
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, message_id: uuid.UUID, after_seq: int
) -> list[str]:
    """The stored batches holding events after `after_seq`, in order."""
    rows = await (await driver_of(db)).fetch(
        "SELECT data FROM message_events WHERE message_id = $1 AND user_id = $2 AND seq_last > $3"
        " ORDER BY seq_first",
        message_id,
        user_id,
        after_seq,
    )
    return [row["data"] for row in rows]


# -- export ---------------------------------------------------------------------------------------

_EXPORT_THREADS = f"""
    SELECT {_THREAD_COLUMNS} FROM threads
     WHERE user_id = $1 AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))
     ORDER BY created_at, id LIMIT $2
"""  # noqa: S608


async def threads_for_export(
    db: AsyncSession | asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Thread]:
    at, last = after if after is not None else (None, None)
    rows = await (await driver_of(db)).fetch(_EXPORT_THREADS, user_id, limit, at, last)
    return [from_row(Thread, row) for row in rows]


_MESSAGES_OF_THREADS = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 AND thread_id = ANY($2::uuid[])
     ORDER BY thread_id, turn, position
"""  # noqa: S608


async def messages_of_threads(
    db: AsyncSession | asyncpg.Connection, *, user_id: uuid.UUID, thread_ids: list[uuid.UUID]
) -> list[Message]:
    if not thread_ids:
        return []
    rows = await (await driver_of(db)).fetch(_MESSAGES_OF_THREADS, user_id, thread_ids)
    return [from_row(Message, row) for row in rows]
