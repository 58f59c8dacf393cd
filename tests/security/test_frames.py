"""Malformed HTTP/2 and gRPC framing straight at the server: wrong content types, truncated frames,
oversized messages, garbage instead of HTTP/2. Each gets an error answer (or a closed connection),
and the server answers the next good request."""

from __future__ import annotations

import asyncio
import struct

import grpc
import h2.config
import h2.connection
import h2.events
from grpc_health.v1 import health_pb2, health_pb2_grpc

from everything.auth.v1 import auth_service_pb2 as pb

METHOD = "/everything.auth.v1.AuthService/SignIn"


async def h2_request(
    port: int, headers: list[tuple[str, str]], body: bytes, *, end: bool = True, timeout: float = 10
) -> dict:
    """One raw HTTP/2 request; returns the response headers, data and trailers (bounded in time)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.increment_flow_control_window(2**30)
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers, end_stream=not body and end)
    sent = 0
    out = {"headers": {}, "data": b"", "trailers": {}, "reset": None, "closed": False}
    try:
        async with asyncio.timeout(timeout):
            while True:
                # Send what the flow-control window allows.
                while sent < len(body) and conn.local_flow_control_window(stream) > 0:
                    size = min(
                        len(body) - sent, conn.local_flow_control_window(stream), conn.max_outbound_frame_size
                    )
                    last = sent + size >= len(body)
                    conn.send_data(stream, body[sent : sent + size], end_stream=last and end)
                    sent += size
                writer.write(conn.data_to_send())
                await writer.drain()
                data = await reader.read(65536)
                if not data:
                    out["closed"] = True
                    return out
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        out["headers"] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        out["data"] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream)
                    elif isinstance(event, h2.events.TrailersReceived):
                        out["trailers"] = dict(event.headers)
                    elif isinstance(event, h2.events.StreamReset):
                        out["reset"] = event.error_code
                        return out
                    elif isinstance(event, h2.events.StreamEnded | h2.events.ConnectionTerminated):
                        return out
    except TimeoutError:
        out["timeout"] = True
        return out
    finally:
        writer.close()


def grpc_headers(port: int, content_type: str = "application/grpc") -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{port}"),
        (":path", METHOD),
        ("content-type", content_type),
        ("te", "trailers"),
    ]


def frame(payload: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">?I", False, len(payload) if declared is None else declared) + payload


def grpc_status(resp: dict) -> str | None:
    return resp["trailers"].get("grpc-status") or resp["headers"].get("grpc-status")


async def still_serving(app) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_well_formed_raw_request_gets_a_grpc_answer(app):
    # The control: the raw client itself speaks gRPC correctly.
    body = frame(pb.SignInRequest(email="nobody@example.com", password="x" * 12).SerializeToString())
    resp = await h2_request(app.port, grpc_headers(app.port), body)
    assert grpc_status(resp) == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


async def test_wrong_content_types_are_refused(app):
    for ctype in ("text/plain", "application/json", "application/grpc-web+proto"):
        resp = await h2_request(app.port, grpc_headers(app.port, ctype), frame(b""))
        status = resp["headers"].get(":status")
        assert status == "415" or grpc_status(resp) not in (None, "0"), (ctype, resp)
    await still_serving(app)


async def test_truncated_and_lying_frames_are_refused(app):
    good = pb.SignInRequest(email="a@example.com", password="p" * 12).SerializeToString()
    cases = [
        frame(good)[:7],  # the prefix is cut
        frame(good, declared=len(good) + 50),  # says more than it sends
        frame(b"\xff\xff\xff\xff"),  # not a protobuf message
        b"\x01" + struct.pack(">I", 3) + b"abc",  # "compressed" without a compression algorithm
    ]
    for body in cases:
        # A half-closed stream whose message never completes waits for its deadline (grpc-core keeps
        # the stream); with one, it ends. Envoy's stream idle timeout bounds the rest in production.
        resp = await h2_request(app.port, grpc_headers(app.port) + [("grpc-timeout", "1S")], body)
        assert not resp.get("timeout"), resp
        assert resp.get("reset") is not None or grpc_status(resp) not in (None, "0"), resp
    await still_serving(app)


async def test_an_oversized_message_is_resource_exhausted(app, settings):
    size = settings.max_message_bytes + 1024
    body = frame(b"\x0a" + b"\xff\xff\xff\x07" + b"a" * size, declared=size + 5)  # a huge `email`
    resp = await h2_request(app.port, grpc_headers(app.port), body, timeout=20)
    assert resp.get("reset") is not None or grpc_status(resp) == str(
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    ), {k: v for k, v in resp.items() if k != "data"}
    await still_serving(app)


async def test_garbage_instead_of_http2_closes_only_that_connection(app):
    for junk in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 64,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(junk)
        await writer.drain()
        try:
            async with asyncio.timeout(5):
                while await reader.read(4096):
                    pass
        except (TimeoutError, ConnectionError):
            pass
        writer.close()
    await still_serving(app)
