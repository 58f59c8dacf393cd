"""Prometheus metrics on their own port, scraped after real traffic."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from everything.auth.v1 import auth_service_pb2 as pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything_server.app import App
from tests.conftest import make_settings
from tests.support import expect_error, sign_up


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
async def metered(settings_env):
    env = {**settings_env, "EVERYTHING_RATE_LIMIT_PER_MINUTE": "3"}
    server = App(make_settings(env, metrics_port=0))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield server, auth_service_pb2_grpc.AuthServiceStub(ch)
    await server.stop(grace=1)


async def test_metrics_count_rpcs_latency_refusals_and_pool_use(metered):
    server, stub = metered
    user = await sign_up(stub)
    for _ in range(3):
        await stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)
    await expect_error(
        stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    await expect_error(stub.SignUp(pb.SignUpRequest(email="bad")), grpc.StatusCode.INVALID_ARGUMENT)

    m = await asyncio.to_thread(scrape, server.metrics_port)
    method = "/everything.auth.v1.AuthService/GetCurrentUser"
    assert m[("everything_rpc_total", (("code", "OK"), ("method", method)))] == 3
    assert m[("everything_rpc_total", (("code", "RESOURCE_EXHAUSTED"), ("method", method)))] == 1
    assert (
        m[
            (
                "everything_rpc_total",
                (("code", "INVALID_ARGUMENT"), ("method", "/everything.auth.v1.AuthService/SignUp")),
            )
        ]
        == 1
    )
    assert m[("everything_rpc_duration_seconds_count", (("method", method),))] == 4
    assert m[("everything_limit_refusals_total", (("reason", "RATE_LIMITED"),))] == 1
    assert m[("everything_db_pool_wait_seconds_count", ())] >= 4
    assert m[("everything_db_pool_in_use", ())] == 0  # every connection went back
    assert m[("everything_active_streams", ())] == 0
    # Labels never carry who called or what they sent.
    text = str(m)
    assert user.email not in text and user.id not in text
