"""Account data rights: ExportUserData holds everything the user owns; DeleteAccount leaves no row
anywhere that references the user."""

from __future__ import annotations

import base64
import uuid

import orjson

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.image.v1 import image_service_pb2 as image_pb
from everything.preferences.v1 import preferences_service_pb2 as prefs_pb
from everything.search.v1 import search_service_pb2 as search_pb


async def _use_everything(user, chat_stub, search_stub, image_stub, preferences_stub) -> dict:
    sent = [
        e
        async for e in chat_stub.SendMessage(
            chat_pb.SendMessageRequest(content="export me please"), metadata=user.md
        )
    ]
    found = [
        e
        async for e in search_stub.Search(
            search_pb.SearchRequest(query="export me please", providers=["history"]), metadata=user.md
        )
    ]
    drawn = [
        e
        async for e in image_stub.GenerateImage(
            image_pb.GenerateImageRequest(prompt="a red dot", size="256x256"), metadata=user.md
        )
    ]
    await preferences_stub.UpdatePreferences(
        prefs_pb.UpdatePreferencesRequest(
            preferences={"temperature": 0.3}, update_mask={"paths": ["temperature"]}
        ),
        metadata=user.md,
    )
    return {
        "thread_id": sent[0].user_message_saved.thread.id,
        "search_id": found[-1].completed.search.id,
        "image_id": drawn[-1].completed.image.id,
        "reply": sent[-1].message_completed.message.content,
    }


async def _export(auth_stub, user, include_bytes: bool) -> dict:
    chunks = [
        c
        async for c in auth_stub.ExportUserData(
            auth_pb.ExportUserDataRequest(include_image_bytes=include_bytes), metadata=user.md
        )
    ]
    return orjson.loads(b"".join(c.data for c in chunks))


async def test_the_export_holds_everything_the_user_owns(
    user, other_user, auth_stub, chat_stub, search_stub, image_stub, preferences_stub
):
    ids = await _use_everything(user, chat_stub, search_stub, image_stub, preferences_stub)
    await _use_everything(other_user, chat_stub, search_stub, image_stub, preferences_stub)
    doc = await _export(auth_stub, user, include_bytes=True)
    assert doc["user"]["id"] == user.id
    assert {"sessions", "threads", "preferences", "searches", "images"} <= set(doc)
    text = orjson.dumps(doc).decode()
    for value in ids.values():
        assert value in text
    assert other_user.id not in text and other_user.email not in text
    image = next(i for i in doc["images"] if ids["image_id"] in orjson.dumps(i).decode())
    assert base64.b64decode(image["data_base64"]).startswith(b"\x89PNG\r\n\x1a\n")
    search = next(s for s in doc["searches"] if s["id"] == ids["search_id"])
    assert "sources" in search
    without = await _export(auth_stub, user, include_bytes=False)
    assert len(orjson.dumps(without)) < len(orjson.dumps(doc))


async def test_delete_account_leaves_no_row_that_references_the_user(
    user, auth_stub, chat_stub, search_stub, image_stub, preferences_stub, db_conn
):
    await _use_everything(user, chat_stub, search_stub, image_stub, preferences_stub)
    uid = uuid.UUID(user.id)
    owned = await db_conn.fetch(
        """SELECT c.table_name, c.column_name FROM information_schema.columns c
           JOIN information_schema.tables t ON t.table_name = c.table_name AND t.table_schema = c.table_schema
           WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND c.data_type = 'uuid'
             AND (c.column_name = 'user_id' OR (c.table_name = 'users' AND c.column_name = 'id'))"""
    )
    tables = {r["table_name"] for r in owned}
    assert {
        "users",
        "sessions",
        "threads",
        "messages",
        "preferences",
        "search_queries",
        "images",
        "image_blobs",
    } <= tables

    async def rows_left() -> dict[str, int]:
        out = {}
        for r in owned:
            n = await db_conn.fetchval(
                f'SELECT count(*) FROM "{r["table_name"]}" WHERE "{r["column_name"]}" = $1', uid
            )
            if n:
                out[r["table_name"]] = n
        return out

    before = await rows_left()
    assert {"threads", "messages", "search_queries", "images", "image_blobs", "preferences"} <= set(before)
    await auth_stub.DeleteAccount(auth_pb.DeleteAccountRequest(password=user.password), metadata=user.md)
    assert await rows_left() == {}
    # Nor does any text column still hold the id (rate-limit keys and the like).
    leftovers = await db_conn.fetchval(
        "SELECT count(*) FROM rate_limit_windows WHERE key LIKE '%' || $1 || '%'", user.id
    )
    assert leftovers == 0
