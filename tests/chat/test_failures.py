"""Upstream failures and cancels: the right status on the stream, the message saved with its partial
text, usage and reason, and nothing left GENERATING."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc

from everything.chat.v1 import chat_service_pb2 as pb
from everything_server import errors
from tests.chat.helpers import (
    CANCELLED,
    COMPLETED,
    FAILED,
    Collected,
    assert_seqs,
    collect,
    marker,
    read_until,
    send,
)
from tests.support import details, expect_error


async def failing_send(chat_stub, user, content: str) -> tuple[Collected, grpc.aio.AioRpcError]:
    got = Collected()
    try:
        await collect(chat_stub.SendMessage(pb.SendMessageRequest(content=content), metadata=user.md), got)
    except grpc.aio.AioRpcError as err:
        return got, err
    raise AssertionError("the stream should have failed")


async def stored(db_conn, message_id: str):
    return await db_conn.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(message_id))


async def test_a_rate_limited_upstream_is_resource_exhausted_with_retry_info(chat_stub, user, db_conn):
    got, err = await failing_send(chat_stub, user, f"{marker()} [mock:status=429 retry-after=2]")
    d = details(err)
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.reason == "UPSTREAM_RATE_LIMITED"
    assert d.retry_after == 2
    # The stream told the whole story before the status: saved, started, usage, completed (FAILED).
    assert got.kinds == ["user_message_saved", "message_started", "usage_reported", "message_completed"]
    assert got.final.status == FAILED and got.final.error_reason == "UPSTREAM_RATE_LIMITED"
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed" and row["error_reason"] == "UPSTREAM_RATE_LIMITED"
    assert row["usage_estimated"] and row["prompt_tokens"] > 0 and row["completion_tokens"] == 0


async def test_an_upstream_server_error_is_unavailable(chat_stub, user, db_conn):
    got, err = await failing_send(chat_stub, user, f"{marker()} [mock:status=500]")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err).reason == "UPSTREAM_UNAVAILABLE"
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed" and row["error_reason"] == "UPSTREAM_UNAVAILABLE"


async def test_a_cut_connection_is_unavailable_and_keeps_the_partial_text(chat_stub, user, db_conn):
    got, err = await failing_send(chat_stub, user, f"{marker()} [mock:tokens=10 cut-after=4]")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err).reason == "UPSTREAM_UNAVAILABLE"
    assert len(got.text.split()) == 4
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed" and row["content"] == got.text and len(row["content"].split()) == 4
    assert row["usage_estimated"] and row["completion_tokens"] > 0
    assert got.final.content == got.text and got.final.usage.estimated


async def test_a_malformed_chunk_is_unavailable_bad_response(chat_stub, user, db_conn):
    got, err = await failing_send(chat_stub, user, f"{marker()} [mock:tokens=10 malformed-after=2]")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err).reason == "UPSTREAM_BAD_RESPONSE"
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed" and len(row["content"].split()) == 2


async def test_a_stalled_upstream_is_deadline_exceeded_after_the_stall_timeout(
    chat_stub, user, db_conn, settings
):
    loop = asyncio.get_running_loop()
    start = loop.time()
    got, err = await failing_send(chat_stub, user, f"{marker()} [mock:tokens=10 stall-after=3]")
    elapsed = loop.time() - start
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details(err).reason == "UPSTREAM_TIMEOUT"
    assert settings.openai_stall_timeout_seconds <= elapsed < settings.openai_stall_timeout_seconds + 5
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed" and row["error_reason"] == "UPSTREAM_TIMEOUT"
    assert len(row["content"].split()) == 3


async def test_an_unknown_model_fails_the_reply_naming_the_model(chat_stub, user, db_conn):
    got, err = await failing_send_model(chat_stub, user, "no-such-model")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in details(err).fields
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "failed"


async def failing_send_model(chat_stub, user, model: str):
    got = Collected()
    try:
        await collect(
            chat_stub.SendMessage(
                pb.SendMessageRequest(content=f"{marker()} [mock:status=404]", model=model), metadata=user.md
            ),
            got,
        )
    except grpc.aio.AioRpcError as err:
        return got, err
    raise AssertionError("the stream should have failed")


async def test_cancel_stops_the_upstream_and_saves_the_partial_reply_with_usage(
    chat_stub, user, db_conn, mock_model
):
    aborts_before = len(mock_model.aborts)
    call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=f"{marker()} [mock:tokens=200 rate=20]"), metadata=user.md
    )
    got = Collected()
    await read_until(call, lambda ev: len(got.of("text_delta")) >= 3, got)
    resp = await chat_stub.CancelGeneration(
        pb.CancelGenerationRequest(message_id=got.reply_id), metadata=user.md
    )
    await collect(call, got)  # the original stream ends cleanly

    assert resp.message.status == CANCELLED
    assert got.kinds[-2:] == ["usage_reported", "message_completed"]
    assert got.final.status == CANCELLED and got.final.content == got.text == resp.message.content
    assert 3 <= len(got.text.split()) < 200
    assert_seqs(got.events[1:], first=1, last=got.final.seq)
    # The upstream saw the client go away: the model stopped generating.
    abort = await mock_model.wait_for_abort(count=aborts_before + 1)
    assert 3 <= abort.sent < 200
    usage = resp.message.usage
    assert usage.estimated and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    row = await stored(db_conn, got.reply_id)
    assert row["status"] == "cancelled" and row["content"] == got.text
    assert row["usage_estimated"] and row["completion_tokens"] == usage.completion_tokens


async def test_cancelling_a_finished_message_is_failed_precondition(chat_stub, user):
    got = await send(chat_stub, user, f"{marker()} [mock:tokens=2]")
    for message_id in (got.reply_id, got.user_saved.message.id):
        await expect_error(
            chat_stub.CancelGeneration(pb.CancelGenerationRequest(message_id=message_id), metadata=user.md),
            grpc.StatusCode.FAILED_PRECONDITION,
            "GENERATION_NOT_ACTIVE",
        )
    await expect_error(
        chat_stub.CancelGeneration(
            pb.CancelGenerationRequest(message_id=str(uuid.uuid4())), metadata=user.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_regenerating_while_a_reply_is_generating_is_refused(chat_stub, user):
    call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=f"{marker()} [mock:tokens=100 rate=50]"), metadata=user.md
    )
    got = Collected()
    await read_until(call, lambda ev: ev.WhichOneof("event") == "text_delta", got)
    await expect_error(
        collect(
            chat_stub.RegenerateMessage(
                pb.RegenerateMessageRequest(message_id=got.reply_id), metadata=user.md
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await chat_stub.CancelGeneration(pb.CancelGenerationRequest(message_id=got.reply_id), metadata=user.md)
    await collect(call, got)
    assert got.final.status == CANCELLED


async def test_a_generation_whose_replica_died_is_marked_failed(chat_stub, user, db_conn):
    """A GENERATING row whose lease ran out has nobody generating it: watchers, cancels and lists
    finish it as FAILED instead of waiting forever."""
    got = await send(chat_stub, user, f"{marker()} [mock:tokens=3]")
    thread_id = uuid.UUID(got.user_saved.thread.id)

    async def orphan(content: str, lease_seconds: float) -> uuid.UUID:
        # What a replica that died mid-reply leaves behind: a GENERATING row and its stored events.
        user_msg = await db_conn.fetchrow(
            "INSERT INTO messages (id, thread_id, user_id, role, status, content, turn) "
            "VALUES ($1, $2, $3, 'user', 'completed', 'q', nextval('messages_position_seq')) RETURNING *",
            uuid.uuid4(),
            thread_id,
            uuid.UUID(user.id),
        )
        reply_id = uuid.uuid4()
        await db_conn.execute(
            "INSERT INTO messages (id, thread_id, user_id, role, status, content, parent_message_id, turn, seq,"
            " lease_expires_at) VALUES ($1, $2, $3, 'assistant', 'generating', $4, $5, $6, 3,"
            " now() + make_interval(secs => $7))",
            reply_id,
            thread_id,
            uuid.UUID(user.id),
            content,
            user_msg["id"],
            user_msg["turn"],
            lease_seconds,
        )
        await db_conn.execute(
            "INSERT INTO message_events (message_id, seq_first, seq_last, user_id, data) "
            "VALUES ($1, 1, 3, $2, $3)",
            reply_id,
            uuid.UUID(user.id),
            f'[1,{{"k":"start"}},"{content[:3]}","{content[3:]}"]',
        )
        return reply_id

    # A watcher that is following when the lease runs out.
    watched = await orphan("Partial", 1.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = await collect(
        chat_stub.WatchMessage(pb.WatchMessageRequest(message_id=str(watched)), metadata=user.md)
    )
    assert loop.time() - start < 8
    # The two stored deltas are replayed together, as one.
    assert events.kinds == ["message_started", "text_delta", "usage_reported", "message_completed"]
    assert events.seqs == [1, 3, 4, 5]
    assert events.final.status == FAILED and events.final.error_reason == "SHUTTING_DOWN"
    assert events.final.content == "Partial" and events.final.usage.estimated

    # A cancel of an orphan finds it not active any more; a list shows it FAILED.
    cancelled = await orphan("Other", -1.0)
    await expect_error(
        chat_stub.CancelGeneration(pb.CancelGenerationRequest(message_id=str(cancelled)), metadata=user.md),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GENERATION_NOT_ACTIVE",
    )
    listed = await orphan("Third", -1.0)
    page = await chat_stub.ListMessages(
        pb.ListMessagesRequest(thread_id=str(thread_id), include_all_branches=True), metadata=user.md
    )
    by_id = {m.id: m for m in page.messages}
    assert by_id[str(listed)].status == FAILED and by_id[str(cancelled)].status == FAILED
    row = await stored(db_conn, str(listed))
    assert row["status"] == "failed" and row["seq"] == 5


async def test_watching_a_finished_reply_replays_it_from_any_seq(chat_stub, user):
    got = await send(chat_stub, user, f"{marker()} [mock:tokens=8]")
    whole = await collect(
        chat_stub.WatchMessage(pb.WatchMessageRequest(message_id=got.reply_id), metadata=user.md)
    )
    assert_seqs(whole.events, first=1, last=got.final.seq)
    assert whole.text == got.text and whole.final == got.final
    tail = await collect(
        chat_stub.WatchMessage(pb.WatchMessageRequest(message_id=got.reply_id, after_seq=5), metadata=user.md)
    )
    assert_seqs(tail.events, first=6, last=got.final.seq)
    assert tail.text.split() == got.text.split()[4:]  # deltas 6..9 of 2..9: the last four words
    # Past the end: the stream still ends with the final message.
    past = await collect(
        chat_stub.WatchMessage(
            pb.WatchMessageRequest(message_id=got.reply_id, after_seq=10_000), metadata=user.md
        )
    )
    assert past.kinds == ["message_completed"] and past.final.status == COMPLETED


async def test_deleting_a_thread_stops_its_generation_and_ends_the_stream(
    chat_stub, user, db_conn, mock_model
):
    aborts_before = len(mock_model.aborts)
    call = chat_stub.SendMessage(
        pb.SendMessageRequest(content=f"{marker()} [mock:tokens=200 rate=20]"), metadata=user.md
    )
    got = Collected()
    await read_until(call, lambda ev: ev.WhichOneof("event") == "text_delta", got)
    await chat_stub.DeleteThread(pb.DeleteThreadRequest(thread_id=got.user_saved.thread.id), metadata=user.md)
    try:
        await asyncio.wait_for(collect(call, got), 10)
        raise AssertionError("the stream should end with NOT_FOUND")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert got.kinds[-1] == "message_completed"
    await mock_model.wait_for_abort(count=aborts_before + 1)
    assert await db_conn.fetchval("SELECT count(*) FROM messages WHERE id = $1", uuid.UUID(got.reply_id)) == 0


async def test_a_setup_commit_that_fails_closes_the_model_call_and_leaves_nothing(
    app, chat_stub, user, db_conn, mock_model, monkeypatch
):
    """The model is called while the setup transaction's COMMIT is in flight. If that COMMIT fails,
    the client gets the error (not a token), the upstream request is closed, and no row is left."""
    db = app.container.db
    original = db.driver_transaction
    text = f"{marker()} [mock:tokens=200 rate=20]"

    @contextlib.asynccontextmanager
    async def failing_commit(user_id, session_id=None):
        async with original(user_id, session_id) as conn:
            yield conn
            await mock_model.wait_for_requests(requests_before + 1)  # the model was called meanwhile
            raise errors.Unavailable("the database is unavailable", reason="DATABASE_UNAVAILABLE")

    requests_before, aborts_before = len(mock_model.requests), len(mock_model.aborts)
    monkeypatch.setattr(db, "driver_transaction", failing_commit)
    got, err = await failing_send(chat_stub, user, text)
    monkeypatch.undo()
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err).reason == "DATABASE_UNAVAILABLE"
    assert got.kinds == []  # not even user_message_saved
    await mock_model.wait_for_abort(count=aborts_before + 1)
    assert await db_conn.fetchval("SELECT count(*) FROM messages WHERE content = $1", text) == 0
    # The next send goes through as usual.
    ok = await send(chat_stub, user, f"{marker()} [mock:tokens=3]")
    assert ok.final.status == COMPLETED
