"""Limits and quotas hold across replicas (two server processes, one database), and the per-process
caps refuse at once instead of queueing."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from everything.auth.v1 import auth_service_pb2 as pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything_server import errors
from everything_server.db import Database
from everything_server.limits import Limits
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
