"""Image rules: generation that outlives the RPC, stored bytes, owner-only access, signed links.

GenerateImage: the request is checked, then a detached task (c.background) does the work and the
RPC relays its events. The task creates the records (status GENERATING) in one short transaction,
emits `started` for each, calls the model once per image (concurrently, streaming previews when
asked), stores the bytes and the COMPLETED record in one transaction per image, and emits
`completed`. A client that goes away stops only the relay: the task finishes and the image is kept.
An upstream failure saves the image FAILED with its error reason and ends the stream with the
mapped status (after the `completed` event that carries the FAILED image).

Idempotency: a request with a client_request_id whose records exist already (from an earlier try,
on any replica) does not generate again. It replays `started`, waits for those images to be final
(NOTIFY on IMAGE_CHANNEL when one is, with a slow poll as the fallback) and replays `completed`.
The same id with a different prompt, count, size or model is ALREADY_EXISTS.

Quota: each new request reserves `count` images of the user's daily image quota (Limits, counted in
PostgreSQL) in the transaction that creates the records; over it, nothing is created.

Shutdown: Background.drain gives running generations the grace period, then cancels them; a
cancelled image is saved FAILED with reason CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from everything_server import errors
from everything_server.ai.provider import ChatProvider, ImageCompleted, ImagePartial
from everything_server.background import Background
from everything_server.config import Settings
from everything_server.db import Database
from everything_server.db.pubsub import PubSub, notify
from everything_server.image import repository as repo
from everything_server.image.models import COMPLETED, FAILED, GENERATING, Image
from everything_server.image.signing import UrlSigner
from everything_server.image.storage import ImageStore
from everything_server.limits import Limits
from everything_server.preferences import effective
from everything_server.rpc import paging, validate
from everything_server.rpc.context import Principal
from everything_server.rpc.status import known_reason

log = logging.getLogger(__name__)

IMAGE_CHANNEL = "everything_image_done"
MAX_PROMPT_CHARS = 4000
MAX_COUNT = 4
MAX_PARTIAL_IMAGES = 3
MAX_IMAGE_BYTES = 32 * 1024 * 1024
EXPORT_PAGE = 100
REPLAY_POLL_SECONDS = 2.0
SAVE_PATIENCE_SECONDS = 10.0
# A preview larger than this is announced by progress only: a message must stay under the limit.
MESSAGE_HEADROOM_BYTES = 64 * 1024

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_content_type(data: bytes) -> str | None:
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    size: str | None  # None: the user's preference
    model: str | None  # None: the user's preference
    count: int
    partial_images: int
    client_request_id: uuid.UUID | None


def check_generate(
    *,
    prompt: str,
    size: str,
    model: str,
    count: int,
    partial_images: int,
    client_request_id: uuid.UUID | None,
) -> GenerateParams:
    """Every limit of GenerateImage, all violations at once, before anything is written."""
    problems: list[errors.FieldViolation] = []

    def check(fn):
        try:
            return fn()
        except errors.InvalidArgument as err:
            problems.extend(err.violations)
            return None

    prompt = check(lambda: validate.text("prompt", prompt, max_len=MAX_PROMPT_CHARS, min_len=1, strip=True))
    if size and size not in effective.IMAGE_SIZES:
        problems.append(errors.FieldViolation("size", f"must be one of {', '.join(effective.IMAGE_SIZES)}"))
    model = model.strip()
    if len(model) > effective.MAX_MODEL_CHARS:
        problems.append(
            errors.FieldViolation("model", f"must be at most {effective.MAX_MODEL_CHARS} characters")
        )
    elif any(not ch.isprintable() for ch in model):
        problems.append(errors.FieldViolation("model", "must not contain control characters"))
    if count == 0:
        count = 1
    if not 1 <= count <= MAX_COUNT:
        problems.append(errors.FieldViolation("count", f"must be between 1 and {MAX_COUNT} (0 means 1)"))
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        problems.append(
            errors.FieldViolation("partial_images", f"must be between 0 and {MAX_PARTIAL_IMAGES}")
        )
    if problems:
        raise errors.InvalidArgument.many(problems)
    return GenerateParams(prompt, size or None, model or None, count, partial_images, client_request_id)


def error_for_reason(reason: str) -> Exception:
    """The error a stored FAILED image stands for (replays end the way the first try did)."""
    if reason == "UPSTREAM_RATE_LIMITED":
        return errors.ResourceExhausted("the model provider is rate limiting requests", reason=reason)
    if reason == "UPSTREAM_TIMEOUT":
        return errors.DeadlineExceeded("the model provider did not answer in time")
    if reason == "CANCELLED":
        return errors.Cancelled("the generation was cancelled")
    if reason == "INVALID_ARGUMENT":
        return errors.InvalidArgument("model", "the model is not available")
    if reason == "INTERNAL":
        return RuntimeError("an image generation failed")
    return errors.Unavailable("the image could not be generated", reason=known_reason(reason or "INTERNAL"))


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    image_id: uuid.UUID
    seq: int
    kind: str  # "started" | "progress" | "partial_image" | "completed"
    image: Image | None = None
    percent: int = 0
    stage: str = ""
    index: int = 0
    data: bytes = b""
    content_type: str = ""


class _Run:
    """The events of one GenerateImage request, from the detached task to the RPC that relays them.

    Single consumer; when it leaves (`detach`), events are no longer kept, so a generation whose
    client went away holds no previews in memory."""

    def __init__(self) -> None:
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._seq = 0
        self.done = False
        self.error: BaseException | None = None
        self.listening = True

    def emit(self, image_id: uuid.UUID, kind: str, **fields) -> None:
        self._seq += 1
        if self.listening:
            self._queue.append(Event(image_id, self._seq, kind, **fields))
            self._wake.set()

    def finish(self, error: BaseException | None = None) -> None:
        if self.error is None:
            self.error = error
        self.done = True
        self._wake.set()

    def detach(self) -> None:
        self.listening = False
        self._queue.clear()

    async def stream(self) -> AsyncIterator[Event]:
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self.done:
                break
            self._wake.clear()
            if not self._queue and not self.done:
                await self._wake.wait()
        if self.error is not None:
            raise self.error


class ImageService:
    def __init__(
        self,
        *,
        db: Database,
        ai: ChatProvider,
        store: ImageStore,
        signer: UrlSigner,
        background: Background,
        pubsub: PubSub,
        limits: Limits | None,
        settings: Settings,
    ):
        self._db = db
        self._limits = limits
        self._ai = ai
        self._store = store
        self.signer = signer
        self._background = background
        self._pubsub = pubsub
        self._settings = settings
        self._max_preview = max(0, settings.max_message_bytes - MESSAGE_HEADROOM_BYTES)
        # How long a replay waits for another try's images: a generation is bounded by the upstream
        # timeout per step; past this the first try is presumed lost (its replica died).
        self._replay_wait = 2 * settings.openai_timeout_seconds + 30

    # -- GenerateImage ----------------------------------------------------------------------------

    async def generate(self, p: Principal, params: GenerateParams) -> AsyncIterator[Event]:
        ids = [uuid.uuid4() for _ in range(params.count)]
        run = _Run()
        self._background.spawn(f"image:{ids[0]}", self._request(run, p, params, ids))
        try:
            async for event in run.stream():
                yield event
        finally:
            run.detach()  # the client went away or the stream ended: the task goes on alone

    async def _request(self, run: _Run, p: Principal, params: GenerateParams, ids: list[uuid.UUID]) -> None:
        try:
            images, existing = await self._create(p, params, ids)
            if existing:
                await self._replay(run, p, existing)
            else:
                await self._produce(run, images, params.partial_images)
        except errors.DomainError as err:
            run.finish(err)
        except asyncio.CancelledError:
            run.finish(errors.Cancelled("the generation was cancelled"))
            raise
        except Exception as exc:
            log.exception("image request failed")
            run.finish(RuntimeError(f"image generation failed: {type(exc).__name__}"))
        finally:
            run.finish()

    async def _create(
        self, p: Principal, params: GenerateParams, ids: list[uuid.UUID]
    ) -> tuple[list[Image], list[Image]]:
        """(new records, or the records of an earlier try with the same client_request_id)."""
        async with self._db.transaction(p.user_id, p.session_id) as db:
            prefs = await effective.load(db, p.user_id, self._settings)
            size = params.size or prefs.image_size
            model = params.model or prefs.image_model
            crid = params.client_request_id
            if crid is not None:
                existing = await repo.by_client_request(db, p.user_id, crid)
                if existing:
                    _check_same_request(existing, params)
                    return [], existing
            rows = [
                {
                    "id": image_id,
                    "user_id": p.user_id,
                    "prompt": params.prompt,
                    "size": size,
                    "model": model,
                    "status": GENERATING,
                    "client_request_id": crid,
                    "request_index": i,
                }
                for i, image_id in enumerate(ids)
            ]
            images = await repo.insert_images(db, rows)
            if len(images) == len(rows):
                if self._limits is not None:  # the daily quota; over it, raising rolls the rows back
                    await self._limits.reserve(
                        db, p.user_id, "images", params.count, self._settings.quota_daily_images
                    )
                return sorted(images, key=lambda i: i.request_index), []
            if images:  # a concurrent try took some indexes: undo ours (raising rolls back)
                raise errors.Aborted("a request with the same client_request_id is running; retry")
            # A concurrent try with this client_request_id committed first (the insert waited for it).
            existing = await repo.by_client_request(db, p.user_id, crid)
            _check_same_request(existing, params)
            return [], existing

    async def _produce(self, run: _Run, images: list[Image], partial_images: int) -> None:
        for image in images:
            run.emit(image.id, "started", image=image)
        results = await asyncio.gather(*(self._one(run, image, partial_images) for image in images))
        run.finish(next((err for err in results if err is not None), None))

    async def _one(self, run: _Run, image: Image, partial_images: int) -> BaseException | None:
        """Generate and store one image; returns the error that failed it, if any."""
        try:
            run.emit(image.id, "progress", percent=5, stage="generating")
            result: ImageCompleted | None = None
            async with contextlib.aclosing(
                self._ai.generate_image(
                    model=image.model, prompt=image.prompt, size=image.size, partial_images=partial_images
                )
            ) as events:
                async for ev in events:
                    if isinstance(ev, ImagePartial):
                        if len(ev.data) <= self._max_preview:
                            run.emit(
                                image.id,
                                "partial_image",
                                index=ev.index,
                                data=ev.data,
                                content_type=sniff_content_type(ev.data) or "application/octet-stream",
                            )
                        percent = min(85, 5 + 80 * (ev.index + 1) // (partial_images + 1))
                        run.emit(image.id, "progress", percent=percent, stage="generating")
                    else:
                        result = ev
            if result is None:
                raise errors.Unavailable("the model sent no image", reason="UPSTREAM_BAD_RESPONSE")
            content_type = sniff_content_type(result.data)
            if content_type is None or len(result.data) > MAX_IMAGE_BYTES:
                raise errors.Unavailable(
                    "the model sent something that is not an image", reason="UPSTREAM_BAD_RESPONSE"
                )
            run.emit(image.id, "progress", percent=90, stage="storing")
            # Again while the database is away: an image must not stay GENERATING for good.
            stored = await self._db.patiently(
                lambda: self._store_image(image, result, content_type), patience=SAVE_PATIENCE_SECONDS
            )
            if stored is None:
                return errors.NotFound("image", str(image.id))  # deleted while it was drawn
            run.emit(image.id, "completed", image=stored)
            return None
        except asyncio.CancelledError:
            await self._fail(run, image, "CANCELLED")
            raise
        except errors.DomainError as err:
            await self._fail(run, image, known_reason(err.reason))
            return err
        except Exception as exc:
            log.exception("image generation failed", extra={"image_id": str(image.id)})
            await self._fail(run, image, "INTERNAL")
            return RuntimeError(f"image generation failed: {type(exc).__name__}")

    async def _store_image(self, image: Image, result: ImageCompleted, content_type: str) -> Image | None:
        # The owner's id, not their sign-in session: the image is theirs even if they signed out since.
        async with self._db.transaction(image.user_id) as db:
            # Locked, so a concurrent DeleteImage either goes first (nothing to store) or waits.
            current = await repo.get(db, image.user_id, image.id, for_update=True)
            if current is None:
                return None
            if current.status == COMPLETED:  # a retry after a commit whose answer was lost
                return current
            db.expunge(current)  # so that the UPDATE ... RETURNING below gives a fresh object
            key = await self._store.put(db, image.id, image.user_id, result.data, content_type)
            stored = await repo.complete(
                db,
                image.user_id,
                image.id,
                content_type=content_type,
                byte_size=len(result.data),
                storage_key=key,
                revised_prompt=(result.revised_prompt or "")[: MAX_PROMPT_CHARS * 2],
                prompt_tokens=result.usage.prompt_tokens if result.usage else 0,
                completion_tokens=result.usage.completion_tokens if result.usage else 0,
            )
            if stored is None:  # deleted or finished meanwhile: keep no orphan bytes
                await self._store.delete(db, image.id, image.user_id)
                return None
            await notify(db, IMAGE_CHANNEL, str(image.id))
        return stored

    async def _fail(self, run: _Run, image: Image, reason: str) -> None:
        async def once() -> Image | None:
            async with self._db.transaction(image.user_id) as db:
                failed = await repo.fail(db, image.user_id, image.id, reason)
                await notify(db, IMAGE_CHANNEL, str(image.id))
            return failed

        try:
            async with asyncio.timeout(SAVE_PATIENCE_SECONDS + 5):
                failed = await self._db.patiently(once, patience=SAVE_PATIENCE_SECONDS)
        except Exception:
            log.exception("could not save a failed image", extra={"image_id": str(image.id)})
            return
        if failed is not None:
            run.emit(image.id, "completed", image=failed)

    async def _replay(self, run: _Run, p: Principal, images: list[Image]) -> None:
        for image in images:
            run.emit(image.id, "started", image=image)
        final = {i.id: i for i in images if i.status != GENERATING}
        pending = {i.id for i in images} - final.keys()
        if pending:
            wake = asyncio.Event()

            def on_done(payload: str) -> None:
                with contextlib.suppress(ValueError):
                    if uuid.UUID(payload) in pending:
                        wake.set()

            await self._pubsub.subscribe(IMAGE_CHANNEL, on_done)
            try:
                deadline = asyncio.get_running_loop().time() + self._replay_wait
                while pending and run.listening:
                    wake.clear()  # before reading, so a NOTIFY during the read is not lost
                    async with self._db.transaction(p.user_id) as db:
                        current = await repo.get_many(db, p.user_id, list(pending))
                    for image in current:
                        if image.status != GENERATING:
                            final[image.id] = image
                    # Final ones are done; deleted ones will never be.
                    pending &= {i.id for i in current if i.status == GENERATING}
                    left = deadline - asyncio.get_running_loop().time()
                    if not pending or left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), min(REPLAY_POLL_SECONDS, left))
            finally:
                await self._pubsub.unsubscribe(IMAGE_CHANNEL, on_done)
        if pending and run.listening:
            run.finish(errors.DeadlineExceeded("the image is still generating; try again later"))
            return
        error: Exception | None = None
        for image in images:
            done = final.get(image.id)
            if done is None:
                error = error or errors.NotFound("image", str(image.id))
                continue
            run.emit(image.id, "completed", image=done)
            if done.status == FAILED:
                error = error or error_for_reason(done.error_reason)
        run.finish(error)

    # -- reads and deletes --------------------------------------------------------------------------

    async def get(self, p: Principal, image_id: uuid.UUID) -> Image:
        async with self._db.transaction(p.user_id, p.session_id) as db:
            image = await repo.get(db, p.user_id, image_id)
        if image is None:
            raise errors.NotFound("image", str(image_id))
        return image

    async def list(self, p: Principal, *, page_size: int, page_token: str) -> tuple[list[Image], str]:
        after = paging.decode(page_token)
        async with self._db.transaction(p.user_id, p.session_id) as db:
            rows = await repo.list_images(db, p.user_id, limit=page_size + 1, after=after)
        return paging.page(rows, page_size, lambda i: (i.created_at, i.id))

    async def delete(self, p: Principal, image_id: uuid.UUID) -> None:
        async with self._db.transaction(p.user_id, p.session_id) as db:
            image = await repo.get(db, p.user_id, image_id)
            if image is None:
                raise errors.NotFound("image", str(image_id))
            await self._store.delete(db, image_id, p.user_id)
            await repo.delete_image(db, p.user_id, image_id)

    async def content(self, p: Principal, image_id: uuid.UUID) -> tuple[Image, bytes]:
        """The image and its bytes, read in one short transaction (streaming happens after it)."""
        async with self._db.transaction(p.user_id, p.session_id) as db:
            image = await repo.get(db, p.user_id, image_id)
            if image is None:
                raise errors.NotFound("image", str(image_id))
            if image.status != COMPLETED:
                raise errors.FailedPrecondition(f"the image is {image.status}, it has no bytes")
            data = await self._store.get(db, image_id, p.user_id)
        if data is None:
            raise errors.NotFound("image", str(image_id))
        return image, data

    async def download(self, image_id: str, expires: int, signature: str) -> tuple[Image, bytes]:
        """The bytes behind a signed link. No caller is known: the link is the credential. The owner
        is looked up by a SECURITY DEFINER function, then the image is read as that owner."""
        iid = self.signer.verify(image_id, expires, signature)
        async with self._db.transaction() as db:
            owner = await repo.owner_of(db, iid)
        if owner is None:
            raise errors.NotFound("image", str(iid))
        async with self._db.transaction(owner) as db:
            image = await repo.get(db, owner, iid)
            ok = image is not None and image.status == COMPLETED
            data = await self._store.get(db, iid, owner) if ok else None
        if image is None or data is None:
            raise errors.NotFound("image", str(iid))
        return image, data

    async def export(self, p: Principal, *, include_bytes: bool) -> AsyncIterator[tuple[Image, bytes | None]]:
        """Every image of the user, oldest first, page by page in short transactions."""
        after: paging.Cursor | None = None
        while True:
            async with self._db.transaction(p.user_id, p.session_id) as db:
                rows = await repo.list_images(
                    db, p.user_id, limit=EXPORT_PAGE, after=after, newest_first=False
                )
            for image in rows:
                data = None
                if include_bytes and image.status == COMPLETED:
                    async with self._db.transaction(p.user_id, p.session_id) as db:
                        data = await self._store.get(db, image.id, p.user_id)
                yield image, data
            if len(rows) < EXPORT_PAGE:
                return
            after = paging.Cursor(rows[-1].created_at, rows[-1].id)


def _check_same_request(existing: list[Image], params: GenerateParams) -> None:
    if not existing:
        raise errors.Aborted("a request with the same client_request_id changed meanwhile; retry")
    first = existing[0]
    same = (
        first.prompt == params.prompt
        and len(existing) == params.count
        and (params.size is None or params.size == first.size)
        and (params.model is None or params.model == first.model)
    )
    if not same:
        raise errors.AlreadyExists(
            "client_request_id was already used for a different request",
            metadata={"field": "client_request_id"},
        )
