"""Following a reply from the database and LISTEN/NOTIFY: how a replica that does not run a
generation (or a client that lost its stream) gets its events.

Order matters: subscribe to the message's channel FIRST, then read the stored state, then apply
notifications, dropping the seqs already sent. Nothing can fall between the read and the first
notification, and duplicates are harmless. Whenever a notification may have been missed (the
LISTEN connection reconnected, a gap in seq, a batch too large for NOTIFY, or simply a quiet
while), the stored state is read again; an idle re-read also notices a generation whose replica
died (expired lease) and finishes it as FAILED, so a watcher never waits forever.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from everything_server import errors
from everything_server.chat import repository as repo
from everything_server.chat.events import (
    DONE,
    START,
    Event,
    Poke,
    coalesce,
    decode_batch,
    decode_notification,
)
from everything_server.chat.generation import Generator, channel, started_view
from everything_server.chat.models import GENERATING, Message
from everything_server.db.database import Database
from everything_server.db.pubsub import PubSub
from everything_server.rpc.context import Principal

IDLE_RECHECK_SECONDS = 5.0
MIN_RECHECK_SECONDS = 0.2

_RESYNC = object()


class Watcher:
    def __init__(self, db: Database, pubsub: PubSub, generator: Generator):
        self._db = db
        self._pubsub = pubsub
        self._gen = generator

    async def _read(self, p: Principal, message_id: uuid.UUID, after_seq: int) -> tuple[Message, list[str]]:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            await self._gen.fail_expired(s, p.user_id, message_id=message_id)
            row = await repo.get_message(s, p.user_id, message_id)
            if row is None:
                raise errors.NotFound("message", str(message_id))
            batches = await repo.events_after(
                s, user_id=p.user_id, message_id=message_id, after_seq=after_seq
            )
        return row, batches

    async def _final(self, p: Principal, message_id: uuid.UUID) -> Message:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            row = await repo.get_message(s, p.user_id, message_id)
        if row is None:
            raise errors.NotFound("message", str(message_id))
        return row

    async def follow(
        self, p: Principal, message_id: uuid.UUID, after_seq: int
    ) -> AsyncIterator[tuple[Event, Message | None]]:
        """(event, message) pairs: the message is the started view for `start`, the final message
        for `done` (always delivered, last), None otherwise."""
        queue: asyncio.Queue = asyncio.Queue()
        on_notify = queue.put_nowait
        name = channel(message_id)
        await self._pubsub.subscribe(name, on_notify)
        unhook = self._pubsub.on_reconnect(lambda: queue.put_nowait(_RESYNC))
        try:
            last = after_seq
            while True:
                row, batches = await self._read(p, message_id, last)
                for data in batches:
                    for ev in coalesce(decode_batch(data), last):
                        if ev.kind == DONE:
                            final = row if row.status != GENERATING else await self._final(p, message_id)
                            yield ev, final
                            return
                        yield ev, started_view(row) if ev.kind == START else None
                        last = ev.seq
                if row.status != GENERATING:
                    # Finished, and its `done` is at or before after_seq: the stream still ends with it.
                    yield Event(row.seq, DONE, status=row.status, error_reason=row.error_reason), row
                    return
                while True:  # follow notifications until something says "read again"
                    try:
                        async with asyncio.timeout(_recheck_after(row)):
                            item = await queue.get()
                    except TimeoutError:
                        break
                    if item is _RESYNC:
                        break
                    decoded = decode_notification(item)
                    if isinstance(decoded, Poke):
                        if decoded.upto > last:
                            break
                        continue
                    if not decoded or decoded[0].seq > last + 1:  # a gap: something was missed
                        break
                    for ev in coalesce(decoded, last):
                        if ev.kind == DONE:
                            yield ev, await self._final(p, message_id)
                            return
                        yield ev, started_view(row) if ev.kind == START else None
                        last = ev.seq
        finally:
            unhook()
            await self._pubsub.unsubscribe(name, on_notify)


def _recheck_after(row: Message) -> float:
    """Re-read after a quiet while, and soon after the lease would run out if nobody renews it."""
    if row.lease_expires_at is None:
        return IDLE_RECHECK_SECONDS
    remaining = (row.lease_expires_at - datetime.now(UTC)).total_seconds() + MIN_RECHECK_SECONDS
    return min(IDLE_RECHECK_SECONDS, max(MIN_RECHECK_SECONDS, remaining))
