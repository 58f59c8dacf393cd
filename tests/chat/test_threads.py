"""Threads and messages: CRUD, keyset paging, branches, owner-only access and input limits."""

from __future__ import annotations

import uuid

import grpc
import orjson
from google.protobuf import field_mask_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.chat.v1 import chat_pb2
from everything.chat.v1 import chat_service_pb2 as pb
from tests.chat.helpers import COMPLETED, assert_seqs, collect, marker, send
from tests.support import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def test_threads_are_created_read_renamed_and_deleted_with_their_messages(chat_stub, user, db_conn):
    created = (
        await chat_stub.CreateThread(pb.CreateThreadRequest(title="  Plans  "), metadata=user.md)
    ).thread
    assert created.title == "Plans" and uuid.UUID(created.id)
    got = await chat_stub.GetThread(pb.GetThreadRequest(thread_id=created.id), metadata=user.md)
    assert got.thread == created

    renamed = (
        await chat_stub.UpdateThread(
            pb.UpdateThreadRequest(
                thread=chat_pb2.Thread(id=created.id, title="Holiday plans"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=user.md,
        )
    ).thread
    assert renamed.title == "Holiday plans"
    assert renamed.update_time.ToDatetime() >= created.update_time.ToDatetime()

    reply = await send(chat_stub, user, f"hi {marker()} [mock:tokens=2]", thread_id=created.id)
    assert reply.final.status == COMPLETED
    await chat_stub.DeleteThread(pb.DeleteThreadRequest(thread_id=created.id), metadata=user.md)
    await expect_error(
        chat_stub.GetThread(pb.GetThreadRequest(thread_id=created.id), metadata=user.md), NOT_FOUND
    )
    for table in ("messages", "message_events"):
        column = "thread_id" if table == "messages" else "message_id"
        ids = [uuid.UUID(created.id)] if table == "messages" else [uuid.UUID(reply.reply_id)]
        assert await db_conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = ANY($1)", ids) == 0
    await expect_error(
        chat_stub.DeleteThread(pb.DeleteThreadRequest(thread_id=created.id), metadata=user.md), NOT_FOUND
    )


async def test_threads_list_most_recently_updated_first_in_pages(chat_stub, user):
    ids = []
    for i in range(5):
        t = await chat_stub.CreateThread(pb.CreateThreadRequest(title=f"t{i}"), metadata=user.md)
        ids.append(t.thread.id)
    # Activity moves a thread to the front.
    await send(chat_stub, user, f"bump {marker()} [mock:tokens=1]", thread_id=ids[1])

    seen, token, pages = [], "", 0
    while True:
        page = await chat_stub.ListThreads(
            pb.ListThreadsRequest(page_size=2, page_token=token), metadata=user.md
        )
        assert len(page.threads) <= 2
        seen += [t.id for t in page.threads]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [ids[1], ids[4], ids[3], ids[2], ids[0]]


async def test_messages_list_oldest_first_in_pages(chat_stub, user):
    first = await send(chat_stub, user, f"one {marker()} [mock:tokens=2]")
    thread_id = first.user_saved.thread.id
    second = await send(chat_stub, user, f"two {marker()} [mock:tokens=2]", thread_id=thread_id)
    expected = [
        first.user_saved.message.id,
        first.reply_id,
        second.user_saved.message.id,
        second.reply_id,
    ]
    seen, token = [], ""
    while True:
        page = await chat_stub.ListMessages(
            pb.ListMessagesRequest(thread_id=thread_id, page_size=3, page_token=token), metadata=user.md
        )
        seen += list(page.messages)
        token = page.next_page_token
        if not token:
            break
    assert [m.id for m in seen] == expected
    assert [m.role for m in seen] == [chat_pb2.MESSAGE_ROLE_USER, chat_pb2.MESSAGE_ROLE_ASSISTANT] * 2
    assert seen[1].content == first.final.content and seen[1].usage.completion_tokens == 2
    assert seen[3] == second.final


async def test_regenerate_adds_a_sibling_and_the_active_branch_shows_the_newest(chat_stub, user, db_conn):
    first = await send(chat_stub, user, f"one {marker()} [mock:tokens=3]")
    thread_id = first.user_saved.thread.id
    second = await send(chat_stub, user, f"two {marker()} [mock:tokens=3]", thread_id=thread_id)

    regenerated = await collect(
        chat_stub.RegenerateMessage(
            pb.RegenerateMessageRequest(message_id=first.reply_id, model="gpt-4o"), metadata=user.md
        )
    )
    assert regenerated.kinds[0] == "message_started"
    assert regenerated.kinds[-1] == "message_completed"
    assert_seqs(regenerated.events, first=1, last=regenerated.final.seq)
    new = regenerated.final
    assert new.id != first.reply_id and new.status == COMPLETED
    assert new.parent_message_id == first.user_saved.message.id
    assert new.model == "gpt-4o" and new.content == regenerated.text
    assert new.content != first.final.content  # another model, another reply

    active = await chat_stub.ListMessages(pb.ListMessagesRequest(thread_id=thread_id), metadata=user.md)
    assert [m.id for m in active.messages] == [
        first.user_saved.message.id,
        new.id,
        second.user_saved.message.id,
        second.reply_id,
    ]
    every = await chat_stub.ListMessages(
        pb.ListMessagesRequest(thread_id=thread_id, include_all_branches=True), metadata=user.md
    )
    assert [m.id for m in every.messages] == [
        first.user_saved.message.id,
        first.reply_id,
        new.id,
        second.user_saved.message.id,
        second.reply_id,
    ]
    old = await db_conn.fetchrow("SELECT content FROM messages WHERE id = $1", uuid.UUID(first.reply_id))
    assert old["content"] == first.final.content  # kept

    # Regenerating from the user message answers it once more.
    again = await collect(
        chat_stub.RegenerateMessage(
            pb.RegenerateMessageRequest(message_id=first.user_saved.message.id), metadata=user.md
        )
    )
    assert again.final.parent_message_id == first.user_saved.message.id


async def test_feedback_is_stored_on_assistant_messages_only(chat_stub, user):
    got = await send(chat_stub, user, f"rate me {marker()} [mock:tokens=2]")
    resp = await chat_stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(
            message_id=got.reply_id, rating=chat_pb2.FEEDBACK_RATING_DOWN, comment="meh"
        ),
        metadata=user.md,
    )
    assert resp.message.feedback.rating == chat_pb2.FEEDBACK_RATING_DOWN
    assert resp.message.feedback.comment == "meh"
    listed = await chat_stub.ListMessages(
        pb.ListMessagesRequest(thread_id=got.user_saved.thread.id), metadata=user.md
    )
    assert listed.messages[1].feedback.rating == chat_pb2.FEEDBACK_RATING_DOWN

    cleared = await chat_stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(message_id=got.reply_id), metadata=user.md
    )
    assert not cleared.message.HasField("feedback")

    await expect_error(
        chat_stub.SubmitFeedback(
            pb.SubmitFeedbackRequest(
                message_id=got.user_saved.message.id, rating=chat_pb2.FEEDBACK_RATING_UP
            ),
            metadata=user.md,
        ),
        INVALID,
        field="message_id",
    )


async def test_another_users_threads_and_messages_are_not_found(chat_stub, user, other_user):
    mine = await send(chat_stub, user, f"private {marker()} [mock:tokens=2]")
    thread_id, reply_id = mine.user_saved.thread.id, mine.reply_id
    md = other_user.md
    calls = [
        chat_stub.GetThread(pb.GetThreadRequest(thread_id=thread_id), metadata=md),
        chat_stub.ListMessages(pb.ListMessagesRequest(thread_id=thread_id), metadata=md),
        chat_stub.UpdateThread(
            pb.UpdateThreadRequest(thread=chat_pb2.Thread(id=thread_id, title="mine now")), metadata=md
        ),
        chat_stub.DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id), metadata=md),
        chat_stub.CancelGeneration(pb.CancelGenerationRequest(message_id=reply_id), metadata=md),
        chat_stub.SubmitFeedback(
            pb.SubmitFeedbackRequest(message_id=reply_id, rating=chat_pb2.FEEDBACK_RATING_UP), metadata=md
        ),
        collect(chat_stub.WatchMessage(pb.WatchMessageRequest(message_id=reply_id), metadata=md)),
        collect(chat_stub.RegenerateMessage(pb.RegenerateMessageRequest(message_id=reply_id), metadata=md)),
        send(chat_stub, other_user, "into your thread", thread_id=thread_id),
    ]
    for call in calls:
        d = await expect_error(call, NOT_FOUND, "NOT_FOUND")
        assert mine.final.content not in d.message
    listed = await chat_stub.ListThreads(pb.ListThreadsRequest(), metadata=md)
    assert thread_id not in [t.id for t in listed.threads]
    # Nothing changed for the owner.
    still = await chat_stub.GetThread(pb.GetThreadRequest(thread_id=thread_id), metadata=user.md)
    assert still.thread.title != "mine now"


async def test_bad_input_is_invalid_argument_naming_the_field(chat_stub, user, db_conn):
    md = user.md
    thread = (await chat_stub.CreateThread(pb.CreateThreadRequest(), metadata=md)).thread
    cases = [
        (chat_stub.CreateThread(pb.CreateThreadRequest(title="t" * 201), metadata=md), "title"),
        (chat_stub.GetThread(pb.GetThreadRequest(thread_id="nope"), metadata=md), "thread_id"),
        (chat_stub.GetThread(pb.GetThreadRequest(), metadata=md), "thread_id"),
        (chat_stub.ListThreads(pb.ListThreadsRequest(page_size=101), metadata=md), "page_size"),
        (chat_stub.ListThreads(pb.ListThreadsRequest(page_size=-1), metadata=md), "page_size"),
        (chat_stub.ListThreads(pb.ListThreadsRequest(page_token="garbage!"), metadata=md), "page_token"),
        (
            chat_stub.ListMessages(pb.ListMessagesRequest(thread_id=thread.id, page_size=201), metadata=md),
            "page_size",
        ),
        (
            chat_stub.ListMessages(pb.ListMessagesRequest(thread_id=thread.id, page_token="zz"), metadata=md),
            "page_token",
        ),
        (
            chat_stub.UpdateThread(
                pb.UpdateThreadRequest(thread=chat_pb2.Thread(id=thread.id, title="x" * 201)), metadata=md
            ),
            "thread.title",
        ),
        (
            chat_stub.UpdateThread(
                pb.UpdateThreadRequest(
                    thread=chat_pb2.Thread(id=thread.id, title="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=["create_time"]),
                ),
                metadata=md,
            ),
            "update_mask",
        ),
        (send(chat_stub, user, ""), "content"),
        (send(chat_stub, user, "   "), "content"),
        (send(chat_stub, user, "x" * 32001), "content"),
        (send(chat_stub, user, "hi", thread_id="not-a-uuid"), "thread_id"),
        (send(chat_stub, user, "hi", client_message_id="retry-1"), "client_message_id"),
        (send(chat_stub, user, "hi", model="m" * 101), "model"),
        (send(chat_stub, user, "hi", model="two words"), "model"),
        (collect(chat_stub.WatchMessage(pb.WatchMessageRequest(message_id="x"), metadata=md)), "message_id"),
        (
            collect(
                chat_stub.WatchMessage(
                    pb.WatchMessageRequest(message_id=str(uuid.uuid4()), after_seq=-1), metadata=md
                )
            ),
            "after_seq",
        ),
        (chat_stub.CancelGeneration(pb.CancelGenerationRequest(message_id="1"), metadata=md), "message_id"),
        (
            collect(chat_stub.RegenerateMessage(pb.RegenerateMessageRequest(message_id=""), metadata=md)),
            "message_id",
        ),
        (
            chat_stub.SubmitFeedback(
                pb.SubmitFeedbackRequest(message_id=str(uuid.uuid4()), rating=7), metadata=md
            ),
            "rating",
        ),
        (
            chat_stub.SubmitFeedback(
                pb.SubmitFeedbackRequest(message_id=str(uuid.uuid4()), rating=1, comment="c" * 2001),
                metadata=md,
            ),
            "comment",
        ),
    ]
    for call, field in cases:
        await expect_error(call, INVALID, "INVALID_ARGUMENT", field)
    # A 32000-character message is fine; no rows were written for the rejected ones.
    ok = await send(chat_stub, user, "y" * 31_984 + " [mock:tokens=1]")
    assert ok.final.status == COMPLETED
    count = await db_conn.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", uuid.UUID(user.id))
    assert count == 2


async def test_export_includes_threads_with_their_messages(chat_stub, auth_stub, user):
    got = await send(chat_stub, user, f"export me {marker()} [mock:tokens=3]")
    chunks = [
        c.data async for c in auth_stub.ExportUserData(auth_pb.ExportUserDataRequest(), metadata=user.md)
    ]
    doc = orjson.loads(b"".join(chunks))
    (thread,) = doc["threads"]
    assert thread["id"] == got.user_saved.thread.id
    assert [m["id"] for m in thread["messages"]] == [got.user_saved.message.id, got.reply_id]
    assert thread["messages"][1]["content"] == got.final.content
    assert thread["messages"][1]["usage"]["completion_tokens"] == 3
