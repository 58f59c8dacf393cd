"""OpenTelemetry tracing, when enabled: spans for RPCs (continuing the caller's trace), database
transactions and upstream model calls. Off by default."""

from __future__ import annotations

import grpc
import pytest

from everything.auth.v1 import auth_service_pb2 as pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.chat.v1 import chat_service_pb2_grpc
from everything_server.app import App
from tests.conftest import make_settings
from tests.support import sign_up

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
async def traced(settings_env):
    server = App(make_settings(settings_env, otel_enabled=True, otel_exporter="memory"))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield server, ch
    await server.stop(grace=1)


async def test_rpc_database_and_upstream_spans_share_the_callers_trace(traced):
    server, ch = traced
    auth = auth_service_pb2_grpc.AuthServiceStub(ch)
    user = await sign_up(auth)
    md = (*user.md, ("traceparent", PARENT))
    await auth.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=md)
    events = [
        e
        async for e in chat_service_pb2_grpc.ChatServiceStub(ch).SendMessage(
            chat_pb.SendMessageRequest(content="trace me"), metadata=md
        )
    ]
    assert events[-1].HasField("message_completed")

    spans = server.container.tracing.exporter.get_finished_spans()
    ours = [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    names = {s.name for s in ours}
    assert "/everything.auth.v1.AuthService/GetCurrentUser" in names
    assert "/everything.chat.v1.ChatService/SendMessage" in names
    assert "db.transaction" in names
    rpc = next(s for s in ours if s.name.endswith("/GetCurrentUser"))
    assert rpc.attributes["rpc.grpc.status_code"] == 0 and rpc.attributes["rpc.system"] == "grpc"
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == "00f067aa0ba902b7"
    # The model call is traced too (it may run in a detached task that starts its own trace).
    assert any(s.name == "upstream.chat.completions" for s in spans)
    # Nothing private in span attributes.
    for s in spans:
        assert user.email not in str(dict(s.attributes or {}))


async def test_tracing_is_off_by_default(app):
    assert not app.container.tracing.enabled
    assert app.container.tracing.exporter is None
