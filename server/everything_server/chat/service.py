"""Chat rules: threads, messages, and the streams of replies (see generation.py and watch.py for how
a reply is generated, stored and followed across replicas).

Conversation shape: a thread is a list of user messages, each answered by one or more assistant
replies (siblings sharing `parent_message_id`; RegenerateMessage adds one). The active branch is
every user message with its newest reply; it is what ListMessages shows by default and what the
model sees as history. Regenerating an older reply only changes that turn: later turns stay.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import asyncpg
import orjson

from everything_server import errors
from everything_server.ai.provider import ChatMessage, ChatProvider
from everything_server.background import Background
from everything_server.chat import repository as repo
from everything_server.chat.events import DONE, START, TITLE, Event, Usage, encode_batch, error_from_json
from everything_server.chat.generation import (
    LEASE,
    QUOTA_KIND,
    Generation,
    Generator,
    Plan,
    task_key,
)
from everything_server.chat.models import GENERATING, ROLE_ASSISTANT, ROLE_USER, Message, Thread
from everything_server.chat.watch import Watcher
from everything_server.config import Settings
from everything_server.db.database import Database
from everything_server.db.pubsub import PubSub
from everything_server.limits import Limits
from everything_server.preferences import effective
from everything_server.rpc import paging
from everything_server.rpc.context import Principal

USER_SAVED = "user_saved"
HISTORY_MAX_ROWS = 500
CANCEL_WAIT_SECONDS = LEASE.total_seconds() + 10
EXPORT_PAGE = 20


@dataclass(frozen=True)
class StreamEvent:
    """One event of a reply stream, ready to convert: `message` is the user message (user_saved),
    the started message (start) or the final one (done)."""

    kind: str
    message_id: uuid.UUID
    seq: int
    text: str = ""
    usage: Usage | None = None
    thread_id: uuid.UUID | None = None
    message: Message | None = None
    thread: Thread | None = None


@dataclass(frozen=True)
class _Started:
    thread: Thread
    user_message: Message
    reply: Message
    plan: Plan | None = None  # None: an idempotent retry of a send that exists already
    generation: Generation | None = None


class _ClientIdTaken(Exception):
    """A concurrent send with the same client_message_id won the insert; look it up again."""


def _shutting_down() -> errors.Unavailable:
    return errors.Unavailable("the server is shutting down", reason="SHUTTING_DOWN")


def _swallow(fut: asyncio.Future) -> None:
    # The RPC that waited for it may be gone; the outcome is saved or logged elsewhere.
    if not fut.cancelled():
        fut.exception()


def _position_token(turn: int, position: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([turn, position])).decode().rstrip("=")


def _decode_position_token(token: str) -> tuple[int, int] | None:
    if not token:
        return None
    try:
        if len(token) > 128:
            raise ValueError
        raw = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        turn, position = raw
        if not (isinstance(turn, int) and isinstance(position, int)):
            raise ValueError
        return turn, position
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise errors.InvalidArgument("page_token", "is not a token returned by this list") from None


def build_prompt(
    system_prompt: str, history_newest_first: list[tuple[str, str]], user_text: str, budget_chars: int
) -> list[ChatMessage]:
    """System prompt, then as much recent history as fits in `budget_chars`, then the new message."""
    kept: list[tuple[str, str]] = []
    used = 0
    for role, content in history_newest_first:
        if used + len(content) > budget_chars:
            break
        kept.append((role, content))
        used += len(content)
    kept.reverse()
    while kept and kept[0][0] != ROLE_USER:  # history starts with a user turn
        kept.pop(0)
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    messages += [ChatMessage(role, content) for role, content in kept]
    messages.append(ChatMessage("user", user_text))
    return messages


class ChatService:
    def __init__(
        self,
        db: Database,
        pubsub: PubSub,
        ai: ChatProvider,
        background: Background,
        settings: Settings,
        limits: Limits | None = None,
    ):
        self._db = db
        self._background = background
        self._settings = settings
        self._limits = limits
        self._gen = Generator(db, ai, background, limits)
        self._watcher = Watcher(db, pubsub, self._gen)

    # -- threads -----------------------------------------------------------------------------------

    async def create_thread(self, p: Principal, *, title: str) -> Thread:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            return await repo.insert_thread(s, user_id=p.user_id, title=title)

    async def list_threads(
        self, p: Principal, *, page_size: int, page_token: str
    ) -> tuple[list[Thread], str]:
        after = paging.decode(page_token)
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            rows = await repo.list_threads(s, user_id=p.user_id, limit=page_size + 1, after=after)
        return paging.page(rows, page_size, lambda t: (t.updated_at, t.id))

    async def get_thread(self, p: Principal, thread_id: uuid.UUID) -> Thread:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            thread = await repo.get_thread(s, p.user_id, thread_id)
        if thread is None:
            raise errors.NotFound("thread", str(thread_id))
        return thread

    async def rename_thread(self, p: Principal, thread_id: uuid.UUID, *, title: str) -> Thread:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            thread = await repo.set_title(s, user_id=p.user_id, thread_id=thread_id, title=title)
        if thread is None:
            raise errors.NotFound("thread", str(thread_id))
        return thread

    async def delete_thread(self, p: Principal, thread_id: uuid.UUID) -> None:
        """Its messages go with it; a reply still generating stops at its next checkpoint."""
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            if not await repo.delete_thread(s, user_id=p.user_id, thread_id=thread_id):
                raise errors.NotFound("thread", str(thread_id))

    async def list_messages(
        self, p: Principal, thread_id: uuid.UUID, *, page_size: int, page_token: str, all_branches: bool
    ) -> tuple[list[Message], str]:
        after = _decode_position_token(page_token)
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            if await repo.get_thread(s, p.user_id, thread_id) is None:
                raise errors.NotFound("thread", str(thread_id))
            await self._gen.fail_expired(s, p.user_id, thread_id=thread_id)
            rows = await repo.list_messages(
                s,
                user_id=p.user_id,
                thread_id=thread_id,
                limit=page_size + 1,
                after=after,
                all_branches=all_branches,
            )
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = _position_token(last.turn, last.position)
        return rows[:page_size], token

    # -- replies -------------------------------------------------------------------------------------

    async def send_message(
        self,
        p: Principal,
        *,
        thread_id: uuid.UUID | None,
        content: str,
        client_message_id: uuid.UUID | None,
        model: str,
    ) -> AsyncIterator[StreamEvent]:
        """The user's message is saved, then the reply streams. The work runs in a detached task
        (also the saving, so a client that goes away at once still gets its message answered)."""
        reply_id = uuid.uuid4()
        setup: asyncio.Future[_Started] = asyncio.get_running_loop().create_future()
        setup.add_done_callback(_swallow)

        async def prepare(sent: asyncio.Future[_Started]) -> None:
            for attempt in range(2):
                try:
                    # Every statement of a send is written for the driver: no ORM session.
                    async with self._db.driver_transaction(p.user_id, p.session_id) as s:
                        sent.set_result(
                            await self._prepare_send(
                                s, p, reply_id, thread_id, content, client_message_id, model
                            )
                        )
                    return
                except _ClientIdTaken:
                    if attempt:
                        raise errors.Aborted("a concurrent send used the same client_message_id") from None
            raise AssertionError("unreachable")

        self._gen.spawn(reply_id, self._detached(prepare, setup))
        started = await asyncio.shield(setup)
        yield StreamEvent(
            USER_SAVED,
            started.user_message.id,
            0,
            message=started.user_message,
            thread=started.thread,
        )
        async for ev in self._relay(p, started.reply, started.generation, 0, raise_failure=True):
            yield ev

    async def regenerate(
        self, p: Principal, *, message_id: uuid.UUID, model: str
    ) -> AsyncIterator[StreamEvent]:
        reply_id = uuid.uuid4()
        setup: asyncio.Future[_Started] = asyncio.get_running_loop().create_future()
        setup.add_done_callback(_swallow)

        async def prepare(sent: asyncio.Future[_Started]) -> None:
            async with self._db.driver_transaction(p.user_id, p.session_id) as s:
                sent.set_result(await self._prepare_regenerate(s, p, reply_id, message_id, model))

        self._gen.spawn(reply_id, self._detached(prepare, setup))
        started = await asyncio.shield(setup)
        async for ev in self._relay(p, started.reply, started.generation, 0, raise_failure=True):
            yield ev

    async def watch(
        self, p: Principal, *, message_id: uuid.UUID, after_seq: int
    ) -> AsyncIterator[StreamEvent]:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            row = await repo.get_message(s, p.user_id, message_id)
        if row is None:
            raise errors.NotFound("message", str(message_id))
        if row.role != ROLE_ASSISTANT:
            raise errors.InvalidArgument("message_id", "must be the id of an assistant message")
        async for ev in self._relay(p, row, None, after_seq, raise_failure=False):
            yield ev

    async def cancel(self, p: Principal, message_id: uuid.UUID) -> Message:
        """Stop a generation wherever it runs, and return the message once it is saved."""
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            await self._gen.fail_expired(s, p.user_id, message_id=message_id)
            row = await repo.get_message(s, p.user_id, message_id)
        if row is None:
            raise errors.NotFound("message", str(message_id))
        if row.role != ROLE_ASSISTANT or row.status != GENERATING:
            raise errors.FailedPrecondition(
                "the message is not being generated", reason="GENERATION_NOT_ACTIVE"
            )
        await self._background.request_cancel(task_key(message_id))
        async with asyncio.timeout(CANCEL_WAIT_SECONDS):
            async for ev in self._relay(p, row, None, row.seq, raise_failure=False):
                if ev.kind == DONE and ev.message is not None:
                    return ev.message
        raise errors.DeadlineExceeded("the generation did not stop in time", reason="UPSTREAM_TIMEOUT")

    async def submit_feedback(
        self, p: Principal, message_id: uuid.UUID, *, rating: int, comment: str
    ) -> Message:
        async with self._db.driver_transaction(p.user_id, p.session_id) as s:
            row = await repo.get_message(s, p.user_id, message_id)
            if row is None:
                raise errors.NotFound("message", str(message_id))
            if row.role != ROLE_ASSISTANT:
                raise errors.InvalidArgument("message_id", "feedback is for assistant messages only")
            updated = await repo.set_feedback(
                s, user_id=p.user_id, message_id=message_id, rating=rating, comment=comment
            )
        assert updated is not None
        return updated

    # -- export ----------------------------------------------------------------------------------------

    async def export_threads(self, p: Principal) -> AsyncIterator[tuple[Thread, list[Message]]]:
        after = None
        while True:
            async with self._db.driver_transaction(p.user_id, p.session_id) as s:
                threads = await repo.threads_for_export(s, user_id=p.user_id, limit=EXPORT_PAGE, after=after)
                messages = await repo.messages_of_threads(
                    s, user_id=p.user_id, thread_ids=[t.id for t in threads]
                )
            by_thread: dict[uuid.UUID, list[Message]] = {}
            for m in messages:
                by_thread.setdefault(m.thread_id, []).append(m)
            for t in threads:
                yield t, by_thread.get(t.id, [])
            if len(threads) < EXPORT_PAGE:
                return
            after = (threads[-1].created_at, threads[-1].id)

    # -- pieces ------------------------------------------------------------------------------------------

    async def _detached(self, prepare, setup: asyncio.Future) -> None:
        """The detached task: create the rows (answering the RPC through `setup`), then generate.

        `prepare(sent)` runs the setup transaction in a task of its own and hands its rows to `sent`
        just before its COMMIT. The model is called at once, while that COMMIT waits for the WAL
        flush (0.2 ms on a fast disk, a millisecond or more on a slow one: time that no longer adds
        to the first token), but nothing the model answers is relayed, stored or announced before
        the COMMIT has succeeded (`Generator.run`): a client sees its message saved before it sees
        a token of the reply. If the COMMIT fails, the upstream request is closed at once and there
        is no reply to finish."""
        sent: asyncio.Future[_Started] = asyncio.get_running_loop().create_future()
        saving = asyncio.create_task(prepare(sent))
        try:
            await asyncio.wait({sent, saving}, return_when=asyncio.FIRST_COMPLETED)
            if not sent.done() or sent.result().plan is None:
                await saving  # refused before anything was written, or a retried send: no reply to run
        except asyncio.CancelledError:
            saving.cancel()
            if not setup.done():
                setup.set_exception(_shutting_down())
            return
        except Exception as exc:  # domain errors for the caller; anything else is logged by the RPC
            if not setup.done():
                setup.set_exception(exc)
            return
        started = sent.result()
        if started.plan is None:
            setup.set_result(started)
            return
        gen = Generation(started.reply)
        task = asyncio.current_task()

        def committed(t: asyncio.Task) -> None:
            if t.cancelled() or t.exception() is not None:
                exc = None if t.cancelled() else t.exception()
                setup.set_exception(exc or _shutting_down())
                if task is not None:
                    task.cancel()  # closes the upstream request; `run` finds nothing to finish
                return
            self._gen.register(gen, task)
            setup.set_result(replace(started, generation=gen))

        saving.add_done_callback(committed)
        await self._gen.run(gen, started.plan, saving)

    async def _prepare_send(
        self,
        s: asyncpg.Connection,
        p: Principal,
        reply_id: uuid.UUID,
        thread_id: uuid.UUID | None,
        content: str,
        client_message_id: uuid.UUID | None,
        model: str,
    ) -> _Started:
        if client_message_id is not None:
            existing = await repo.user_message_by_client_id(s, p.user_id, client_message_id)
            if existing is not None:
                return await self._existing(s, p, existing, thread_id, content)
        # One round trip for all it is planned from (the thread, its history, quota, preferences).
        ctx = await repo.send_context(
            s, user_id=p.user_id, thread_id=thread_id, quota_kind=QUOTA_KIND, limit=HISTORY_MAX_ROWS
        )
        if thread_id is not None and ctx.thread is None:
            raise errors.NotFound("thread", str(thread_id))
        first_turn = not any(role == ROLE_USER for role, _ in ctx.past)
        thread = ctx.thread or await repo.insert_thread(s, user_id=p.user_id, title="")
        plan = await self._plan(
            s,
            p,
            thread,
            content,
            ctx.past,
            first_turn,
            model,
            quota_used=ctx.quota_used,
            preferences=ctx.preferences,
        )
        # The user's message and the reply in one statement. A thread created in this transaction
        # is fresh already: no need to touch it.
        sent = await repo.send(
            s,
            user_id=p.user_id,
            thread_id=thread.id,
            content=content,
            client_message_id=client_message_id,
            model=plan.model,
            touch_thread=thread_id is not None,
            **self._new_reply(reply_id),
        )
        if sent is None:
            raise _ClientIdTaken
        user_message, reply, touched = sent
        thread = touched or thread
        return _Started(thread, user_message, reply, plan)

    async def _existing(
        self,
        s: asyncpg.Connection,
        p: Principal,
        user_message: Message,
        thread_id: uuid.UUID | None,
        content: str,
    ) -> _Started:
        """A retried send: the pair it created, not a second one."""
        if thread_id is not None and user_message.thread_id != thread_id:
            raise errors.InvalidArgument(
                "client_message_id", "was already used for a message in another thread"
            )
        if user_message.content != content:
            raise errors.InvalidArgument("client_message_id", "was already used for a different message")
        thread = await repo.get_thread(s, p.user_id, user_message.thread_id)
        reply = await repo.latest_reply(s, p.user_id, user_message.id)
        if thread is None or reply is None:  # both are created with the user message
            raise errors.NotFound("message", str(user_message.id))
        return _Started(thread, user_message, reply)

    async def _prepare_regenerate(
        self,
        s: asyncpg.Connection,
        p: Principal,
        reply_id: uuid.UUID,
        message_id: uuid.UUID,
        model: str,
    ) -> _Started:
        row = await repo.get_message(s, p.user_id, message_id)
        if row is None:
            raise errors.NotFound("message", str(message_id))
        # Locked, so two concurrent regenerations of one message cannot both pass the check below.
        parent_id = row.parent_message_id if row.role == ROLE_ASSISTANT else row.id
        assert parent_id is not None
        user_message = await repo.get_message(s, p.user_id, parent_id, lock=True)
        if user_message is None:
            raise errors.NotFound("message", str(message_id))
        thread = await repo.get_thread(s, p.user_id, row.thread_id)
        if thread is None:
            raise errors.NotFound("message", str(message_id))
        await self._gen.fail_expired(s, p.user_id, thread_id=thread.id)
        if await repo.has_generating_reply(s, p.user_id, user_message.id):
            raise errors.FailedPrecondition(
                "a reply to this message is still being generated; cancel it first",
                reason="FAILED_PRECONDITION",
            )
        past = await repo.history(
            s, user_id=p.user_id, thread_id=thread.id, before_turn=user_message.turn, limit=HISTORY_MAX_ROWS
        )
        first_turn = await repo.is_first_turn(s, thread.id, user_message.turn)
        plan = await self._plan(s, p, thread, user_message.content, past, first_turn, model)
        reply, touched = await repo.start_reply(
            s, parent=user_message, model=plan.model, touch_thread=True, **self._new_reply(reply_id)
        )
        thread = touched or thread
        return _Started(thread, user_message, reply, plan)

    async def _plan(
        self,
        s: asyncpg.Connection,
        p: Principal,
        thread: Thread,
        user_text: str,
        past: list[tuple[str, str]],
        first_turn: bool,
        model: str,
        *,
        quota_used: int | None = None,
        preferences: dict | None = None,
    ) -> Plan:
        """What the model gets for a reply to `user_text`, after `past` (newest first). The quota
        used today and the stored preferences are read here unless the caller has them already."""
        if self._limits is not None:  # over the daily quota: refused, and the transaction rolls back
            if quota_used is None:
                quota_used = await self._limits.used_today(s, p.user_id, QUOTA_KIND)
            self._limits.check(p.user_id, QUOTA_KIND, self._settings.quota_daily_chat_tokens, used=quota_used)
        if preferences is None:
            prefs = await effective.load(s, p.user_id, self._settings)
        else:
            prefs = effective.resolve(preferences, self._settings)
        model = model or prefs.chat_model
        return Plan(
            model=model,
            messages=build_prompt(prefs.system_prompt, past, user_text, self._settings.history_budget_chars),
            temperature=prefs.temperature,
            title_model=self._settings.title_model or model,
            title_input=user_text if thread.title == "" and first_turn else None,
        )

    @staticmethod
    def _new_reply(reply_id: uuid.UUID) -> dict:
        """How a reply's row starts (repo.send, repo.start_reply): its id, its lease and its first
        stored event."""
        return {"reply_id": reply_id, "lease": LEASE, "first_events": encode_batch([Event(1, START)])}

    async def _relay(
        self, p: Principal, reply: Message, gen: Generation | None, after_seq: int, *, raise_failure: bool
    ) -> AsyncIterator[StreamEvent]:
        """The reply's events after `after_seq`: from memory when it generates here, else from the
        database and NOTIFY. With `raise_failure`, a failed reply's error is raised after `done`."""
        gen = gen or self._gen.local(reply.id)
        failure = None
        if gen is not None and gen.user_id == p.user_id:
            async for ev in gen.follow(after_seq, self._settings.stream_interval_ms / 1000):
                message = gen.started if ev.kind == START else gen.final if ev.kind == DONE else None
                yield self._out(ev, reply, message)
                failure = ev.error if ev.kind == DONE else None
        else:
            async for ev, message in self._watcher.follow(p, reply.id, after_seq):
                yield self._out(ev, reply, message)
                failure = ev.error if ev.kind == DONE else None
        if raise_failure and failure is not None:
            raise error_from_json(failure)

    @staticmethod
    def _out(ev: Event, reply: Message, message: Message | None) -> StreamEvent:
        return StreamEvent(
            ev.kind,
            reply.id,
            ev.seq,
            text=ev.text,
            usage=ev.usage,
            thread_id=reply.thread_id if ev.kind == TITLE else None,
            message=message,
        )
