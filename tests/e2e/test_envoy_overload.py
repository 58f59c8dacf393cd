"""Envoy under overload: what deploy/envoy/envoy.yaml does with a replica that is busy, refuses work,
fails, or dies. Overload must not turn into "no healthy upstream" for everyone.

Most tests put Envoy (the real binary, the real config rendered by everything_server.gateway) in front
of small fake replicas: gRPC servers on loopback that answer the health check (optionally slowly)
and answer every other call with a chosen status, counting what reached them. That makes Envoy's
decisions (retry or not, eject or not) observable call by call. The last test does the same with a
real everything-server whose admission control refuses streams past its cap.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.chat.v1 import chat_service_pb2_grpc
from everything_server import gateway as gw
from tests.support import server_env, sign_up, start_server_process

READ = "/everything.auth.v1.AuthService/GetCurrentUser"
WRITE = "/everything.chat.v1.ChatService/CreateThread"
READ_STREAM = "/everything.chat.v1.ChatService/WatchMessage"
HEALTH = "/grpc.health.v1.Health/Check"


class FakeReplica(grpc.GenericRpcHandler):
    """A gRPC server that answers the health check SERVING (after `health_delay` seconds) and every
    other unary call with `code` (OK: an empty message). A server stream sends one message, then
    ends with `code`. `calls` counts what reached it, by method."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.OK, health_delay: float = 0.0):
        self.code = code
        self.health_delay = health_delay
        self.calls: Counter[str] = Counter()
        self.health_checks = 0
        self.server: grpc.aio.Server | None = None
        self.target = ""

    def service(self, details):
        method = details.method
        if method == HEALTH:
            return grpc.unary_unary_rpc_method_handler(self._health)
        if method == READ_STREAM:
            return grpc.unary_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    async def _health(self, request: bytes, context) -> bytes:
        self.health_checks += 1
        await asyncio.sleep(self.health_delay)
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
        ).SerializeToString()

    def _unary(self, method: str):
        async def handle(request: bytes, context) -> bytes:
            self.calls[method] += 1
            if self.code is not grpc.StatusCode.OK:
                await context.abort(self.code, f"fake replica answers {self.code.name}")
            return b""

        return handle

    def _stream(self, method: str):
        async def handle(request: bytes, context):
            self.calls[method] += 1
            yield b""
            if self.code is not grpc.StatusCode.OK:
                await context.abort(self.code, f"fake replica ends the stream with {self.code.name}")

        return handle

    async def __aenter__(self) -> FakeReplica:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        await self.server.stop(grace=None)


async def _codes(channel: grpc.aio.Channel, method: str, n: int, metadata=()) -> Counter[str]:
    """Make n unary calls one after the other; count the status codes."""
    call = channel.unary_unary(method)
    codes: Counter[str] = Counter()
    for _ in range(n):
        try:
            await call(b"", metadata=metadata, timeout=10)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
    return codes


async def _refused(target: str, timeout: float = 5.0) -> None:
    """Wait (bounded) until `target` refuses connections: grpc core may close a stopped server's
    listener a moment after stop() returns, and a call Envoy sends in that moment is lost."""
    host, port = target.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _reader, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return
        writer.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"{target} still accepts connections")
        await asyncio.sleep(0.02)


async def _stats(g: gw.Gateway) -> dict[str, int]:
    return await asyncio.to_thread(gw.cluster_stats, g.admin_url)


async def _health(g: gw.Gateway) -> dict[str, str]:
    return await asyncio.to_thread(gw.upstream_health, g.admin_url)


# -- the config -----------------------------------------------------------------------------------


def test_the_canonical_config_tolerates_overload():
    config = gw.load_template()
    (cluster,) = config["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    # A slow health answer is not a failure; only several in a row are.
    assert float(hc["timeout"].rstrip("s")) >= 3
    assert hc["unhealthy_threshold"] >= 3
    assert hc["grpc_health_check"] == {"service_name": ""}
    # Panic mode exists (0 would turn "every check timed out" into "no healthy upstream").
    assert 0 < cluster["common_lb_config"]["healthy_panic_threshold"]["value"] <= 50
    # Outlier detection on hard (local-origin) failures only; answers the server chose are not counted.
    od = cluster["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert od["enforcing_consecutive_local_origin_failure"] == 100
    for key in (
        "enforcing_consecutive_5xx",
        "enforcing_consecutive_gateway_failure",
        "enforcing_success_rate",
    ):
        assert od[key] == 0, key
    assert od["max_ejection_percent"] <= 50
    assert "retry_budget" in cluster["circuit_breakers"]["thresholds"][0]
    # Clients cannot ask for retries (Envoy's retry headers are removed from every request).
    removed = set(gw.http_manager(config)["route_config"]["request_headers_to_remove"])
    assert {"x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries"} <= removed

    (vhost,) = gw.http_manager(config)["route_config"]["virtual_hosts"]
    default = set(vhost["retry_policy"]["retry_on"].split(","))
    assert default == {"connect-failure", "refused-stream", "reset-before-request"}
    by_name = {r["name"]: r for r in gw.routes(config)}
    reads = set(by_name["reads"]["route"]["retry_policy"]["retry_on"].split(","))
    assert reads == default | {"unavailable"}
    for r in gw.routes(config):
        policy = r["route"].get("retry_policy") or vhost["retry_policy"]
        assert not {"resource-exhausted", "reset", "5xx", "retriable-status-codes"} & set(
            policy["retry_on"].split(",")
        ), r["name"]


# -- fake replicas behind the real gateway --------------------------------------------------------


async def test_resource_exhausted_reaches_the_client_and_the_replica_stays_in_rotation(gateway_factory):
    async with FakeReplica(grpc.StatusCode.RESOURCE_EXHAUSTED) as busy:
        g = await gateway_factory([busy.target])
        before = await _stats(g)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            codes = await _codes(ch, WRITE, 15)
            codes += await _codes(ch, READ, 15)
            # A client asking for retries on RESOURCE_EXHAUSTED does not get them.
            asking = (("x-envoy-retry-grpc-on", "resource-exhausted"), ("x-envoy-max-retries", "5"))
            codes += await _codes(ch, READ, 10, metadata=asking)
        after = await _stats(g)
        assert codes == {"RESOURCE_EXHAUSTED": 40}
        # Each call reached the replica exactly once: not retried, here or on another replica.
        assert busy.calls == {WRITE: 15, READ: 25}
        assert after["upstream_rq_retry"] == before["upstream_rq_retry"]
        # Not ejected, not unhealthy: refusing work is what an overloaded replica should do.
        assert (await _health(g)) == {busy.target: "healthy"}
        assert after["outlier_detection.ejections_enforced_total"] == 0
        assert after["health_check.failure"] == 0
        assert after.get("upstream_cx_none_healthy", 0) == 0


async def test_a_slow_health_answer_does_not_take_a_busy_replica_out(gateway_factory):
    # 1.5 s per answer: more than the old 1 s timeout, as a saturated event loop may take. (The
    # gateway only counts as started once a first, slow, check passed.)
    async with FakeReplica(health_delay=1.5) as slow:
        g = await gateway_factory([slow.target])
        checks = slow.health_checks
        deadline = time.monotonic() + 20
        while slow.health_checks < checks + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.6)  # the last check's answer
        assert slow.health_checks >= checks + 2
        stats = await _stats(g)
        assert stats["health_check.failure"] == 0, stats
        assert (await _health(g)) == {slow.target: "healthy"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            assert await _codes(ch, READ, 5) == {"OK": 5}


async def test_unavailable_is_retried_on_another_replica_for_reads_only(gateway_factory):
    async with (
        FakeReplica(grpc.StatusCode.UNAVAILABLE) as failing,
        FakeReplica() as good,
    ):
        g = await gateway_factory([failing.target, good.target])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            # Reads: every call succeeds; those that went to the failing replica were retried on the
            # other one. (Envoy picks replicas at random among equals: 30 calls all missing the
            # failing one has odds of 1e-9.)
            assert await _codes(ch, READ, 30) == {"OK": 30}
            assert failing.calls[READ] > 0
            assert good.calls[READ] == 30

            # Writes: never retried on UNAVAILABLE (the server may have acted before answering it).
            codes = await _codes(ch, WRITE, 30)
            assert failing.calls[WRITE] > 0
            assert codes == {"OK": good.calls[WRITE], "UNAVAILABLE": failing.calls[WRITE]}

            # A stream that has started is never retried, even a read: the client saw its message.
            failing.calls.clear()
            good.calls.clear()
            outcomes: Counter[str] = Counter()
            for _ in range(20):
                call = ch.unary_stream(READ_STREAM)(b"", timeout=10)
                got = 0
                try:
                    async for _msg in call:
                        got += 1
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1
                assert got == 1
            assert failing.calls[READ_STREAM] > 0
            assert outcomes == {"OK": good.calls[READ_STREAM], "UNAVAILABLE": failing.calls[READ_STREAM]}

        # UNAVAILABLE answers are the server's own: they eject nobody.
        stats = await _stats(g)
        assert stats["outlier_detection.ejections_enforced_total"] == 0
        assert (await _health(g)) == {failing.target: "healthy", good.target: "healthy"}


async def test_a_replica_that_died_costs_no_call(gateway_factory):
    async with FakeReplica() as survivor:
        dying = FakeReplica()
        await dying.__aenter__()
        g = await gateway_factory([dying.target, survivor.target])
        await dying.__aexit__(None, None, None)
        await _refused(dying.target)  # gone: connections refused from now on
        async with grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            # Before any health check notices, calls (writes too: the request never left Envoy)
            # that pick the dead replica are retried on the live one.
            assert await _codes(ch, WRITE, 20) == {"OK": 20}
        assert survivor.calls[WRITE] == 20


# -- a real server's admission control ------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_real_server_at_its_stream_cap_refuses_through_envoy_and_stays_healthy(
    settings_env, tmp_path: Path, gateway_factory, mock_model
):
    env = server_env(
        settings_env,
        EVERYTHING_MAX_STREAMS_PER_PROCESS="2",
        EVERYTHING_MAX_STREAMS_PER_USER="100",
        EVERYTHING_RATE_LIMIT_PER_MINUTE="100000",
    )
    server = await start_server_process(env, tmp_path / "server.log")
    try:
        g = await gateway_factory([server.target])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            user = await sign_up(auth_service_pb2_grpc.AuthServiceStub(ch))
            chat = chat_service_pb2_grpc.ChatServiceStub(ch)

            async def first_event(call) -> None:
                assert await call.read() is not grpc.aio.EOF

            # Two slow replies fill the server's two stream slots.
            long = [
                chat.SendMessage(
                    chat_pb.SendMessageRequest(content="a long story [mock:tokens=40 rate=10]"),
                    metadata=user.md,
                    timeout=60,
                )
                for _ in range(2)
            ]
            await asyncio.gather(*(first_event(c) for c in long))

            refused, took = Counter(), []
            for _ in range(10):
                t0 = time.monotonic()
                call = chat.SendMessage(
                    chat_pb.SendMessageRequest(content="one more [mock:tokens=5]"),
                    metadata=user.md,
                    timeout=30,
                )
                try:
                    async for _event in call:
                        pass
                    refused["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    refused[exc.code().name] += 1
                took.append(time.monotonic() - t0)
            assert refused == {"RESOURCE_EXHAUSTED": 10}
            assert max(took) < 2.0, took  # refused at once, not queued

            # The two admitted replies finish normally; the replica never left rotation.
            for c in long:
                while await c.read() is not grpc.aio.EOF:
                    pass
                assert await c.code() == grpc.StatusCode.OK
            stats = await _stats(g)
            assert (await _health(g)) == {server.target: "healthy"}
            assert stats["outlier_detection.ejections_enforced_total"] == 0
            assert stats["health_check.failure"] == 0
            assert stats.get("upstream_cx_none_healthy", 0) == 0
    finally:
        await asyncio.to_thread(server.terminate)
