"""Faults in the middle of load: SIGTERM to a server with replies in flight, and PostgreSQL restarted
under a server that keeps running.

SIGTERM: replies that fit in the grace period finish and are saved whole; longer ones are saved
with the text they had; nothing is left GENERATING; health says NOT_SERVING at once and new calls
are refused while draining; the process exits 0 soon after the grace period.

PostgreSQL restart (a cluster of the test's own, never the machine's shared server): health goes
NOT_SERVING, calls fail fast with UNAVAILABLE (never INTERNAL, never a hang), and once the database
is back the same processes serve again: health, calls, the LISTEN connection that carries
cancels and watches between replicas, and a reply that finished during the outage is saved.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.image.v1 import image_pb2
from everything.image.v1 import image_service_pb2 as image_pb
from everything.search.v1 import search_pb2
from everything.search.v1 import search_service_pb2 as search_pb
from everything_server.chat.watch import IDLE_RECHECK_SECONDS
from everything_server.db import migrate
from tests.chat.helpers import CANCELLED, COMPLETED, Collected, collect, marker, read_until
from tests.load.conftest import (
    LOAD_ENV,
    OwnPostgres,
    Stubs,
    eventually,
    no_open_transactions,
    replicas,
    unary_call,
    unique_db_name,
)
from tests.support import ServerProcess, details, server_env, sign_up, start_server_process

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


CALL_TIMEOUT = 5.0  # a unary call that takes longer than this under a fault is a hang


@dataclass
class Outcome:
    at: float
    method: str
    code: grpc.StatusCode
    reason: str | None
    seconds: float


async def _unary_load(stubs: list[Stubs], users, stop: asyncio.Event, record: list[Outcome], worker: int):
    """Unary calls in a loop, round robin over replicas, users and methods, until `stop`."""
    i = worker
    loop = asyncio.get_running_loop()
    while not stop.is_set() and i < worker + 100_000:
        s, user = stubs[i % len(stubs)], users[i % len(users)]
        method, call = unary_call(s, user, i, timeout=CALL_TIMEOUT)
        t0 = loop.time()
        try:
            await call
            code, reason = grpc.StatusCode.OK, None
        except grpc.aio.AioRpcError as err:
            d = details(err)
            code, reason = d.code, d.reason
        record.append(Outcome(t0, method, code, reason, loop.time() - t0))
        i += 1
        await asyncio.sleep(0.02)


async def _health(s: Stubs) -> int | None:
    try:
        return (await s.health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
    except grpc.aio.AioRpcError:
        return None


# -- SIGTERM ---------------------------------------------------------------------------------------

GRACE = 5.0
LAME_DUCK = 2.0  # of the grace: long against the few calls that check the refusals
SHORT_TOKENS, LONG_TOKENS, RATE = 40, 400, 20  # 2 s fits in the grace period, 20 s does not


async def test_sigterm_under_load_finishes_what_fits_in_the_grace_and_saves_the_rest(
    settings_env, db_conn, tmp_path
):
    env = server_env(
        settings_env,
        **LOAD_ENV,
        EVERYTHING_SHUTDOWN_GRACE_SECONDS=str(GRACE),
        EVERYTHING_SHUTDOWN_LAME_DUCK_SECONDS=str(LAME_DUCK),
    )
    proc = await start_server_process(env, tmp_path / "server.log")
    try:
        async with grpc.aio.insecure_channel(proc.target) as channel:
            s = Stubs(channel)
            users = [await sign_up(s.auth) for _ in range(3)]
            health_watch = s.health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert (await health_watch.read()).status == SERVING

            # Replies in flight: short and long ones, read by their client or dropped by it.
            plan = [("short", True), ("short", False), ("long", True), ("long", False)] * 3
            calls, seen = [], []
            for i, (kind, _) in enumerate(plan):
                tokens = SHORT_TOKENS if kind == "short" else LONG_TOKENS
                call = s.chat.SendMessage(
                    chat_pb.SendMessageRequest(content=f"{marker()} [mock:tokens={tokens} rate={RATE}]"),
                    metadata=users[i % len(users)].md,
                    timeout=60,
                )
                calls.append(call)
                seen.append(Collected())
            for call, got in zip(calls, seen, strict=True):
                await read_until(call, lambda ev: ev.WhichOneof("event") == "text_delta", got)
            for call, (_, kept) in zip(calls, plan, strict=True):
                if not kept:
                    call.cancel()  # disconnect is not cancel: the reply goes on without its client
            reading = [
                asyncio.create_task(_read_to_end(call, got))
                for call, got, (_, kept) in zip(calls, seen, plan, strict=True)
                if kept
            ]

            # Unary calls keep coming, through the SIGTERM and the drain.
            stop_unary, unary = asyncio.Event(), []
            unary_load = [
                asyncio.create_task(_unary_load([s], users, stop_unary, unary, w)) for w in range(3)
            ]
            await eventually(lambda: len(unary) >= 10, timeout=10, what="unary calls before SIGTERM")

            loop = asyncio.get_running_loop()
            started = loop.time()
            proc.proc.send_signal(signal.SIGTERM)

            # Health says NOT_SERVING at once (to a watcher that was already connected).
            async with asyncio.timeout(5):
                while (await health_watch.read()).status != NOT_SERVING:
                    pass
            not_serving_after = loop.time() - started

            # New calls are refused once the drain has begun (one racing the SIGTERM may be served),
            # by the server's own code while it is a lame duck (calls keep coming, so that lasts
            # LAME_DUCK): UNAVAILABLE, SHUTTING_DOWN, on this channel and on a new one. None waits
            # for the drain.
            first_refusal = await _first_refusal(s.auth, users[0])
            refused_after = loop.time() - started
            lame_duck = (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
            assert first_refusal == lame_duck, first_refusal
            assert await _refusal(_current_user(s.auth, users[0])) == lame_duck
            async with grpc.aio.insecure_channel(proc.target) as fresh:
                fresh_auth = auth_service_pb2_grpc.AuthServiceStub(fresh)
                assert await _refusal(_current_user(fresh_auth, users[0])) == lame_duck
            assert proc.proc.poll() is None, "calls were refused only because the process was gone"

            exit_code = await asyncio.to_thread(proc.proc.wait, GRACE + 20)
            exited_after = loop.time() - started
            outcomes = await asyncio.gather(*reading)
            stop_unary.set()
            await asyncio.gather(*unary_load)
            health_watch.cancel()
    finally:
        proc.terminate()
    assert exit_code == 0, proc.logs()[-3000:]
    assert exited_after < GRACE + 10, exited_after
    logs = proc.logs()
    assert '"message":"draining"' in logs and '"message":"stopped"' in logs

    ids = [uuid.UUID(got.reply_id) for got in seen]
    rows = {r["id"]: r for r in await db_conn.fetch("SELECT * FROM messages WHERE id = ANY($1)", ids)}
    assert len(rows) == len(ids), "a reply row is missing"
    statuses = Counter()
    for (kind, kept), got, rid in zip(plan, seen, ids, strict=True):
        row = rows[rid]
        statuses[(kind, row["status"])] += 1
        assert row["status"] != "generating", (kind, kept, dict(row))
        # Whatever a client saw is in the saved text.
        assert row["content"].startswith(got.text), (kind, kept)
        if kind == "short":
            assert row["status"] == "completed", (kind, kept, row["status"], row["error_reason"])
            assert len(row["content"].split()) == SHORT_TOKENS
        else:
            assert row["status"] in ("cancelled", "failed"), row["status"]
            assert row["status"] == "cancelled" or row["error_reason"] == "SHUTTING_DOWN", row["error_reason"]
            assert 0 < len(row["content"].split()) < LONG_TOKENS
            assert row["completion_tokens"] > 0
    # The kept short streams saw their whole reply with a clean end; the long ones an error that
    # says to retry (the reply failed SHUTTING_DOWN, or the server cut the call at the end of grace).
    kept_plan = [kind for kind, kept in plan if kept]
    kept_seen = [got for got, (_, kept) in zip(seen, plan, strict=True) if kept]
    for kind, got, outcome in zip(kept_plan, kept_seen, outcomes, strict=True):
        if kind == "short":
            assert outcome == grpc.StatusCode.OK, outcome
            assert got.final.status == COMPLETED and got.final.content == got.text
        else:
            assert outcome in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), outcome
    # Unary calls were served, then refused; none failed otherwise or waited for the drain.
    unary_codes = Counter(o.code.name for o in unary)
    assert set(unary_codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, unary_codes
    assert unary_codes["OK"] >= 10 and max(o.seconds for o in unary) < CALL_TIMEOUT
    long_codes = Counter(o.name for kind, o in zip(kept_plan, outcomes, strict=True) if kind == "long")
    print(
        f"\nSIGTERM with {len(plan)} replies in flight (grace {GRACE:.0f}s): NOT_SERVING after "
        f"{not_serving_after:.2f}s, new calls refused after {refused_after:.2f}s ({first_refusal[1]}), "
        f"exit 0 after {exited_after:.2f}s; saved {dict(statuses)}; long streams ended {dict(long_codes)}; "
        f"unary calls {dict(unary_codes)}"
    )


async def _read_to_end(call, got: Collected) -> grpc.StatusCode:
    try:
        await collect(call, got)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _current_user(auth, user):
    return auth.GetCurrentUser(auth_pb.GetCurrentUserRequest(), metadata=user.md, timeout=2)


async def _first_refusal(auth, user) -> tuple[grpc.StatusCode, str | None]:
    """Call until a call is refused (bounded): the code and reason it was refused with."""
    async with asyncio.timeout(5):
        while (got := await _refusal(_current_user(auth, user)))[0] == grpc.StatusCode.OK:
            await asyncio.sleep(0.01)
    return got


async def _refusal(aw) -> tuple[grpc.StatusCode, str | None]:
    try:
        await aw
    except grpc.aio.AioRpcError as err:
        return err.code(), details(err).reason
    return grpc.StatusCode.OK, None


# -- PostgreSQL restarted --------------------------------------------------------------------------

INFLIGHT_TOKENS = 30  # 1.5 s at 20 tokens/s: ends while the database is down


async def _read_all(call, events: list) -> grpc.StatusCode:
    """The rest of a stream started with call.read() (which must not be mixed with iteration)."""
    try:
        while (ev := await call.read()) is not grpc.aio.EOF:
            events.append(ev)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@dataclass
class InFlight:
    """A reply, a search and an image, each started (its rows created) before the database goes
    down and finishing while it is down."""

    reply: Collected
    reply_end: asyncio.Task
    search: list
    search_end: asyncio.Task
    image: list
    image_end: asyncio.Task

    @classmethod
    async def start(cls, stubs: list[Stubs], users) -> InFlight:
        send = stubs[0].chat.SendMessage(
            chat_pb.SendMessageRequest(content=f"{marker()} [mock:tokens={INFLIGHT_TOKENS} rate=20]"),
            metadata=users[0].md,
            timeout=60,
        )
        reply = Collected()
        await read_until(send, lambda ev: ev.WhichOneof("event") == "text_delta", reply)
        # users[2] has no chats, so the history provider quotes none to the model.
        search_call = stubs[1].search.Search(
            search_pb.SearchRequest(query=f"{marker()} [mock:tokens={INFLIGHT_TOKENS} rate=20]"),
            metadata=users[2].md,
            timeout=60,
        )
        search = [await search_call.read()]
        while search[-1].WhichOneof("event") != "summary_delta":
            search.append(await search_call.read())
        image_call = stubs[0].image.GenerateImage(
            image_pb.GenerateImageRequest(
                prompt=f"[mock:image-delay=0.5] a lighthouse {marker()}", size="256x256", partial_images=2
            ),
            metadata=users[3].md,
            timeout=60,
        )
        image = [await image_call.read()]
        return cls(
            reply,
            asyncio.create_task(_read_to_end(send, reply)),
            search,
            asyncio.create_task(_read_all(search_call, search)),
            image,
            asyncio.create_task(_read_all(image_call, image)),
        )

    async def check(self, url: str) -> None:
        assert await self.reply_end == grpc.StatusCode.OK
        assert await self.search_end == grpc.StatusCode.OK
        assert await self.image_end == grpc.StatusCode.OK
        assert self.reply.final.status == COMPLETED
        searched = self.search[-1].completed.search
        assert searched.status == search_pb2.SEARCH_STATUS_COMPLETED
        drawn = self.image[-1].completed.image
        assert drawn.status == image_pb2.IMAGE_STATUS_COMPLETED
        conn = await asyncpg.connect(url)
        try:
            # Its client saw the end from memory; the row follows once a save gets through.
            reply = await eventually(
                lambda: conn.fetchrow(
                    "SELECT status, content FROM messages WHERE id = $1 AND status <> 'generating'",
                    uuid.UUID(self.reply.reply_id),
                ),
                timeout=30,
                what="the reply saved",
            )
            search = await conn.fetchrow(
                "SELECT status, summary FROM search_queries WHERE id = $1", uuid.UUID(searched.id)
            )
            image = await conn.fetchrow(
                "SELECT i.status, length(b.data) AS size FROM images i "
                "LEFT JOIN image_blobs b ON b.image_id = i.id WHERE i.id = $1",
                uuid.UUID(drawn.id),
            )
        finally:
            await conn.close()
        assert (reply["status"], reply["content"]) == ("completed", self.reply.text), dict(reply)
        assert len(reply["content"].split()) == INFLIGHT_TOKENS
        summary = "".join(
            ev.summary_delta.text for ev in self.search if ev.WhichOneof("event") == "summary_delta"
        )
        assert (search["status"], search["summary"]) == ("completed", summary), dict(search)
        assert len(summary.split()) == INFLIGHT_TOKENS
        assert image["status"] == "completed" and image["size"], dict(image)


async def test_postgres_restart_means_unavailable_then_serving_again_without_a_server_restart(
    own_postgres: OwnPostgres, settings_env, tmp_path
):
    # A database on the test's own cluster, migrated, and two replicas on it.
    name = unique_db_name()
    admin = await asyncpg.connect(own_postgres.url())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = own_postgres.url(name)
    await migrate.upgrade_async(url)
    env = server_env(settings_env, **LOAD_ENV, DATABASE_URL=url)
    async with replicas(env, tmp_path) as procs:
        codes, outcomes, figures = await _restart_under_load(own_postgres, url, procs)
        for p in procs:
            assert p.proc.poll() is None, "a server process died"
    # Every call ended with OK or UNAVAILABLE, never INTERNAL or anything else, and never hung.
    assert set(codes) <= {("OK", None), ("UNAVAILABLE", "DATABASE_UNAVAILABLE")}, codes
    slowest = max(o.seconds for o in outcomes)
    assert slowest < CALL_TIMEOUT, slowest
    for p in procs:
        assert "Traceback" not in p.logs(), p.logs()[-4000:]
    print(f"\nPostgreSQL restart under load: {figures}; slowest call {slowest * 1000:.0f} ms")


async def _restart_under_load(own_postgres: OwnPostgres, url: str, procs: list[ServerProcess]):
    """Unary load on both replicas, work in flight, PostgreSQL stopped and started again; checked
    along the way. Returns the calls' (code, reason) counts, every call, and figures to print."""
    channels = [grpc.aio.insecure_channel(p.target) for p in procs]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    workers: list[asyncio.Task] = []
    try:
        stubs = [Stubs(ch) for ch in channels]
        users = [await sign_up(stubs[i % 2].auth) for i in range(4)]
        for s in stubs:
            assert await _health(s) == SERVING

        workers = [asyncio.create_task(_unary_load(stubs, users, stop, outcomes, w)) for w in range(6)]
        await eventually(
            lambda: sum(o.code == grpc.StatusCode.OK for o in outcomes) >= 30,
            timeout=30,
            what="calls succeed before the restart",
        )

        # Work that finishes while the database is down: a reply, a search and an image.
        inflight = await InFlight.start(stubs, users)

        # Down.
        t_down = loop.time()
        await asyncio.to_thread(own_postgres.stop)
        stopped_in = loop.time() - t_down
        for s in stubs:
            await eventually(
                lambda s=s: _is(_health(s), NOT_SERVING), timeout=15, what="health NOT_SERVING while down"
            )
        not_serving_after = loop.time() - t_down
        await eventually(
            lambda: sum(o.code == grpc.StatusCode.UNAVAILABLE and o.at > t_down for o in outcomes) >= 20,
            timeout=15,
            what="calls fail with UNAVAILABLE while down",
        )
        await asyncio.sleep(1.0)  # a while down under load (several health rounds, pool retries)

        # Back.
        t_up = loop.time()
        await asyncio.to_thread(own_postgres.start)
        started_in = loop.time() - t_up
        for s in stubs:
            await eventually(lambda s=s: _is(_health(s), SERVING), timeout=20, what="health SERVING again")
        serving_after = loop.time() - t_up
        await eventually(
            lambda: sum(o.code == grpc.StatusCode.OK and o.at > t_up + serving_after for o in outcomes) >= 30,
            timeout=20,
            what="calls succeed again",
        )
        stop.set()
        await asyncio.gather(*workers)

        # What finished during the outage reached its client, and is saved once the database is back.
        await inflight.check(url)

        # The LISTEN connections are back too: a reply generated on one replica is watched and
        # cancelled through the other (both go through NOTIFY).
        async with asyncio.timeout(30):
            await _watch_and_cancel_across(stubs[0], stubs[1], users[0])
            await _watch_and_cancel_across(stubs[1], stubs[0], users[1])

        check = await asyncpg.connect(url)
        try:
            listeners = await check.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'everything-listen'"
            )
            stuck = await check.fetchval("SELECT count(*) FROM messages WHERE status = 'generating'")
            await eventually(lambda: no_open_transactions(check), timeout=15, what="no open transaction left")
        finally:
            await check.close()
        assert listeners == 2, listeners
        assert stuck == 0
    finally:
        stop.set()
        for w in workers:
            w.cancel()
        for ch in channels:
            await ch.close()

    # While it was down (once health said so) every call was refused, quickly.
    during = [o for o in outcomes if t_down + not_serving_after < o.at < t_up]
    assert during and all(o.code == grpc.StatusCode.UNAVAILABLE for o in during)
    codes = Counter((o.code.name, o.reason) for o in outcomes)
    figures = (
        f"stopped in {stopped_in:.1f}s, NOT_SERVING after {not_serving_after:.1f}s; started in "
        f"{started_in:.1f}s, SERVING after {serving_after:.1f}s; calls {dict(codes)}; slowest call while "
        f"down {max(o.seconds for o in during) * 1000:.0f} ms"
    )
    return codes, outcomes, figures


async def _is(aw, expected) -> bool:
    return (await aw) == expected


async def _watch_and_cancel_across(here: Stubs, there: Stubs, user) -> None:
    call = here.chat.SendMessage(
        chat_pb.SendMessageRequest(content=f"{marker()} [mock:tokens=300 rate=30]"),
        metadata=user.md,
        timeout=30,
    )
    got = Collected()
    await read_until(call, lambda ev: ev.WhichOneof("event") == "text_delta", got)
    watch = there.chat.WatchMessage(
        chat_pb.WatchMessageRequest(message_id=got.reply_id, after_seq=0), metadata=user.md, timeout=30
    )
    watched = Collected()
    # Live events reach the other replica through NOTIFY.
    await read_until(
        watch, lambda ev: ev.WhichOneof("event") == "text_delta" and ev.seq > got.seqs[-1], watched
    )
    loop = asyncio.get_running_loop()
    asked = loop.time()
    resp = await there.chat.CancelGeneration(
        chat_pb.CancelGenerationRequest(message_id=got.reply_id), metadata=user.md, timeout=20
    )
    # Quick: the cancel reached `here` by NOTIFY, and its outcome came back to `there` by NOTIFY (a
    # watcher without LISTEN would only notice on its idle re-read, IDLE_RECHECK_SECONDS later).
    assert loop.time() - asked < IDLE_RECHECK_SECONDS - 1
    assert resp.message.status == CANCELLED
    await collect(call, got)
    await collect(watch, watched)
    assert got.final.status == CANCELLED == watched.final.status
    assert watched.text == got.text == resp.message.content
