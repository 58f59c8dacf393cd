"""The server as a process and as a service: health, reflection with grpcurl, config errors, and a
graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from everything.chat.v1 import chat_service_pb2 as chat_pb
from tests.support import BIN, expect_error, server_env, start_server_process

SERVICES = [
    "everything.auth.v1.AuthService",
    "everything.chat.v1.ChatService",
    "everything.search.v1.SearchService",
    "everything.image.v1.ImageService",
    "everything.preferences.v1.PreferencesService",
]


async def test_health_is_serving_once_migrated(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", *SERVICES]:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_calls_without_a_token_are_refused_before_the_handler(chat_stub):
    await expect_error(
        chat_stub.ListThreads(chat_pb.ListThreadsRequest()), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"
    )


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
async def server_process(settings_env, tmp_path):
    proc = await start_server_process(server_env(settings_env), tmp_path / "server.log")
    yield proc
    proc.terminate()


async def test_grpcurl_lists_and_describes_through_reflection(server_process):
    target = server_process.target
    listed = run([str(BIN / "grpcurl"), "-plaintext", target, "list"])
    assert listed.returncode == 0, listed.stderr
    for service in SERVICES:
        assert service in listed.stdout
    described = run(
        [str(BIN / "grpcurl"), "-plaintext", target, "describe", "everything.chat.v1.ChatService"]
    )
    assert "rpc SendMessage" in described.stdout and "stream" in described.stdout
    # A real call with no proto files: sign up, then GetCurrentUser with the token.
    email = "grpcurl-" + target.replace(":", "-").replace(".", "-") + "@example.com"
    body = json.dumps({"email": email, "password": "correct horse battery staple"})
    signed = run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", body, target, "everything.auth.v1.AuthService/SignUp"]
    )
    assert signed.returncode == 0, signed.stderr
    token = json.loads(signed.stdout)["tokens"]["access_token"]
    me = run(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            "-H",
            f"authorization: Bearer {token}",
            target,
            "everything.auth.v1.AuthService/GetCurrentUser",
        ]
    )
    assert json.loads(me.stdout)["user"]["email"] == email
    # Errors come with their details for grpcurl too.
    bad = run(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            "-d",
            '{"email": "x"}',
            target,
            "everything.auth.v1.AuthService/SignUp",
        ]
    )
    assert "InvalidArgument" in bad.stderr and "google.rpc.BadRequest" in bad.stderr


async def test_sigterm_drains_and_exits_zero(server_process):
    async with grpc.aio.insecure_channel(server_process.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert (
            await stub.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING
    server_process.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server_process.proc.wait, 30)
    assert code == 0
    logs = server_process.logs()
    assert '"message":"draining"' in logs and '"message":"stopped"' in logs


async def test_a_draining_server_refuses_new_calls_itself_until_they_stop_coming(settings_env, tmp_path):
    """SIGTERM makes the process a lame duck: the port stays open and its own interceptor refuses
    every new call (UNAVAILABLE, SHUTTING_DOWN, RetryInfo), on a connection made before and on one
    made after; once calls stop coming it stops at once, well before the lame duck's limit."""
    from everything.auth.v1 import auth_service_pb2 as auth_pb
    from everything.auth.v1 import auth_service_pb2_grpc
    from tests.support import details, sign_up

    lame = 10.0
    env = server_env(
        settings_env, EVERYTHING_SHUTDOWN_LAME_DUCK_SECONDS=str(lame), EVERYTHING_SHUTDOWN_GRACE_SECONDS="15"
    )
    proc = await start_server_process(env, tmp_path / "server.log")
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(proc.target) as ch:
            auth = auth_service_pb2_grpc.AuthServiceStub(ch)
            user = await sign_up(auth)
            md = (("authorization", f"Bearer {user.access_token}"),)

            async def me(stub) -> tuple[grpc.StatusCode, str | None, float | None]:
                try:
                    await stub.GetCurrentUser(auth_pb.GetCurrentUserRequest(), metadata=md, timeout=2)
                except grpc.aio.AioRpcError as err:
                    d = details(err)
                    return err.code(), d.reason, d.retry_after
                return grpc.StatusCode.OK, None, None

            assert (await me(auth))[0] == grpc.StatusCode.OK
            proc.proc.send_signal(signal.SIGTERM)
            refusal = (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 1.0)
            outcomes = []
            async with asyncio.timeout(5):  # one call racing the signal may still be served
                while (got := await me(auth))[0] == grpc.StatusCode.OK:
                    await asyncio.sleep(0.01)
            outcomes.append(got)
            for _ in range(20):  # 0.4 s of calls: every one refused by the server's own code
                await asyncio.sleep(0.02)
                outcomes.append(await me(auth))
            async with grpc.aio.insecure_channel(proc.target) as fresh:  # the port is still open
                outcomes.append(await me(auth_service_pb2_grpc.AuthServiceStub(fresh)))
            assert set(outcomes) == {refusal}, outcomes
            assert proc.proc.poll() is None, "still a lame duck while calls keep coming"
        calls_stopped = loop.time()
        code = await asyncio.to_thread(proc.proc.wait, 30)
        stopped_after = loop.time() - calls_stopped
    finally:
        proc.terminate()
    assert code == 0
    assert stopped_after < lame / 2, f"the lame duck outlived the calls by {stopped_after:.1f}s"


def test_invalid_configuration_is_a_clear_error(settings_env):
    env = server_env(settings_env, EVERYTHING_PORT="not-a-port", EVERYTHING_JWT_KEYS="k1:short")
    result = run([str(BIN / "everything-server")], env=env)
    assert result.returncode != 0
    assert "invalid configuration" in result.stderr
    assert "port" in result.stderr and "jwt_keys" in result.stderr
    assert "k1:short" not in result.stderr  # secrets are never echoed back


def test_production_refuses_development_defaults(settings_env):
    env = server_env(
        {}, EVERYTHING_ENVIRONMENT="production", EVERYTHING_DATA_DIR=settings_env["EVERYTHING_DATA_DIR"]
    )
    for k in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(k, None)
    result = run([str(BIN / "everything-server")], env=env)
    assert result.returncode != 0
    for needed in ("EVERYTHING_JWT_KEYS", "DATABASE_URL", "OPENAI_API_KEY"):
        assert needed in result.stderr


async def test_an_unmigrated_database_means_not_serving_and_unavailable(settings_env, pg_admin_url, tmp_path):
    import asyncpg

    from everything.auth.v1 import auth_service_pb2 as auth_pb
    from everything.auth.v1 import auth_service_pb2_grpc
    from tests.conftest import _with_database

    name = f"everything_empty_{tmp_path.name[-8:].lower().replace('-', '_')}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    proc = None
    try:
        env = server_env(settings_env, DATABASE_URL=_with_database(pg_admin_url, name))
        proc = await start_server_process(env, tmp_path / "server.log")
        async with grpc.aio.insecure_channel(proc.target) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = auth_service_pb2_grpc.AuthServiceStub(ch)
            d = await expect_error(
                stub.SignUp(auth_pb.SignUpRequest(email="a@example.com", password="correct horse battery")),
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
            assert d.retry_after is not None
    finally:
        if proc is not None:
            proc.terminate()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_workers_share_one_port_and_stop_together(settings_env, tmp_path):
    from everything.auth.v1 import auth_service_pb2 as auth_pb
    from everything.auth.v1 import auth_service_pb2_grpc
    from tests.support import sign_up

    proc = await start_server_process(
        server_env(settings_env), tmp_path / "server.log", args=("--workers", "2")
    )
    try:
        pids = json.loads(next(line for line in proc.logs().splitlines() if '"workers started"' in line))[
            "pids"
        ]
        assert len(pids) == 2
        # Wait (bounded) until both workers listen, then spread new connections over them.
        deadline = asyncio.get_running_loop().time() + 60
        while proc.logs().count('"message":"listening"') < 2:
            assert asyncio.get_running_loop().time() < deadline, proc.logs()[-3000:]
            await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(proc.target) as ch:
            user = await sign_up(auth_service_pb2_grpc.AuthServiceStub(ch))
        for _ in range(12):  # a new connection each time: the kernel picks a worker per connection
            async with grpc.aio.insecure_channel(
                proc.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                stub = auth_service_pb2_grpc.AuthServiceStub(ch)
                assert (
                    await stub.GetCurrentUser(auth_pb.GetCurrentUserRequest(), metadata=user.md)
                ).user.id == user.id
        served = {
            json.loads(line)["pid"]
            for line in proc.logs().splitlines()
            if "AuthService/GetCurrentUser" in line and line.startswith("{")
        }
        assert served == set(pids)  # 12 connections, both workers served some (odds against: 1 in 2000)
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.proc.wait, 60) == 0
        assert proc.logs().count('"message":"stopped"') == 2
        for pid in pids:
            assert (
                not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
            )
    finally:
        proc.terminate()


def test_production_refuses_weak_or_missing_secrets(settings_env):
    env = server_env(
        {},
        EVERYTHING_ENVIRONMENT="production",
        EVERYTHING_DATA_DIR=settings_env["EVERYTHING_DATA_DIR"],
        DATABASE_URL="postgresql://everything_app@db.invalid:5432/everything",
        EVERYTHING_JWT_KEYS="k1:" + "s" * 40,
        EVERYTHING_URL_SIGNING_KEY="too-short-signing-key",
        OPENAI_API_KEY="sk-not-real",
    )
    result = run([str(BIN / "everything-server")], env=env)
    assert result.returncode != 0
    assert "DATABASE_URL must carry" in result.stderr
    assert "EVERYTHING_URL_SIGNING_KEY must be at least 32 bytes" in result.stderr
    for secret in ("s" * 40, "too-short-signing-key", "sk-not-real"):
        assert secret not in result.stderr  # secrets are never echoed back
    weak = server_env(env, EVERYTHING_JWT_KEYS="k1:weak")
    assert "shorter than 32 bytes" in run([str(BIN / "everything-server")], env=weak).stderr


async def test_searches_and_images_whose_replica_died_are_failed_by_the_sweep(app, user, db_conn):
    import uuid

    uid = uuid.UUID(user.id)
    stale_search, fresh_search, stale_image = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db_conn.execute(
        "INSERT INTO search_queries (id, user_id, query, status, updated_at) VALUES "
        "($1, $3, 'lost', 'running', now() - interval '2 hours'), ($2, $3, 'live', 'running', now())",
        stale_search,
        fresh_search,
        uid,
    )
    await db_conn.execute(
        "INSERT INTO images (id, user_id, prompt, size, model, status, updated_at) "
        "VALUES ($1, $2, 'lost', '256x256', 'm', 'generating', now() - interval '2 hours')",
        stale_image,
        uid,
    )
    await app.sweep()
    status = {
        r["id"]: (r["status"], r["error_reason"])
        for r in await db_conn.fetch(
            "SELECT id, status, error_reason FROM search_queries WHERE user_id = $1", uid
        )
    }
    assert status[stale_search] == ("failed", "SHUTTING_DOWN")
    assert status[fresh_search] == ("running", "")
    image = await db_conn.fetchrow("SELECT status, error_reason FROM images WHERE id = $1", stale_image)
    assert tuple(image) == ("failed", "SHUTTING_DOWN")
