"""Limits and quotas hold across replicas (two server processes, one database), and the per-process
caps refuse at once instead of queueing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest

from everything.auth.v1 import auth_service_pb2 as pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything_server import errors
from everything_server.db import Database
from everything_server.limits import Limits
from everything_server.rpc.admission import StreamAdmission
from everything_server.rpc.context import Principal
from everything_server.rpc.interceptor import Caps, ServerInterceptor
from tests.support import PASSWORD, expect_error, server_env, sign_up, start_server_process

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
async def two_replicas(settings_env, tmp_path, request):
    extra = getattr(request, "param", {})
    env = server_env(settings_env, **extra)
    started = await asyncio.gather(
        start_server_process(env, tmp_path / "a.log"),
        start_server_process(env, tmp_path / "b.log"),
        return_exceptions=True,
    )
    procs = [p for p in started if not isinstance(p, BaseException)]
    try:
        for p in started:
            if isinstance(p, BaseException):
                raise p  # the other one is stopped below all the same
        channels = [grpc.aio.insecure_channel(p.target) for p in procs]
        yield [auth_service_pb2_grpc.AuthServiceStub(ch) for ch in channels]
        for ch in channels:
            await ch.close()
    finally:
        for p in procs:
            p.terminate()


async def _fresh_window(seconds_needed: float = 15) -> None:
    """Fixed one-minute windows: start early in a window so it cannot roll over mid-test."""
    into = time.time() % 60
    if into > 60 - seconds_needed:
        await asyncio.sleep(60 - into + 0.2)


@pytest.mark.parametrize("two_replicas", [{"EVERYTHING_RATE_LIMIT_PER_MINUTE": "6"}], indirect=True)
async def test_the_per_user_rate_limit_holds_across_two_replicas(two_replicas):
    a, b = two_replicas
    user = await sign_up(a)
    await _fresh_window()
    outcomes = []
    for i in range(10):
        stub = (a, b)[i % 2]
        try:
            await stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)
            outcomes.append("ok")
        except grpc.aio.AioRpcError as err:
            assert err.code() == EXHAUSTED
            outcomes.append("limited")
    assert outcomes == ["ok"] * 6 + ["limited"] * 4
    d = await expect_error(
        b.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md), EXHAUSTED, "RATE_LIMITED"
    )
    assert d.retry_after is not None and 0 < d.retry_after <= 60
    assert d.quota == [f"user:{user.id}"]
    # Another user has a budget of their own.
    other = await sign_up(b)
    await a.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=other.md)


@pytest.mark.parametrize(
    "two_replicas",
    [{"EVERYTHING_SIGN_IN_ACCOUNT_THRESHOLD": "3", "EVERYTHING_SIGN_IN_BACKOFF_BASE_SECONDS": "30"}],
    indirect=True,
)
async def test_failed_sign_ins_back_off_across_replicas(two_replicas):
    a, b = two_replicas
    user = await sign_up(a)
    for i in range(3):
        await expect_error(
            (a, b)[i % 2].SignIn(pb.SignInRequest(email=user.email, password="wrong password 123")),
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
        )
    # Even the right password waits now, on either replica.
    for stub in (a, b):
        d = await expect_error(
            stub.SignIn(pb.SignInRequest(email=user.email, password=PASSWORD)), EXHAUSTED, "SIGN_IN_THROTTLED"
        )
        assert 20 < d.retry_after <= 30
    # Other accounts from the same address are not locked out.
    other = await sign_up(b)
    await a.SignIn(pb.SignInRequest(email=other.email, password=PASSWORD))


@pytest.mark.parametrize(
    "two_replicas",
    [{"EVERYTHING_SIGN_UP_PER_ADDRESS_PER_HOUR": "2", "EVERYTHING_TRUSTED_PROXIES": "127.0.0.1/32"}],
    indirect=True,
)
async def test_sign_ups_per_address_are_limited_across_replicas(two_replicas):
    a, b = two_replicas
    # The replicas trust 127.0.0.1 as a proxy, so the forwarded address is the client's.
    address = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    md = (("x-forwarded-for", f"198.51.100.7, {address}"),)

    def request():
        return pb.SignUpRequest(email=f"x-{uuid.uuid4().hex}@example.com", password=PASSWORD)

    await a.SignUp(request(), metadata=md)
    await b.SignUp(request(), metadata=md)
    d = await expect_error(a.SignUp(request(), metadata=md), EXHAUSTED, "RATE_LIMITED")
    assert d.retry_after > 0 and d.quota == [f"address:{address}"]
    # Only the last hop (what the trusted proxy saw) counts: another client is unaffected.
    await b.SignUp(request(), metadata=(("x-forwarded-for", f"{address}, 192.0.2.1"),))


async def test_quota_reservations_are_atomic_across_connection_pools(database_url, user):
    """Two engines stand for two replicas: 20 concurrent reservations against a quota of 5."""
    dbs = [Database(database_url, pool_size=5), Database(database_url, pool_size=5)]
    uid = uuid.UUID(user.id)

    async def reserve(i: int) -> bool:
        db = dbs[i % 2]
        limits = Limits(db)
        try:
            async with db.transaction(uid) as session:
                await limits.reserve(session, uid, "images", 1, limit=5)
            return True
        except errors.ResourceExhausted as exc:
            assert exc.reason == "QUOTA_EXCEEDED" and exc.retry_after > 0
            return False

    try:
        results = await asyncio.gather(*[reserve(i) for i in range(20)])
    finally:
        for db in dbs:
            await db.dispose()
    assert sum(results) == 5


# -- per-process caps, on a real gRPC server with the real interceptor -----------------------------


def _verify(token: str) -> Principal:
    return Principal(user_id=uuid.UUID(int=int(token)), session_id=uuid.UUID(int=0))


async def _sleep_unary(request: bytes, context) -> bytes:
    await asyncio.sleep(float(request.decode() or "0"))
    return b"done"


async def _slow_stream(request: bytes, context):
    for _ in range(50):
        yield b"tick"
        await asyncio.sleep(0.1)


@pytest.fixture
async def capped_server():
    caps = Caps(max_streams_per_user=1, max_streams_per_process=2, unary_timeout_seconds=0.3)
    server = grpc.aio.server(interceptors=[ServerInterceptor(_verify, caps=caps)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Caps",
                {
                    "Sleep": grpc.unary_unary_rpc_method_handler(_sleep_unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(_slow_stream),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


def _md(user: int):
    return (("authorization", f"Bearer {user}"),)


async def test_a_unary_call_past_the_server_deadline_is_cut(capped_server):
    sleep = capped_server.unary_unary("/test.Caps/Sleep")
    assert await sleep(b"0", metadata=_md(1)) == b"done"
    start = time.perf_counter()
    await expect_error(sleep(b"5", metadata=_md(1)), grpc.StatusCode.DEADLINE_EXCEEDED, "REQUEST_TIMEOUT")
    assert time.perf_counter() - start < 3


async def test_stream_caps_refuse_at_once(capped_server):
    stream = capped_server.unary_stream("/test.Caps/Stream")
    first = stream(b"", metadata=_md(1))
    await first.read()
    # The same user's second stream is refused, quickly.
    start = time.perf_counter()
    second = stream(b"", metadata=_md(1))
    await expect_error(second.read(), EXHAUSTED, "TOO_MANY_STREAMS")
    # Another user gets the process's last slot; a third user finds the process full.
    other = stream(b"", metadata=_md(2))
    await other.read()
    third = stream(b"", metadata=_md(3))
    await expect_error(third.read(), EXHAUSTED, "SERVER_OVERLOADED")
    assert time.perf_counter() - start < 2
    first.cancel()
    other.cancel()
    # Slots come back when streams end.
    await asyncio.sleep(0.2)
    again = stream(b"", metadata=_md(3))
    assert await again.read() == b"tick"
    again.cancel()


# -- admission control: a full or late process refuses new streams at once --------------------------


class _SlowLimits:
    """Stands for the rate-limit round trip of a loaded database: slow, and counted."""

    def __init__(self, delay: float):
        self.delay = delay
        self.calls = 0

    async def hit(self, *args, **kwargs) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)


def _generic(interceptor: ServerInterceptor) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Caps",
                {
                    "Sleep": grpc.unary_unary_rpc_method_handler(_sleep_unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(_slow_stream),
                },
            )
        ]
    )
    return server


async def _serve(server: grpc.aio.Server):
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_a_full_process_refuses_before_the_token_check_and_the_rate_limit_round_trip():
    limits = _SlowLimits(delay=2.0)
    caps = Caps(max_streams_per_user=10, max_streams_per_process=1, rate_limit_per_minute=10**6)
    server = _generic(ServerInterceptor(_verify, caps=caps, limits=limits))
    ch = await _serve(server)
    try:
        stream = ch.unary_stream("/test.Caps/Stream")
        first = stream(b"", metadata=_md(1))
        assert await first.read() == b"tick"
        assert limits.calls == 1
        start = time.perf_counter()
        d = await expect_error(stream(b"", metadata=_md(2)).read(), EXHAUSTED, "SERVER_OVERLOADED")
        elapsed = time.perf_counter() - start
        # RetryInfo: come back in 1-2 s (spread, so refused clients do not return together).
        assert d.retry_after is not None and 1.0 <= d.retry_after <= 2.0
        assert d.metadata.get("request_id")
        # Refused without waiting for the (slow) rate-limit round trip: it was never made.
        assert limits.calls == 1
        assert elapsed < 1.5
        # Even a caller without a token is told the server is full, not asked to authenticate first.
        await expect_error(stream(b"").read(), EXHAUSTED, "SERVER_OVERLOADED")
        # Unary calls are not refused by the stream cap.
        assert await ch.unary_unary("/test.Caps/Sleep")(b"0", metadata=_md(3)) == b"done"
        first.cancel()
    finally:
        await ch.close()
        await server.stop(0)


async def _late_stream(request: bytes, context):
    await asyncio.sleep(float(request.decode() or "0"))  # setup: database, upstream...
    for _ in range(50):
        yield b"tick"
        await asyncio.sleep(0.1)


async def test_past_the_starting_streams_cap_a_new_stream_is_refused_until_one_has_started():
    caps = Caps(max_streams_per_user=10, max_streams_per_process=100)
    admission = StreamAdmission(100, max_starting=1, target_load=0)
    server = grpc.aio.server(interceptors=[ServerInterceptor(_verify, caps=caps, admission=admission)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Caps", {"Late": grpc.unary_stream_rpc_method_handler(_late_stream)}
            )
        ]
    )
    ch = await _serve(server)
    try:
        late = ch.unary_stream("/test.Caps/Late")
        first = late(b"1.0", metadata=_md(1))  # a second before its first message
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        d = await expect_error(late(b"0", metadata=_md(2)).read(), EXHAUSTED, "SERVER_OVERLOADED")
        assert time.perf_counter() - start < 0.9 and d.retry_after is not None
        assert await first.read() == b"tick"
        # Started, it no longer holds the starting slot.
        second = late(b"0", metadata=_md(2))
        assert await second.read() == b"tick"
        assert admission.streams == 2 and admission.starting == 0
        first.cancel()
        second.cancel()
        # A stream cancelled before its first message gives its starting slot back too.
        third = late(b"5", metadata=_md(3))
        await asyncio.sleep(0.2)
        assert admission.starting == 1
        third.cancel()
        for _ in range(50):
            if admission.streams == 0:
                break
            await asyncio.sleep(0.02)
        assert admission.streams == 0 and admission.starting == 0
    finally:
        await ch.close()
        await server.stop(0)


async def test_a_standing_queue_for_database_connections_refuses_new_streams_not_unary_calls():
    wait = [0.0]
    caps = Caps(max_streams_per_user=10, max_streams_per_process=100, max_db_wait_seconds=0.25)
    server = _generic(ServerInterceptor(_verify, caps=caps, db_wait=lambda: wait[0]))
    ch = await _serve(server)
    try:
        stream = ch.unary_stream("/test.Caps/Stream")
        first = stream(b"", metadata=_md(1))
        assert await first.read() == b"tick"
        wait[0] = 0.4  # the oldest caller has waited 0.4 s for a connection
        d = await expect_error(stream(b"", metadata=_md(2)).read(), EXHAUSTED, "SERVER_OVERLOADED")
        assert d.retry_after is not None
        assert await ch.unary_unary("/test.Caps/Sleep")(b"0", metadata=_md(3)) == b"done"
        wait[0] = 0.1  # the queue is gone
        again = stream(b"", metadata=_md(2))
        assert await again.read() == b"tick"
        first.cancel()
        again.cancel()
    finally:
        await ch.close()
        await server.stop(0)


class _LoopHog:
    """Blocks the running event loop for `block` seconds every `every` seconds (a CPU-bound
    overload, as many busy streams would cause)."""

    def __init__(self, block: float, every: float):
        self.block, self.every = block, every
        self._handle: asyncio.TimerHandle | None = None

    def _tick(self) -> None:
        time.sleep(self.block)
        self._handle = asyncio.get_running_loop().call_later(self.every, self._tick)

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.every, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_late_event_loop_refuses_new_streams_while_unary_calls_go_on():
    from everything_server.metrics import Metrics
    from everything_server.rpc.admission import LoopLagMonitor

    metrics = Metrics()
    monitor = LoopLagMonitor(interval=0.02, metrics=metrics)
    caps = Caps(max_streams_per_user=10, max_streams_per_process=100, max_loop_lag_seconds=0.05)
    server = _generic(ServerInterceptor(_verify, caps=caps, metrics=metrics, loop_lag=monitor))
    ch = await _serve(server)
    monitor.start()
    hog = _LoopHog(block=0.15, every=0.02)
    try:
        stream = ch.unary_stream("/test.Caps/Stream")
        sleep = ch.unary_unary("/test.Caps/Sleep")
        # An idle loop admits streams.
        await _until(lambda: monitor.lag < 0.01, 5, "an idle loop")
        ok = stream(b"", metadata=_md(1))
        assert await ok.read() == b"tick"
        ok.cancel()

        hog.start()
        await _until(lambda: monitor.lag > 0.05, 10, "the lag to pass the threshold")
        d = await expect_error(stream(b"", metadata=_md(2)).read(), EXHAUSTED, "SERVER_OVERLOADED")
        assert d.retry_after is not None and 1.0 <= d.retry_after <= 2.0
        # Unary calls still get served (slowly: the loop is busy), and streams already open go on.
        assert await sleep(b"0", metadata=_md(3)) == b"done"
        assert metrics.overload_refusals.labels("loop_lag")._value.get() == 1
        assert metrics.loop_lag._value.get() > 0.05

        hog.stop()
        await _until(lambda: monitor.lag < 0.05, 10, "the lag to fall back")
        again = stream(b"", metadata=_md(2))
        assert await again.read() == b"tick"
        again.cancel()
    finally:
        hog.stop()
        await monitor.stop()
        await ch.close()
        await server.stop(0)


def test_the_backlog_is_read_every_few_load_samples_not_at_each():
    """channelz is dear to read (grpc core's locks, the GIL held): the gauges get it twice a second."""
    from everything_server.rpc.admission import BACKLOG_EVERY_SAMPLES, CallBacklog, LoopLagMonitor

    counts = _Counts()
    reads = []
    backlog = CallBacklog(started=lambda: reads.append(1) or counts.started, seen=lambda: counts.seen)
    m = LoopLagMonitor(backlog=backlog)
    counts.started = 4
    for _ in range(BACKLOG_EVERY_SAMPLES - 1):
        m.observe_load(0.9)
    assert reads == [] and backlog.backlog == 0
    m.observe_load(0.9)
    assert len(reads) == 1 and backlog.backlog == 4
    for _ in range(2 * BACKLOG_EVERY_SAMPLES):
        m.observe_load(0.9)
    assert len(reads) == 3
    assert BACKLOG_EVERY_SAMPLES > 1


def test_the_loop_lag_is_smoothed_so_one_pause_does_not_refuse_for_long():
    from everything_server.rpc.admission import LoopLagMonitor

    m = LoopLagMonitor(smoothing=0.2)
    m.observe(1.5)  # one long pause (a blocking call, a slow garbage collection) counts as 250 ms
    assert m.lag == pytest.approx(0.05)
    m.observe(0.0)
    assert m.lag < 0.05
    # A loop that is late on every wake-up crosses the threshold within a few samples.
    for _ in range(3):
        m.observe(0.2)
    assert m.lag > 0.05
    for _ in range(10):
        m.observe(0.2)
    assert m.lag > 0.18
    m.observe(-0.001)  # a timer that fired early counts as on time
    assert m.last == 0.0 and m.peak == 1.5


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_adaptive_stream_limit_follows_the_loop_load():
    from everything_server.rpc.admission import StreamAdmission

    clock = _Clock()
    a = StreamAdmission(100, target_load=0.8, floor=4, clock=clock)
    for _ in range(50):
        assert a.take() is None
    assert a.limit == 100
    # An overloaded loop: the limit comes down to 90% of the streams open now...
    a.adjust(0.95)
    assert a.limit == 45
    assert a.take() == "load" and a.streams == 50
    # ... at most every quarter second, and not again while streams are still above it.
    clock.now += 0.1
    a.adjust(0.95)
    assert a.limit == 45
    clock.now += 0.3
    a.adjust(0.95)
    assert a.limit == 45
    for _ in range(10):
        a.release()
    a.adjust(0.95)
    assert a.limit == 36
    # Within the band it stays.
    clock.now += 1
    a.adjust(0.8)
    assert a.limit == 36
    # Below it, while the limit is what keeps streams out, it goes up again, faster the more room
    # the loop has.
    while a.take() is None:
        pass
    before = a.limit
    clock.now += 0.05
    a.adjust(0.7)
    small = a.limit - before
    clock.now += 0.05
    a.adjust(0.1)
    assert 1 <= small < a.limit - before - small
    # Not while it keeps no one out: a limit far above the streams open is not raised further.
    for _ in range(a.streams - 10):
        a.release()
    held = a.limit
    clock.now += 0.05
    a.adjust(0.1)
    assert a.limit == held
    # Never below the floor, never above the configured cap (whose refusals say `streams`).
    while a.streams > 2:
        a.release()
    for _ in range(20):
        clock.now += 1
        a.adjust(0.99)
    assert a.limit == 4
    for _ in range(400):
        clock.now += 0.05
        while a.take() is None:
            pass
        a.adjust(0.0)
    assert a.limit == 100 and a.take() == "streams"


def test_streams_that_have_not_sent_their_first_message_are_limited():
    from everything_server.rpc.admission import StreamAdmission

    a = StreamAdmission(10, max_starting=2, target_load=0, clock=_Clock())
    assert a.take() is None and a.take() is None
    # Two streams are still starting (waiting for the database, say): a third is refused at once.
    assert a.take() == "starting" and a.streams == 2 and a.starting == 2
    a.started()  # the first sent its first message: room for one more starting stream
    assert a.take() is None and a.take() == "starting"
    a.release(started=False)  # one ended before its first message
    assert a.starting == 1 and a.streams == 2
    assert a.take() is None
    a.started()
    a.started()
    # Started streams count only against the cap on open streams.
    for _ in range(7):
        assert a.take() is None
        a.started()
    assert a.streams == 10 and a.starting == 0 and a.take() == "streams"
    a.release()
    assert a.take() is None


def test_without_a_target_the_limit_is_the_configured_cap():
    from everything_server.rpc.admission import StreamAdmission

    a = StreamAdmission(3, target_load=0, clock=_Clock())
    for _ in range(3):
        assert a.take() is None
    a.adjust(0.99)
    assert a.limit == 3 and a.take() == "streams"


def test_the_retry_delay_grows_with_the_rate_of_refusals():
    from everything_server.rpc import admission as adm

    clock = _Clock()
    a = adm.StreamAdmission(1, target_load=0, clock=clock)
    assert a.take() is None
    a.adjust(0.5)
    # Rare refusals: come back in 1-2 s.
    delays = [a.retry_after() for _ in range(200)]
    assert 1.0 <= min(delays) and max(delays) <= 2.0 and max(delays) - min(delays) > 0.5
    # Many: a longer delay, so that clients honouring it come back at a rate the process answers
    # without effort; capped.
    for _ in range(40):
        for _ in range(20):  # 20 refusals in 50 ms: 400 a second
            assert a.take() == "streams"
        clock.now += 0.05
        a.adjust(0.5)
    assert a.refusal_rate > 300
    delays = [a.retry_after() for _ in range(200)]
    assert min(delays) >= adm.RETRY_AFTER_MAX_SECONDS
    assert max(delays) <= 2 * adm.RETRY_AFTER_MAX_SECONDS
    # And back once refusals stop.
    for _ in range(60):
        clock.now += 0.05
        a.adjust(0.5)
    assert a.refusal_rate < 1 and max(a.retry_after() for _ in range(50)) <= 2.0


def test_the_servers_event_loop_reports_its_load_from_its_selector():
    """The entry point's loop (`new_event_loop`): the load counts time spent running callbacks or
    waiting for a CPU, whatever the thread's CPU time says."""
    from everything_server.metrics import Metrics
    from everything_server.rpc.admission import LoopLagMonitor, new_event_loop

    async def main() -> tuple[float, float, float]:
        metrics = Metrics()
        monitor = LoopLagMonitor(interval=0.02, metrics=metrics)
        monitor.start()
        try:
            await asyncio.sleep(0.5)
            idle = monitor.load
            # Callbacks that block without using the CPU: busy for the loop, idle for the thread.
            hog = _LoopHog(block=0.04, every=0.001)
            hog.start()
            try:
                await _until(lambda: monitor.load > 0.7, 10, "the load to rise")
            finally:
                hog.stop()
            return idle, monitor.load, monitor.busy
        finally:
            await monitor.stop()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        idle, loaded, busy = runner.run(main())
    assert idle < 0.3
    assert loaded > 0.7
    assert busy < 0.5  # time.sleep is not CPU time: only the selector saw the loop was busy


async def test_a_process_past_its_adaptive_limit_refuses_with_the_cause_load():
    from everything_server.metrics import Metrics
    from everything_server.rpc.admission import StreamAdmission

    metrics = Metrics()
    admission = StreamAdmission(10, target_load=0.8, floor=1, metrics=metrics)
    caps = Caps(max_streams_per_user=10, max_streams_per_process=10)
    server = _generic(ServerInterceptor(_verify, caps=caps, metrics=metrics, admission=admission))
    ch = await _serve(server)
    try:
        stream = ch.unary_stream("/test.Caps/Stream")
        first = stream(b"", metadata=_md(1))
        assert await first.read() == b"tick"
        admission.adjust(0.99)  # the loop is overloaded: the limit comes down to the one stream
        assert admission.limit == 1 and metrics.stream_limit._value.get() == 1
        d = await expect_error(stream(b"", metadata=_md(2)).read(), EXHAUSTED, "SERVER_OVERLOADED")
        assert d.retry_after is not None and d.retry_after >= 1
        assert metrics.overload_refusals.labels("load")._value.get() == 1
        # Unary calls are not refused by it.
        assert await ch.unary_unary("/test.Caps/Sleep")(b"0", metadata=_md(3)) == b"done"
        first.cancel()
        await _until(lambda: admission.streams == 0, 5, "the stream's slot to come back")
    finally:
        await ch.close()
        await server.stop(0)


async def test_the_server_refuses_streams_past_its_cap_and_says_so_in_metrics(settings_env):
    """The real app: settings → caps, the loop lag gauge, refusals counted by cause."""
    from everything.chat.v1 import chat_service_pb2 as chat_pb
    from everything.chat.v1 import chat_service_pb2_grpc
    from everything_server.app import App
    from tests.conftest import make_settings
    from tests.test_metrics import scrape

    env = {**settings_env, "EVERYTHING_MAX_STREAMS_PER_PROCESS": "1", "EVERYTHING_MAX_LOOP_LAG_MS": "250"}
    server = App(make_settings(env, metrics_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            auth = auth_service_pb2_grpc.AuthServiceStub(ch)
            chat = chat_service_pb2_grpc.ChatServiceStub(ch)
            user = await sign_up(auth)
            first = chat.SendMessage(
                chat_pb.SendMessageRequest(content="admission [mock:tokens=30 rate=20]"), metadata=user.md
            )
            await first.read()
            start = time.perf_counter()
            second = chat.SendMessage(chat_pb.SendMessageRequest(content="admission"), metadata=user.md)
            d = await expect_error(second.read(), EXHAUSTED, "SERVER_OVERLOADED")
            assert time.perf_counter() - start < 2
            assert d.retry_after is not None and d.retry_after >= 1
            await auth.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)
            while await first.read() is not grpc.aio.EOF:  # the admitted stream runs to its end
                pass
            m = await asyncio.to_thread(scrape, server.metrics_port)
            assert m[("everything_overload_refusals_total", (("cause", "streams"),))] == 1
            assert m[("everything_limit_refusals_total", (("reason", "SERVER_OVERLOADED"),))] == 1
            assert 0 <= m[("everything_event_loop_lag_seconds", ())] < 0.25
            assert 0 <= m[("everything_event_loop_load_ratio", ())] <= 1
            # No target load configured: the limit is the configured cap.
            assert m[("everything_stream_limit", ())] == 1
            # Nothing waits in grpc core on an idle server.
            assert m[("everything_call_backlog", ())] == 0
            assert m[("everything_call_wait_seconds", ())] == 0
            # With the stream finished, its slot is free again.
            third = chat.SendMessage(
                chat_pb.SendMessageRequest(content="admission [mock:tokens=2]"), metadata=user.md
            )
            async for _ in third:
                pass
    finally:
        await server.stop(grace=1)


class _Counts:
    """What channelz and the interceptors would say, by hand, on a clock of our own."""

    def __init__(self):
        self.started = self.seen = 0
        self.now = 0.0


def _backlog(counts: _Counts):
    from everything_server.rpc.admission import CallBacklog

    return CallBacklog(started=lambda: counts.started, seen=lambda: counts.seen, clock=lambda: counts.now)


def test_the_backlog_counts_calls_grpc_core_holds_and_how_long_the_oldest_waited():
    counts = _Counts()
    b = _backlog(counts)
    assert b.sample(0.9) == 0 and b.wait == 0
    counts.started, counts.now = 10, 0.05  # ten calls came in since the last sample
    assert b.sample(0.9) == 10
    counts.now = 0.1
    counts.started = 15
    b.sample(0.9)
    counts.now = 0.5  # nothing taken: the oldest has waited since the sample that first showed it
    b.sample(0.9)
    assert b.backlog == 15 and b.wait == pytest.approx(0.45)
    counts.seen, counts.now = 12, 0.6  # twelve taken: the oldest left came in by the second sample
    b.sample(0.9)
    assert b.backlog == 3 and b.wait == pytest.approx(0.5)
    counts.seen, counts.now = 15, 0.65  # all taken
    assert b.sample(0.9) == 0 and b.wait == 0


def test_calls_cancelled_while_waiting_are_forgotten_once_the_loop_is_quiet():
    from everything_server.rpc.admission import QUIET_SAMPLES

    counts = _Counts()
    b = _backlog(counts)
    counts.started, counts.seen = 20, 17  # three calls gave up while waiting: never taken
    for i in range(QUIET_SAMPLES - 1):  # busy: they may still be waiting
        counts.now = 0.05 * (i + 1)
        assert b.sample(0.95) == 3
    for _ in range(QUIET_SAMPLES):  # quiet for a quarter second: nothing can be waiting
        counts.now += 0.05
        b.sample(0.3)
    assert b.baseline == 3 and b.backlog == 0 and b.wait == 0
    counts.started, counts.now = 25, counts.now + 0.05  # new calls still count
    assert b.sample(0.95) == 5
    counts.seen, counts.now = 25, counts.now + 0.05  # fewer waiting than the baseline: it follows
    assert b.sample(0.95) == 0 and b.baseline == 0


def test_the_backlog_of_a_real_server_whose_loop_is_blocked():
    """grpc core takes calls while the event loop is blocked; the interceptor sees them later."""
    from grpc._cython import cygrpc

    from everything_server.rpc.admission import QUIET_SAMPLES, CallBacklog, core_calls_started

    def server_ids() -> set[int]:
        return {
            int(x["ref"]["serverId"]) for x in json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
        }

    async def main() -> tuple[int, float, int]:
        before = server_ids()
        server = _generic(ServerInterceptor(_verify, caps=Caps()))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        # This server's calls only: servers of other tests in this process (on their own, idle
        # loops) may be called meanwhile (gateway health checks) and would count as waiting.
        (ours,) = server_ids() - before

        def started() -> int:
            return int(json.loads(cygrpc.channelz_get_server(ours))["server"]["data"].get("callsStarted", 0))

        b = CallBacklog(started=started)
        try:
            # Calls seen by interceptors of earlier tests are learnt while the loop is quiet.
            for _ in range(QUIET_SAMPLES):
                b.sample(0.3)
            assert core_calls_started() is not None and b.backlog == 0

            def call(n: int) -> None:  # a client of its own (grpc's sync stack, another thread)
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    sleep = ch.unary_unary("/test.Caps/Sleep")
                    for i in range(n):
                        assert sleep(b"0", metadata=_md(i), timeout=10) == b"done"

            client = asyncio.get_running_loop().run_in_executor(None, call, 1)
            # The loop is blocked for a second: the call waits in grpc core, sampled as it waits.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                time.sleep(0.05)
                b.sample(0.99)
            waiting, wait = b.backlog, b.wait
            await asyncio.wait_for(client, 10)
            await _until(lambda: b.sample(0.99) == 0, 5, "the call to be taken")
            return waiting, wait, b.backlog
        finally:
            await server.stop(0)

    waiting, wait, after = asyncio.run(main())
    assert waiting == 1
    assert 0.5 < wait <= 1.0
    assert after == 0
