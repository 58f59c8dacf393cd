"""A soak of two replicas: streams read to the end, dropped by their client, cancelled through either
replica and watched from the other, unary calls, searches and images, all at once for a while
(EVERYTHING_SOAK_SECONDS, 30 by default; run it longer by hand). Afterwards nothing is stuck or lost
and nothing leaked:

- every reply reached a final status (none GENERATING once the chat lease could have run out), and
  every user message has its reply; no search RUNNING, no image GENERATING;
- what a client read is what was saved: whole replies equal their row, a dropped client's reply was
  finished and saved anyway, a cancelled one is saved as the cancel answered;
- no transaction left open (pg_stat_activity: no 'idle in transaction', no query still active);
- each server's open streams and checked-out connections back to 0 (its Prometheus metrics), its
  file descriptors back near their warm baseline, its memory not growing with the work done.

    EVERYTHING_SOAK_SECONDS=600 .venv/bin/pytest tests/load/test_soak.py -s
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from everything.chat.v1 import chat_pb2
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.image.v1 import image_pb2
from everything.image.v1 import image_service_pb2 as image_pb
from everything.search.v1 import search_pb2
from everything.search.v1 import search_service_pb2 as search_pb
from everything_server.chat.generation import LEASE
from tests.chat.helpers import Collected, collect, marker, read_until
from tests.load.conftest import (
    LOAD_ENV,
    Footprint,
    Stubs,
    cpu_seconds,
    eventually,
    metrics_port,
    no_open_transactions,
    replicas,
    scrape,
    server_backends,
    unary_call,
)
from tests.support import SignedUpUser, details, server_env, sign_up

SOAK_SECONDS = float(os.environ.get("EVERYTHING_SOAK_SECONDS", "30"))
WORKERS = int(os.environ.get("EVERYTHING_SOAK_WORKERS", "12"))
USERS = 6
SEED = int(os.environ.get("EVERYTHING_SOAK_SEED", "7"))
ACTION_TIMEOUT = 60.0  # no single action of a worker may take longer than this
MAX_ACTIONS_PER_WORKER = 100_000
CANCEL_TOKENS = 300
# Warm pools (database, upstream HTTP, gRPC) hold some descriptors they may open more of later.
FD_SLACK = 30
RSS_GROWTH_MB = 150.0

COMPLETED = chat_pb2.MESSAGE_STATUS_COMPLETED
CANCELLED = chat_pb2.MESSAGE_STATUS_CANCELLED


@dataclass
class Reply:
    kind: str  # "full", "dropped", "cancelled", "watched"
    reply_id: str
    tokens: int
    seen: str  # the text the client read (all of it unless dropped)
    final: chat_pb2.Message | None = None  # from message_completed, when read to the end
    cancel_answer: chat_pb2.Message | None = None
    watched: str | None = None


@dataclass
class Ledger:
    replies: list[Reply] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # method -> calls that ended OK
    errors: list[str] = field(default_factory=list)
    threads: dict[str, list[str]] = field(default_factory=dict)  # user id -> thread ids


class Soak:
    """The actions of the soak's clients. `a` is the replica a call starts on, `b` the other one."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def _thread(self, rng: random.Random, user: SignedUpUser) -> str:
        threads = self.ledger.threads.setdefault(user.id, [])
        return rng.choice(threads) if threads and rng.random() < 0.5 else ""

    def _send(self, rng, s: Stubs, user, tokens: int, rate: int):
        return s.chat.SendMessage(
            chat_pb.SendMessageRequest(
                thread_id=self._thread(rng, user), content=f"{marker()} [mock:tokens={tokens} rate={rate}]"
            ),
            metadata=user.md,
            timeout=ACTION_TIMEOUT,
        )

    def _saved(self, user, got: Collected) -> None:
        if got.of("user_message_saved"):
            thread_id = got.user_saved.thread.id
            threads = self.ledger.threads.setdefault(user.id, [])
            if thread_id not in threads:
                threads.append(thread_id)

    async def full(self, rng, a: Stubs, b: Stubs, user) -> None:
        tokens = rng.randint(10, 60)
        got = await collect(self._send(rng, a, user, tokens, rng.choice([50, 100, 200])))
        self._saved(user, got)
        self.ledger.replies.append(Reply("full", got.reply_id, tokens, got.text, got.final))

    async def dropped(self, rng, a: Stubs, b: Stubs, user) -> None:
        """The client goes away mid-reply; the reply is finished and saved all the same."""
        tokens = rng.randint(30, 80)
        call = self._send(rng, a, user, tokens, 40)
        got, deltas = Collected(), rng.randint(1, 5)
        await read_until(call, lambda ev: len(got.of("text_delta")) >= deltas, got)
        call.cancel()
        self._saved(user, got)
        self.ledger.replies.append(Reply("dropped", got.reply_id, tokens, got.text))

    async def cancelled(self, rng, a: Stubs, b: Stubs, user) -> None:
        """CancelGeneration through either replica; the stream ends with the cancelled message."""
        call = self._send(rng, a, user, CANCEL_TOKENS, 30)
        got = Collected()
        await read_until(call, lambda ev: len(got.of("text_delta")) >= 2, got)
        via = rng.choice([a, b])
        answer = await via.chat.CancelGeneration(
            chat_pb.CancelGenerationRequest(message_id=got.reply_id), metadata=user.md, timeout=ACTION_TIMEOUT
        )
        await collect(call, got)
        self._saved(user, got)
        self.ledger.replies.append(
            Reply("cancelled", got.reply_id, CANCEL_TOKENS, got.text, got.final, cancel_answer=answer.message)
        )

    async def watched(self, rng, a: Stubs, b: Stubs, user) -> None:
        """WatchMessage on the other replica (through NOTIFY) from the start, while it generates."""
        tokens = rng.randint(20, 60)
        call = self._send(rng, a, user, tokens, 50)
        got = Collected()
        await read_until(call, lambda ev: ev.WhichOneof("event") == "message_started", got)
        watch = b.chat.WatchMessage(
            chat_pb.WatchMessageRequest(message_id=got.reply_id, after_seq=0),
            metadata=user.md,
            timeout=ACTION_TIMEOUT,
        )
        watched, _ = await asyncio.gather(collect(watch), collect(call, got))
        self._saved(user, got)
        self.ledger.replies.append(
            Reply("watched", got.reply_id, tokens, got.text, got.final, watched=watched.text)
        )

    async def unary(self, rng, a: Stubs, b: Stubs, user) -> None:
        for n in range(3):
            method, call = unary_call(rng.choice([a, b]), user, n, timeout=ACTION_TIMEOUT)
            await call
            self.ledger.calls[method] += 1
        if thread_id := self._thread(rng, user):
            await rng.choice([a, b]).chat.ListMessages(
                chat_pb.ListMessagesRequest(thread_id=thread_id), metadata=user.md, timeout=ACTION_TIMEOUT
            )
            self.ledger.calls["ListMessages"] += 1

    async def search(self, rng, a: Stubs, b: Stubs, user) -> None:
        # No directive in the query: the history provider quotes matching chat messages (cut short)
        # to the model, and the mock would take a quoted, cut directive of theirs for a broken one.
        events = [
            ev
            async for ev in a.search.Search(
                search_pb.SearchRequest(query=f"soak lighthouse {marker()}"),
                metadata=user.md,
                timeout=ACTION_TIMEOUT,
            )
        ]
        done = events[-1].completed.search
        if done.status != search_pb2.SEARCH_STATUS_COMPLETED:
            raise AssertionError(f"search ended {search_pb2.SearchStatus.Name(done.status)}")
        self.ledger.searches.append(done.id)

    async def image(self, rng, a: Stubs, b: Stubs, user) -> None:
        events = [
            ev
            async for ev in a.image.GenerateImage(
                image_pb.GenerateImageRequest(
                    prompt=f"[mock:image-delay=0.05] a soak test {marker()}", size="256x256", partial_images=1
                ),
                metadata=user.md,
                timeout=ACTION_TIMEOUT,
            )
        ]
        done = events[-1].completed.image
        if done.status != image_pb2.IMAGE_STATUS_COMPLETED:
            raise AssertionError(f"image ended {image_pb2.ImageStatus.Name(done.status)}")
        self.ledger.images.append(done.id)


ACTIONS = {  # name: weight
    "full": 30,
    "dropped": 12,
    "cancelled": 8,
    "watched": 15,
    "unary": 25,
    "search": 5,
    "image": 5,
}


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        d = details(exc)
        return f"{d.code.name} {d.reason}: {d.message}"
    return f"{type(exc).__name__}: {exc}"


async def worker(w: int, soak: Soak, replicas: list[Stubs], users: list[SignedUpUser], until: float) -> int:
    rng = random.Random(SEED * 1000 + w)
    loop = asyncio.get_running_loop()
    done = 0
    while loop.time() < until and done < MAX_ACTIONS_PER_WORKER:
        name = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        user = users[(w + done) % len(users)]
        a, b = replicas if rng.random() < 0.5 else replicas[::-1]
        try:
            async with asyncio.timeout(ACTION_TIMEOUT + 5):
                await getattr(soak, name)(rng, a, b, user)
        except Exception as exc:  # noqa: BLE001 - every failure is reported at the end
            soak.ledger.errors.append(f"{name}: {describe(exc)}")
        done += 1
    return done


@pytest.fixture(scope="module")
async def two_replicas(settings_env, tmp_path_factory):
    async with replicas(server_env(settings_env, **LOAD_ENV), tmp_path_factory.mktemp("soak")) as procs:
        channels = [grpc.aio.insecure_channel(p.target) for p in procs]
        try:
            yield procs, [Stubs(ch) for ch in channels]
        finally:
            for ch in channels:
                await ch.close()


async def _settled(port: int) -> bool:
    m = await scrape(port)
    return m["everything_active_streams"] == 0 and m["everything_db_pool_in_use"] == 0


@pytest.mark.timeout(SOAK_SECONDS + 240)  # set-up, warm-up and the checks after it take about 30 s
async def test_a_soak_of_two_replicas_leaves_nothing_stuck_lost_or_leaked(two_replicas, db_conn, mock_model):
    procs, stubs = two_replicas
    ports = [metrics_port(p) for p in procs]
    users = [await sign_up(stubs[i % 2].auth) for i in range(USERS)]
    user_ids = [uuid.UUID(u.id) for u in users]
    loop = asyncio.get_running_loop()

    # Warm up (pools filled, code paths imported), settle, and take the baseline.
    warm = Soak(Ledger())
    async with asyncio.timeout(120):
        for name in ACTIONS:
            await asyncio.gather(
                *(
                    getattr(warm, name)(random.Random(i), stubs[i % 2], stubs[1 - i % 2], u)
                    for i, u in enumerate(users)
                )
            )
    assert not warm.ledger.errors, warm.ledger.errors
    for port in ports:
        await eventually(lambda port=port: _settled(port), timeout=30, what="warm-up settled")
    baseline = [Footprint.of(p) for p in procs]
    cpu_before = [cpu_seconds(p.proc.pid) for p in procs]
    backends_before = await server_backends(db_conn)
    aborts_before = len(mock_model.aborts)

    # The soak.
    soak = Soak(Ledger())
    started = loop.time()
    async with asyncio.timeout(SOAK_SECONDS + ACTION_TIMEOUT + 30):
        actions = await asyncio.gather(
            *(worker(w, soak, stubs, users, started + SOAK_SECONDS) for w in range(WORKERS))
        )
    soak_seconds = loop.time() - started
    cpu = [cpu_seconds(p.proc.pid) - before for p, before in zip(procs, cpu_before, strict=True)]
    ledger = soak.ledger
    assert not ledger.errors, f"{len(ledger.errors)} failed actions: {Counter(ledger.errors).most_common(10)}"
    kinds = Counter(r.kind for r in ledger.replies)
    assert all(kinds[k] for k in ("full", "dropped", "cancelled", "watched")), kinds

    # Nothing stuck: every reply, search and image reached a final state (bounded by the chat lease).
    settle_started = loop.time()
    await eventually(
        lambda: _nothing_unfinished(db_conn, user_ids),
        timeout=LEASE.total_seconds() + 15,
        interval=0.25,
        what="every reply, search and image finished",
    )
    finished_after = loop.time() - settle_started

    # Nothing lost: every user message has its reply, and each reply is saved as its client saw it.
    counts = await db_conn.fetchrow(
        "SELECT count(*) FILTER (WHERE role = 'user') AS asked, "
        "       count(*) FILTER (WHERE role = 'assistant') AS answered "
        "FROM messages WHERE user_id = ANY($1)",
        user_ids,
    )
    assert counts["asked"] == counts["answered"], dict(counts)
    rows = {
        str(r["id"]): r
        for r in await db_conn.fetch(
            "SELECT id, status, content, error_reason FROM messages WHERE id = ANY($1)",
            [uuid.UUID(r.reply_id) for r in ledger.replies],
        )
    }
    statuses = Counter()
    for reply in ledger.replies:
        row = rows[reply.reply_id]
        statuses[(reply.kind, row["status"])] += 1
        where = f"{reply.kind} reply {reply.reply_id}"
        if reply.kind == "cancelled":
            assert row["status"] == "cancelled", (where, dict(row))
            assert reply.cancel_answer is not None and reply.final is not None
            assert row["content"] == reply.cancel_answer.content == reply.final.content == reply.seen, where
            assert reply.final.status == CANCELLED and 0 < len(row["content"].split()) < CANCEL_TOKENS, where
            continue
        assert row["status"] == "completed", (where, dict(row))
        assert len(row["content"].split()) == reply.tokens, where
        if reply.kind == "dropped":
            assert row["content"].startswith(reply.seen), where
        else:
            assert reply.final is not None and reply.final.status == COMPLETED, where
            assert row["content"] == reply.seen == reply.final.content, where
        if reply.kind == "watched":
            assert reply.watched == row["content"], where
    # A cancel closed the upstream stream, so the model stopped generating.
    await eventually(
        lambda: len(mock_model.aborts) - aborts_before >= kinds["cancelled"],
        timeout=10,
        what="an upstream abort per cancel",
    )

    # Nothing leaked: streams and connections back, no transaction open, descriptors and memory.
    for port in ports:
        await eventually(lambda port=port: _settled(port), timeout=30, what="streams and pool back to 0")
    _, backends = await eventually(
        lambda: no_open_transactions(db_conn), timeout=15, what="no open transaction left"
    )
    after = [
        await eventually(
            lambda p=p, base=base: _footprint_within(p, base), timeout=30, what="file descriptors back"
        )
        for p, base in zip(procs, baseline, strict=True)
    ]
    for base, now in zip(baseline, after, strict=True):
        assert now.rss_mb < base.rss_mb + RSS_GROWTH_MB, (base, now)
    for p in procs:
        assert p.proc.poll() is None, "a server process died"
        assert "Traceback" not in p.logs(), p.logs()[-4000:]

    streams = sum(kinds.values())
    tokens = sum(len(r.seen.split()) for r in ledger.replies)
    print(
        f"\nsoak: {soak_seconds:.0f}s, {WORKERS} clients, {USERS} users, 2 replicas; {sum(actions)} actions: "
        f"{streams} replies {dict(kinds)} ({streams / soak_seconds:.1f}/s, {tokens} tokens read), "
        f"{len(ledger.searches)} searches, {len(ledger.images)} images, unary {dict(ledger.calls)}; "
        f"saved {dict(statuses)}; all final {finished_after:.1f}s after the soak; "
        f"CPU s per replica {[round(c, 1) for c in cpu]}; "
        f"fds {[b.fds for b in baseline]} -> {[a.fds for a in after]}, "
        f"RSS MB {[round(b.rss_mb) for b in baseline]} -> {[round(a.rss_mb) for a in after]}; "
        f"server connections before {backends_before}, after {backends}"
    )


async def _nothing_unfinished(conn: asyncpg.Connection, user_ids: list[uuid.UUID]) -> bool:
    left = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM messages WHERE user_id = ANY($1) AND status = 'generating') AS replies, "
        "       (SELECT count(*) FROM search_queries WHERE user_id = ANY($1) AND status = 'running') AS searches, "
        "       (SELECT count(*) FROM images WHERE user_id = ANY($1) AND status = 'generating') AS images",
        user_ids,
    )
    return not any(left.values())


async def _footprint_within(proc, base: Footprint) -> Footprint | None:
    now = Footprint.of(proc)
    return now if now.fds <= base.fds + FD_SLACK else None
