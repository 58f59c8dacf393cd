"""Helpers for the chat tests: streams collected into events, bounded waits on stored rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import asyncpg

from everything.chat.v1 import chat_pb2
from everything.chat.v1 import chat_service_pb2 as pb

COMPLETED = chat_pb2.MESSAGE_STATUS_COMPLETED
CANCELLED = chat_pb2.MESSAGE_STATUS_CANCELLED
FAILED = chat_pb2.MESSAGE_STATUS_FAILED
GENERATING = chat_pb2.MESSAGE_STATUS_GENERATING


def marker() -> str:
    """A unique word for a prompt, so the mock's reply and its recorded request are this test's own."""
    return f"m{uuid.uuid4().hex[:12]}"


@dataclass
class Collected:
    """The events of a reply stream, by kind."""

    events: list = field(default_factory=list)

    def add(self, ev) -> None:
        self.events.append(ev)

    @property
    def kinds(self) -> list[str]:
        return [ev.WhichOneof("event") for ev in self.events]

    @property
    def seqs(self) -> list[int]:
        return [ev.seq for ev in self.events]

    def of(self, kind: str) -> list:
        return [getattr(ev, kind) for ev in self.events if ev.WhichOneof("event") == kind]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.of("text_delta"))

    @property
    def reply_id(self) -> str:
        return next(ev.message_id for ev in self.events if ev.WhichOneof("event") == "message_started")

    @property
    def final(self) -> chat_pb2.Message:
        return self.of("message_completed")[-1].message

    @property
    def user_saved(self) -> pb.UserMessageSaved:
        return self.of("user_message_saved")[0]


def assert_seqs(events, first: int = 1, last: int | None = None) -> None:
    """The streams' contract: seqs grow by one per event, except that a text_delta may stand for
    several deltas that were ready together (coalesced) and then carries the seq of the last."""
    expected = first
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "text_delta":
            assert ev.seq >= expected, (kind, ev.seq, expected)
        else:
            assert ev.seq == expected, (kind, ev.seq, expected)
        expected = ev.seq + 1
    if last is not None:
        assert expected - 1 == last, (expected - 1, last)


def text_after(got: Collected, seq: int) -> str:
    """The text a stream delivered in events after `seq` (`seq` must be a seq it delivered)."""
    assert seq in got.seqs
    return "".join(ev.text_delta.text for ev in got.events if ev.seq > seq and ev.HasField("text_delta"))


async def collect(call, into: Collected | None = None) -> Collected:
    """Read a stream to its end (errors propagate; `into` keeps what came before them)."""
    out = into if into is not None else Collected()
    async for ev in call:
        out.add(ev)
    return out


async def send(chat_stub, user, content: str, **fields) -> Collected:
    return await collect(
        chat_stub.SendMessage(pb.SendMessageRequest(content=content, **fields), metadata=user.md)
    )


async def read_until(call, predicate, into: Collected) -> None:
    """Read events until `predicate(event)` holds (the stream stays open)."""
    async for ev in call:
        into.add(ev)
        if predicate(ev):
            return
    raise AssertionError("the stream ended before the expected event")


async def wait_for_row(
    db_conn: asyncpg.Connection, message_id: str, predicate, timeout: float = 15.0
) -> asyncpg.Record:
    """Poll the stored message (bounded) until `predicate(row)` holds."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = await db_conn.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(message_id))
        if row is not None and predicate(row):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"message {message_id} never matched; last row: {dict(row) if row else None}")


def requests_with(mock_model, text: str) -> list:
    """The chat requests the mock received whose messages mention `text`."""
    found = []
    for rec in list(mock_model.requests):
        body = rec.body
        if rec.path.endswith("/chat/completions") and isinstance(body, dict):
            if any(text in str(m.get("content", "")) for m in body.get("messages", [])):
                found.append(rec)
    return found
