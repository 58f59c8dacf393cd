"""ImageService through real stubs, the mock model and a real PostgreSQL: streamed generation,
stored PNG bytes, owner-only access, signed URLs, upstream failures, disconnects, idempotency."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import grpc
import orjson
from google.protobuf import field_mask_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.image.v1 import image_pb2
from everything.image.v1 import image_service_pb2 as pb
from everything.preferences.v1 import preferences_pb2 as prefs_pb
from everything.preferences.v1 import preferences_service_pb2 as prefs_service_pb
from everything_server.ai.png import png_info
from everything_server.image.signing import UrlSigner
from tests.support import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED


def tag() -> str:
    """A unique word for a prompt, to find the upstream request the mock recorded for it."""
    return f"t{uuid.uuid4().hex[:12]}"


async def generate(
    stub, user, **fields
) -> tuple[list[pb.GenerateImageResponse], grpc.aio.AioRpcError | None]:
    events: list[pb.GenerateImageResponse] = []
    try:
        async for event in stub.GenerateImage(pb.GenerateImageRequest(**fields), metadata=user.md):
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def completed(events) -> list[image_pb2.Image]:
    return [e.completed.image for e in events if e.WhichOneof("event") == "completed"]


def upstream_requests(mock_model, word: str) -> list:
    return [
        r
        for r in mock_model.requests
        if r.path.endswith("/images/generations")
        and isinstance(r.body, dict)
        and word in r.body.get("prompt", "")
    ]


async def blob(db_conn, image_id: str) -> bytes | None:
    return await db_conn.fetchval("SELECT data FROM image_blobs WHERE image_id = $1", uuid.UUID(image_id))


async def image_row(db_conn, image_id: str):
    return await db_conn.fetchrow("SELECT * FROM images WHERE id = $1", uuid.UUID(image_id))


async def count_images(db_conn, user) -> int:
    return await db_conn.fetchval("SELECT count(*) FROM images WHERE user_id = $1", uuid.UUID(user.id))


async def make_image(image_stub, user, size: str = "256x256") -> image_pb2.Image:
    events, err = await generate(image_stub, user, prompt=f"a small test image {tag()}", size=size)
    assert err is None, err
    return completed(events)[0]


async def wait_for(probe, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


# -- generation -------------------------------------------------------------------------------------


async def test_generate_streams_progress_previews_and_the_stored_png(image_stub, user, db_conn, settings):
    word = tag()
    events, err = await generate(
        image_stub, user, prompt=f"a lighthouse at dusk {word}", size="512x512", partial_images=2
    )
    assert err is None, err
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.image_id for e in events}) == 1
    assert kinds(events)[0] == "started" and kinds(events)[-1] == "completed"
    assert events[0].started.image.status == image_pb2.IMAGE_STATUS_GENERATING
    partials = [e.partial_image for e in events if e.WhichOneof("event") == "partial_image"]
    assert [p.index for p in partials] == [0, 1]
    for p in partials:
        assert p.content_type == "image/png"
        assert (png_info(p.data).width, png_info(p.data).height) == (512, 512)
    percents = [e.progress.percent for e in events if e.WhichOneof("event") == "progress"]
    assert percents == sorted(percents) and percents[-1] == 90

    image = completed(events)[0]
    assert image.id == events[0].image_id
    assert image.status == image_pb2.IMAGE_STATUS_COMPLETED
    assert image.prompt == f"a lighthouse at dusk {word}"
    assert (image.size, image.model, image.content_type) == ("512x512", settings.image_model, "image/png")
    assert image.image_url.startswith(f"{settings.image_url_base}/v1/images/{image.id}/content?expires=")
    assert image.image_url_expire_time.seconds > time.time() + settings.image_url_ttl_seconds - 5
    assert image.HasField("create_time")

    stored = await blob(db_conn, image.id)
    info = png_info(stored)
    assert (info.width, info.height) == (512, 512)
    assert image.byte_size == len(stored)
    row = await image_row(db_conn, image.id)
    assert row["status"] == "completed" and row["user_id"] == uuid.UUID(user.id)
    assert row["completion_tokens"] > 0


async def test_count_generates_several_images_in_one_stream(image_stub, user, db_conn):
    events, err = await generate(image_stub, user, prompt=f"two cats {tag()}", size="256x256", count=2)
    assert err is None, err
    started = [e.started.image.id for e in events if e.WhichOneof("event") == "started"]
    done = completed(events)
    assert len(set(started)) == 2
    assert {i.id for i in done} == set(started)
    assert all(i.status == image_pb2.IMAGE_STATUS_COMPLETED for i in done)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for image in done:
        assert png_info(await blob(db_conn, image.id)).width == 256


async def test_the_users_image_preferences_reach_the_model(
    image_stub, preferences_stub, user, mock_model, db_conn
):
    await preferences_stub.UpdatePreferences(
        prefs_service_pb.UpdatePreferencesRequest(
            preferences=prefs_pb.Preferences(image_model="dall-e-3", image_size="256x256"),
            update_mask=field_mask_pb2.FieldMask(paths=["image_model", "image_size"]),
        ),
        metadata=user.md,
    )
    word = tag()
    events, err = await generate(image_stub, user, prompt=f"a red fox {word}")
    assert err is None, err
    [request] = upstream_requests(mock_model, word)
    assert (request.body["model"], request.body["size"]) == ("dall-e-3", "256x256")
    image = completed(events)[0]
    assert (image.model, image.size) == ("dall-e-3", "256x256")
    assert png_info(await blob(db_conn, image.id)).width == 256

    # What the request names wins over the preference.
    word = tag()
    events, err = await generate(
        image_stub, user, prompt=f"a blue fox {word}", size="512x512", model="gpt-image-1"
    )
    assert err is None, err
    [request] = upstream_requests(mock_model, word)
    assert (request.body["model"], request.body["size"]) == ("gpt-image-1", "512x512")


async def test_bad_generate_requests_name_the_field_and_write_nothing(image_stub, user, db_conn, mock_model):
    word = tag()
    cases = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": f"ok {word}", "size": "300x300"}, "size"),
        ({"prompt": f"ok {word}", "size": "auto"}, "size"),
        ({"prompt": f"ok {word}", "count": 5}, "count"),
        ({"prompt": f"ok {word}", "count": -1}, "count"),
        ({"prompt": f"ok {word}", "partial_images": 4}, "partial_images"),
        ({"prompt": f"ok {word}", "partial_images": -1}, "partial_images"),
        ({"prompt": f"ok {word}", "model": "m" * 101}, "model"),
        ({"prompt": f"ok {word}", "model": "gpt\nimage"}, "model"),
        ({"prompt": f"ok {word}", "client_request_id": "not-a-uuid"}, "client_request_id"),
    ]
    for fields, field in cases:
        events, err = await generate(image_stub, user, **fields)
        assert err is not None and err.code() == INVALID, (fields, err)
        await expect_error(_raise(err), INVALID, "INVALID_ARGUMENT", field)
        assert events == []
    assert await count_images(db_conn, user) == 0
    assert upstream_requests(mock_model, word) == []


async def _raise(err):
    raise err


async def test_upstream_rate_limit_fails_the_image_with_retry_info(image_stub, user, db_conn):
    events, err = await generate(image_stub, user, prompt=f"[mock:status=429 retry-after=2] a cat {tag()}")
    d = await expect_error(_raise(err), grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")
    assert d.retry_after == 2
    [image] = completed(events)
    assert image.status == image_pb2.IMAGE_STATUS_FAILED
    assert image.error_reason == "UPSTREAM_RATE_LIMITED" and not image.image_url
    row = await image_row(db_conn, image.id)
    assert (row["status"], row["error_reason"]) == ("failed", "UPSTREAM_RATE_LIMITED")
    assert await blob(db_conn, image.id) is None


async def test_upstream_server_error_fails_the_image_as_unavailable(image_stub, user, db_conn):
    events, err = await generate(
        image_stub, user, prompt=f"[mock:status=500] a dog {tag()}", partial_images=1
    )
    await expect_error(_raise(err), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    [image] = completed(events)
    row = await image_row(db_conn, image.id)
    assert (row["status"], row["error_reason"]) == ("failed", "UPSTREAM_UNAVAILABLE")


async def test_a_client_that_disconnects_mid_stream_still_gets_its_image_stored(
    image_stub, user, db_conn, mock_model
):
    word = tag()
    call = image_stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt=f"[mock:image-delay=0.4] a slow mountain {word}", partial_images=3, size="256x256"
        ),
        metadata=user.md,
    )
    first = await call.read()
    image_id = first.started.image.id
    call.cancel()
    assert (await image_row(db_conn, image_id))["status"] == "generating"

    async def stored():
        row = await image_row(db_conn, image_id)
        return row["status"] == "completed" and await blob(db_conn, image_id)

    data = await wait_for(stored)
    assert png_info(data).width == 256
    # The upstream request was not cut short by the client going away.
    [request] = upstream_requests(mock_model, word)
    assert all(a.request_index != request.index for a in mock_model.aborts)


async def test_a_retried_request_with_the_same_client_request_id_generates_once(image_stub, user, mock_model):
    word = tag()
    crid = str(uuid.uuid4())
    first, err = await generate(
        image_stub, user, prompt=f"a quiet lake {word}", client_request_id=crid, size="256x256"
    )
    assert err is None, err
    again, err = await generate(
        image_stub, user, prompt=f"a quiet lake {word}", client_request_id=crid, size="256x256"
    )
    assert err is None, err
    assert kinds(again) == ["started", "completed"]
    assert completed(again)[0].id == completed(first)[0].id
    assert completed(again)[0].image_url
    assert len(upstream_requests(mock_model, word)) == 1

    _, err = await generate(image_stub, user, prompt=f"another lake {word}", client_request_id=crid)
    await expect_error(_raise(err), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")


async def test_a_retry_while_the_first_try_runs_waits_for_its_image(image_stub, user, mock_model):
    word = tag()
    crid = str(uuid.uuid4())
    request = pb.GenerateImageRequest(
        prompt=f"[mock:image-delay=0.3] a windmill {word}",
        client_request_id=crid,
        partial_images=2,
        size="256x256",
    )
    call = image_stub.GenerateImage(request, metadata=user.md)
    first = await call.read()
    call.cancel()  # the first client is gone; its generation goes on
    again, err = await generate(
        image_stub, user, prompt=request.prompt, client_request_id=crid, partial_images=2, size="256x256"
    )
    assert err is None, err
    assert kinds(again) == ["started", "completed"]
    image = completed(again)[0]
    assert image.id == first.started.image.id and image.status == image_pb2.IMAGE_STATUS_COMPLETED
    assert len(upstream_requests(mock_model, word)) == 1


async def test_the_daily_image_quota_refuses_before_anything_is_written(image_stub, user, db_conn, settings):
    await db_conn.execute(
        "INSERT INTO usage_counters (user_id, day, kind, amount) "
        "VALUES ($1, (now() AT TIME ZONE 'utc')::date, 'images', $2)",
        uuid.UUID(user.id),
        settings.quota_daily_images,
    )
    _, err = await generate(image_stub, user, prompt=f"one too many {tag()}")
    await expect_error(_raise(err), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert await count_images(db_conn, user) == 0


# -- reads, deletes, access -----------------------------------------------------------------------------


async def test_get_list_and_delete(image_stub, user, db_conn):
    made = [await make_image(image_stub, user) for _ in range(3)]
    got = (await image_stub.GetImage(pb.GetImageRequest(image_id=made[0].id), metadata=user.md)).image
    assert got.id == made[0].id and got.image_url and got.byte_size == made[0].byte_size

    page = await image_stub.ListImages(pb.ListImagesRequest(page_size=2), metadata=user.md)
    rest = await image_stub.ListImages(
        pb.ListImagesRequest(page_size=2, page_token=page.next_page_token), metadata=user.md
    )
    assert page.next_page_token and not rest.next_page_token
    assert [i.id for i in [*page.images, *rest.images]] == [m.id for m in reversed(made)]
    assert all(i.image_url for i in page.images)
    await expect_error(
        image_stub.ListImages(pb.ListImagesRequest(page_token="garbage!"), metadata=user.md),
        INVALID,
        field="page_token",
    )

    await image_stub.DeleteImage(pb.DeleteImageRequest(image_id=made[1].id), metadata=user.md)
    await expect_error(
        image_stub.GetImage(pb.GetImageRequest(image_id=made[1].id), metadata=user.md), NOT_FOUND
    )
    assert await image_row(db_conn, made[1].id) is None
    assert await blob(db_conn, made[1].id) is None
    assert await blob(db_conn, made[0].id) is not None
    await expect_error(
        image_stub.DeleteImage(pb.DeleteImageRequest(image_id=made[1].id), metadata=user.md), NOT_FOUND
    )


async def test_another_users_image_is_not_found(image_stub, user, other_user, db_conn):
    image = await make_image(image_stub, user)
    for call in (
        image_stub.GetImage(pb.GetImageRequest(image_id=image.id), metadata=other_user.md),
        image_stub.DeleteImage(pb.DeleteImageRequest(image_id=image.id), metadata=other_user.md),
    ):
        await expect_error(call, NOT_FOUND, "NOT_FOUND")
    chunks = image_stub.GetImageContent(pb.GetImageContentRequest(image_id=image.id), metadata=other_user.md)
    await expect_error(_drain(chunks), NOT_FOUND, "NOT_FOUND")
    listed = await image_stub.ListImages(pb.ListImagesRequest(), metadata=other_user.md)
    assert image.id not in [i.id for i in listed.images]
    assert await blob(db_conn, image.id) is not None
    await expect_error(
        image_stub.GetImage(pb.GetImageRequest(image_id="nope"), metadata=user.md), INVALID, field="image_id"
    )


async def _drain(call) -> list:
    return [c async for c in call]


async def test_get_image_content_streams_chunks_that_reassemble_to_the_stored_bytes(
    image_stub, user, db_conn
):
    image = await make_image(image_stub, user, size="1024x1024")
    chunks = await _drain(
        image_stub.GetImageContent(pb.GetImageContentRequest(image_id=image.id), metadata=user.md)
    )
    stored = await blob(db_conn, image.id)
    assert len(chunks) > 1
    assert (chunks[0].content_type, chunks[0].total_bytes) == ("image/png", len(stored))
    assert all(not c.content_type and not c.total_bytes for c in chunks[1:])
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    assert b"".join(c.data for c in chunks) == stored


async def test_content_of_a_failed_image_is_a_failed_precondition(image_stub, user):
    events, _ = await generate(image_stub, user, prompt=f"[mock:status=500] broken {tag()}")
    [image] = completed(events)
    chunks = image_stub.GetImageContent(pb.GetImageContentRequest(image_id=image.id), metadata=user.md)
    await expect_error(_drain(chunks), grpc.StatusCode.FAILED_PRECONDITION)


# -- signed URLs ------------------------------------------------------------------------------------


def url_parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    image_id = parts.path.split("/")[3]
    return image_id, int(query["expires"][0]), query["signature"][0]


async def test_a_signed_url_serves_the_bytes_without_a_token(image_stub, user, db_conn):
    image = await make_image(image_stub, user)
    image_id, expires, signature = url_parts(image.image_url)
    body = await image_stub.DownloadImage(
        pb.DownloadImageRequest(image_id=image_id, expires=expires, signature=signature)
    )
    assert body.content_type == "image/png"
    assert body.data == await blob(db_conn, image.id)


async def test_tampered_or_expired_signed_urls_are_refused(image_stub, user, settings):
    image = await make_image(image_stub, user)
    other = await make_image(image_stub, user)
    image_id, expires, signature = url_parts(image.image_url)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for request in [
        pb.DownloadImageRequest(image_id=image_id, expires=expires, signature=flipped),
        pb.DownloadImageRequest(image_id=image_id, expires=expires + 1, signature=signature),
        pb.DownloadImageRequest(image_id=other.id, expires=expires, signature=signature),
        pb.DownloadImageRequest(image_id=image_id, expires=expires),
        pb.DownloadImageRequest(image_id="not-a-uuid", expires=expires, signature=signature),
        pb.DownloadImageRequest(image_id=image_id, expires=expires, signature="é" * 43),
    ]:
        await expect_error(image_stub.DownloadImage(request), DENIED, "IMAGE_URL_INVALID")

    # A genuine signature whose time is up, and one minted for far beyond the configured TTL.
    signer = UrlSigner(
        settings.url_signing_key.get_secret_value().encode(), "http://x", settings.image_url_ttl_seconds
    )
    past = int(time.time()) - 5
    await expect_error(
        image_stub.DownloadImage(
            pb.DownloadImageRequest(
                image_id=image_id, expires=past, signature=signer.signature(uuid.UUID(image_id), past)
            )
        ),
        DENIED,
        "IMAGE_URL_EXPIRED",
    )
    far = int(time.time()) + 30 * 24 * 3600
    await expect_error(
        image_stub.DownloadImage(
            pb.DownloadImageRequest(
                image_id=image_id, expires=far, signature=signer.signature(uuid.UUID(image_id), far)
            )
        ),
        DENIED,
        "IMAGE_URL_INVALID",
    )


async def test_a_signed_url_of_a_deleted_image_is_not_found(image_stub, user):
    image = await make_image(image_stub, user)
    image_id, expires, signature = url_parts(image.image_url)
    await image_stub.DeleteImage(pb.DeleteImageRequest(image_id=image.id), metadata=user.md)
    await expect_error(
        image_stub.DownloadImage(
            pb.DownloadImageRequest(image_id=image_id, expires=expires, signature=signature)
        ),
        NOT_FOUND,
    )


# -- account data -----------------------------------------------------------------------------------


async def test_export_has_image_metadata_and_bytes_on_request(image_stub, auth_stub, user, db_conn):
    image = await make_image(image_stub, user)

    async def export(include: bool) -> dict:
        request = auth_pb.ExportUserDataRequest(include_image_bytes=include)
        return orjson.loads(
            b"".join([c.data async for c in auth_stub.ExportUserData(request, metadata=user.md)])
        )

    [record] = (await export(False))["images"]
    assert (record["id"], record["status"], record["size"]) == (image.id, "completed", "256x256")
    assert "data_base64" not in record
    [record] = (await export(True))["images"]
    assert base64.b64decode(record["data_base64"]) == await blob(db_conn, image.id)


async def test_deleting_the_account_removes_images_and_their_bytes(image_stub, auth_stub, user, db_conn):
    await make_image(image_stub, user)
    await auth_stub.DeleteAccount(auth_pb.DeleteAccountRequest(password=user.password), metadata=user.md)
    uid = uuid.UUID(user.id)
    assert await db_conn.fetchval("SELECT count(*) FROM images WHERE user_id = $1", uid) == 0
    assert await db_conn.fetchval("SELECT count(*) FROM image_blobs WHERE user_id = $1", uid) == 0
