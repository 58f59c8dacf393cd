"""SendMessage end to end: the real server in-process, the mock model over loopback, PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import orjson

from everything.chat.v1 import chat_pb2
from everything.chat.v1 import chat_service_pb2 as pb
from tests.chat.helpers import (
    COMPLETED,
    GENERATING,
    Collected,
    assert_seqs,
    collect,
    marker,
    read_until,
    requests_with,
    send,
    wait_for_row,
)
from tests.support import expect_error


async def test_a_reply_streams_in_order_with_consecutive_seqs_and_is_saved(chat_stub, user, db_conn):
    got = await send(chat_stub, user, f"Hello {marker()} [mock:tokens=12]")

    kinds = got.kinds
    assert kinds[0] == "user_message_saved"
    assert kinds[1] == "message_started"
    assert set(kinds[2:-3]) == {"text_delta"}
    assert kinds[-3:] == ["usage_reported", "thread_title_set", "message_completed"]
    # user_message_saved is seq 0 of the user message; the reply's events count up by one from 1
    # (12 deltas: 12 seqs, in as many text_delta messages as the stream needed).
    assert got.events[0].seq == 0
    assert got.events[0].message_id == got.user_saved.message.id
    assert_seqs(got.events[1:], first=1, last=1 + 12 + 3)
    assert {ev.message_id for ev in got.events[1:]} == {got.reply_id}

    started = got.of("message_started")[0].message
    assert started.status == GENERATING and started.role == chat_pb2.MESSAGE_ROLE_ASSISTANT
    assert started.parent_message_id == got.user_saved.message.id

    final = got.final
    assert final.status == COMPLETED
    assert final.content == got.text and len(final.content.split()) == 12
    assert final.seq == got.seqs[-1]
    assert final.usage.completion_tokens == 12 and not final.usage.estimated
    assert final.usage.prompt_tokens > 0
    assert got.of("usage_reported")[0].usage == final.usage

    row = await db_conn.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(got.reply_id))
    assert row["status"] == "completed" and row["content"] == got.text and row["seq"] == final.seq
    assert row["completion_tokens"] == 12 and row["lease_expires_at"] is None
    user_row = await db_conn.fetchrow(
        "SELECT * FROM messages WHERE id = $1", uuid.UUID(got.user_saved.message.id)
    )
    assert user_row["role"] == "user" and user_row["status"] == "completed"


async def test_a_fast_reply_comes_in_fewer_messages_than_tokens_all_of_it_in_order(chat_stub, user, settings):
    """The text is paced (EVERYTHING_STREAM_INTERVAL_MS, 40 ms by default): 60 tokens 10 ms apart
    come in about one message per interval, the first at once, none lost or reordered."""
    assert settings.stream_interval_ms == 40
    got = await send(chat_stub, user, f"Pace {marker()} [mock:tokens=60 rate=100]")
    deltas = got.of("text_delta")
    assert 2 <= len(deltas) <= 30, len(deltas)  # one per token (about 60) without pacing
    assert got.final.content == got.text and len(got.text.split()) == 60
    assert_seqs(got.events[1:], first=1, last=1 + 60 + 3)


async def test_the_user_message_is_saved_before_the_model_is_called(chat_stub, user, db_conn, mock_model):
    word = marker()
    call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=f"{word} [mock:delay=1 tokens=3]"), metadata=user.md
    )
    got = Collected()
    await read_until(call, lambda ev: ev.WhichOneof("event") == "message_started", got)
    # The model has not answered yet (it waits a second), but both rows exist already.
    assert got.kinds == ["user_message_saved", "message_started"]
    rows = await db_conn.fetch(
        "SELECT role, status FROM messages WHERE thread_id = $1 ORDER BY position",
        uuid.UUID(got.user_saved.thread.id),
    )
    assert [(r["role"], r["status"]) for r in rows] == [("user", "completed"), ("assistant", "generating")]
    await collect(call, got)
    assert got.final.status == COMPLETED


async def test_a_retry_with_the_same_client_message_id_returns_the_same_pair(chat_stub, user, db_conn):
    client_id = str(uuid.uuid4())
    content = f"Once only {marker()} [mock:tokens=5]"
    first = await send(chat_stub, user, content, client_message_id=client_id)
    again = await send(chat_stub, user, content, client_message_id=client_id)

    assert again.user_saved.message.id == first.user_saved.message.id
    assert again.user_saved.message.client_message_id == client_id
    assert again.reply_id == first.reply_id
    # The retry replays the stored reply: the same seqs and text.
    assert_seqs(again.events[1:], first=1, last=first.seqs[-1])
    assert again.text == first.text and again.final.content == first.final.content
    count = await db_conn.fetchval(
        "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(first.user_saved.thread.id)
    )
    assert count == 2


async def test_a_retry_while_the_reply_is_generating_follows_it(chat_stub, user):
    client_id = str(uuid.uuid4())
    content = f"Slow {marker()} [mock:tokens=30 rate=30]"
    first_call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=content, client_message_id=client_id), metadata=user.md
    )
    first = Collected()
    await read_until(first_call, lambda ev: ev.WhichOneof("event") == "text_delta", first)
    again = await send(chat_stub, user, content, client_message_id=client_id)
    await collect(first_call, first)
    assert again.reply_id == first.reply_id
    assert again.text == first.text == first.final.content
    assert again.final.status == COMPLETED


async def test_a_client_message_id_reused_for_other_content_is_rejected(chat_stub, user):
    client_id = str(uuid.uuid4())
    await send(chat_stub, user, f"First {marker()} [mock:tokens=2]", client_message_id=client_id)
    await expect_error(
        send(chat_stub, user, "Something else", client_message_id=client_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="client_message_id",
    )


async def test_a_client_that_disconnects_does_not_stop_the_reply(chat_stub, user, db_conn):
    call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=f"Leave early {marker()} [mock:tokens=25 rate=25]"), metadata=user.md
    )
    got = Collected()
    await read_until(call, lambda ev: ev.WhichOneof("event") == "text_delta", got)
    call.cancel()
    row = await wait_for_row(db_conn, got.reply_id, lambda r: r["status"] != "generating")
    assert row["status"] == "completed"
    assert len(row["content"].split()) == 25
    assert row["completion_tokens"] == 25


async def test_a_client_deadline_shorter_than_the_reply_ends_the_call_but_not_the_reply(
    chat_stub, user, db_conn
):
    word = marker()
    got = Collected()
    try:
        await collect(
            chat_stub.SendMessage(
                pb.SendMessageRequest(content=f"Deadline {word} [mock:tokens=30 rate=20]"),
                metadata=user.md,
                timeout=0.8,
            ),
            got,
        )
        raise AssertionError("the call should have run out of time")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    row = await wait_for_row(db_conn, got.reply_id, lambda r: r["status"] != "generating")
    assert row["status"] == "completed" and len(row["content"].split()) == 30


async def test_the_model_gets_the_history_system_prompt_model_and_temperature(
    chat_stub, user, db_conn, mock_model
):
    await db_conn.execute(
        "INSERT INTO preferences (user_id, data) VALUES ($1, $2::jsonb)",
        uuid.UUID(user.id),
        orjson.dumps(
            {"system_prompt": "You are a pirate.", "chat_model": "gpt-4o", "temperature": 0.3}
        ).decode(),
    )
    first = await send(chat_stub, user, f"First question {marker()} [mock:tokens=4]")
    thread_id = first.user_saved.thread.id
    second = await send(chat_stub, user, f"Second question {marker()} [mock:echo]", thread_id=thread_id)

    echoed = orjson.loads(second.final.content)
    assert echoed["model"] == "gpt-4o"
    assert echoed["temperature"] == 0.3
    assert echoed["system"] == "You are a pirate."
    assert [m["role"] for m in echoed["messages"]] == ["system", "user", "assistant", "user"]
    assert echoed["messages"][1]["content"] == first.user_saved.message.content
    assert echoed["messages"][2]["content"] == first.final.content
    assert echoed["messages"][3]["content"] == second.user_saved.message.content
    assert second.final.model == "gpt-4o"

    # A model named in the request wins over the preference.
    third = await send(
        chat_stub, user, f"Third {marker()} [mock:echo]", thread_id=thread_id, model="gpt-4.1-mini"
    )
    assert orjson.loads(third.final.content)["model"] == "gpt-4.1-mini"


async def test_history_is_cut_to_the_budget_keeping_the_newest(chat_stub, user, settings, mock_model):
    budget = settings.history_budget_chars
    big = "x" * (budget // 2 + 10)
    first = await send(chat_stub, user, f"{big} one {marker()} [mock:tokens=2]")
    thread_id = first.user_saved.thread.id
    second_word = marker()
    await send(chat_stub, user, f"{big} two {second_word} [mock:tokens=2]", thread_id=thread_id)
    third_word = marker()
    await send(chat_stub, user, f"three {third_word} [mock:tokens=2]", thread_id=thread_id)

    (request,) = requests_with(mock_model, third_word)
    contents = [m["content"] for m in request.body["messages"]]
    sent = sum(len(c) for c in contents[1:-1])  # without the system prompt and the new message
    assert sent <= budget
    assert any(second_word in c for c in contents)  # the newest turn fits
    assert not any(" one " in c for c in contents)  # the oldest does not


async def test_the_first_exchange_gets_a_generated_title_once(chat_stub, user, db_conn):
    got = await send(chat_stub, user, f'Name me {marker()} [mock:tokens=3 text="Tides and Moons"]')
    (title,) = got.of("thread_title_set")
    assert title.title == "Tides and Moons"
    assert title.thread_id == got.user_saved.thread.id
    stored = await db_conn.fetchrow("SELECT * FROM threads WHERE id = $1", uuid.UUID(title.thread_id))
    assert stored["title"] == "Tides and Moons" and stored["title_generated"]
    # Later exchanges keep it.
    again = await send(chat_stub, user, f'More {marker()} [mock:text="Other"]', thread_id=title.thread_id)
    assert again.of("thread_title_set") == []


async def test_a_title_set_by_the_user_is_never_replaced(chat_stub, user):
    thread = (
        await chat_stub.CreateThread(pb.CreateThreadRequest(title="My own title"), metadata=user.md)
    ).thread
    got = await send(chat_stub, user, f'Hi {marker()} [mock:text="Generated"]', thread_id=thread.id)
    assert got.of("thread_title_set") == []
    again = await chat_stub.GetThread(pb.GetThreadRequest(thread_id=thread.id), metadata=user.md)
    assert again.thread.title == "My own title"


async def test_database_writes_per_reply_do_not_grow_with_its_length(chat_stub, user, db_conn):
    short = await send(chat_stub, user, f"short {marker()} [mock:tokens=10]")
    long = await send(chat_stub, user, f"long {marker()} [mock:tokens=3000]")
    assert len(long.final.content.split()) == 3000

    async def checkpoints(message_id: str) -> int:
        # One message_events row per checkpoint; each checkpoint is also the one UPDATE of the row.
        return await db_conn.fetchval(
            "SELECT count(*) FROM message_events WHERE message_id = $1", uuid.UUID(message_id)
        )

    short_writes, long_writes = await checkpoints(short.reply_id), await checkpoints(long.reply_id)
    assert short_writes <= 3
    # 3000 tokens, each its own event: a handful of checkpoints, not one row per token.
    assert long_writes <= 15, long_writes
    stored = await db_conn.fetchval(
        "SELECT sum(seq_last - seq_first + 1) FROM message_events WHERE message_id = $1",
        uuid.UUID(long.reply_id),
    )
    assert stored == long.final.seq  # every event stored, once


async def test_a_streamed_reply_is_stored_twice_whatever_its_length(chat_stub, user, db_conn):
    """At a model's pace (50 tokens/s), replies shorter than DURABLE_SECONDS are written when they
    start and when they finish, whether they have 25 or 150 tokens: the checkpoints in between only
    announce (NOTIFY), they do not write."""
    got = await asyncio.gather(
        send(chat_stub, user, f"short {marker()} [mock:tokens=25 rate=50]"),
        send(chat_stub, user, f"long {marker()} [mock:tokens=150 rate=50]"),
    )
    for reply in got:
        rows = await db_conn.fetch(
            "SELECT seq_first, seq_last FROM message_events WHERE message_id = $1 ORDER BY seq_first",
            uuid.UUID(reply.reply_id),
        )
        assert [tuple(r) for r in rows] == [(1, 1), (2, reply.final.seq)]


async def test_concurrent_replies_do_not_mix(chat_stub, user):
    words = [marker() for _ in range(4)]
    results = await asyncio.gather(*(send(chat_stub, user, f"{w} [mock:tokens=15 rate=100]") for w in words))
    assert len({r.reply_id for r in results}) == 4
    for r in results:
        assert r.text == r.final.content and r.final.status == COMPLETED
        assert_seqs(r.events[1:], first=1, last=r.final.seq)


async def test_replies_count_against_the_daily_token_quota(chat_stub, user, db_conn, settings):
    today = "(now() AT TIME ZONE 'utc')::date"
    used = f"SELECT amount FROM usage_counters WHERE user_id = $1 AND kind = 'chat_tokens' AND day = {today}"
    got = await send(chat_stub, user, f"count me {marker()} [mock:tokens=7]")
    usage = got.final.usage
    assert await db_conn.fetchval(used, uuid.UUID(user.id)) == usage.prompt_tokens + usage.completion_tokens

    await db_conn.execute(
        f"UPDATE usage_counters SET amount = $2 WHERE user_id = $1 AND kind = 'chat_tokens' AND day = {today}",
        uuid.UUID(user.id),
        settings.quota_daily_chat_tokens,
    )
    d = await expect_error(
        send(chat_stub, user, f"one more {marker()}", thread_id=got.user_saved.thread.id),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    )
    assert d.retry_after is not None and d.quota
    count = await db_conn.fetchval(
        "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(got.user_saved.thread.id)
    )
    assert count == 2  # nothing saved for the refused send
    # A regeneration reads the quota itself (a send reads it with its context): refused alike.
    await expect_error(
        collect(
            chat_stub.RegenerateMessage(
                pb.RegenerateMessageRequest(message_id=got.reply_id), metadata=user.md
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    )
