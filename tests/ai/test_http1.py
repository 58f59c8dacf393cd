"""http1, the chat streams' HTTP/1.1 transport, against raw asyncio servers on loopback: keep-alive,
a kept connection the server closed, bodies that end with the connection, pushed chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2
import pytest

from everything_server.ai.http1 import PUSH, Http1Transport

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """A loopback TCP server that runs `handler(reader, writer, connection_number)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/x"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        raw = RawServer(handler)
        raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        assert raw.server is not None
        raw.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return head + await reader.readexactly(length)


def response(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


async def test_connections_are_kept_alive_between_requests(serve) -> None:
    async def handler(reader, writer, n):
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(response(b"hello"))

    raw = await serve(handler)
    async with httpx2.AsyncClient(transport=Http1Transport()) as client:
        for _ in range(3):
            r = await client.post(raw.url, content=b'{"a": 1}')
            assert r.status_code == 200 and r.content == b"hello"
    assert raw.connections == 1


async def test_a_kept_connection_the_server_closed_is_replaced_once(serve) -> None:
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(response(b"conn %d" % n))
        if n == 1:  # the next request on it finds it closed (a server's idle timeout, just then)
            await read_request(reader)

    raw = await serve(handler)
    async with httpx2.AsyncClient(transport=Http1Transport()) as client:
        assert (await client.get(raw.url)).content == b"conn 1"
        assert (await client.get(raw.url)).content == b"conn 2"
    assert raw.connections == 2


async def test_a_connection_closed_while_idle_leaves_the_pool(serve) -> None:
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(response(b"conn %d" % n))
        await writer.drain()

    raw = await serve(handler)
    transport = Http1Transport()
    async with httpx2.AsyncClient(transport=transport) as client:
        assert (await client.get(raw.url)).content == b"conn 1"
        await asyncio.sleep(0.05)  # the close arrives while the connection is idle in the pool
        assert not any(transport._idle.values())
        assert (await client.get(raw.url)).content == b"conn 2"


async def test_a_reused_connection_that_fails_with_part_of_an_answer_is_not_retried(serve) -> None:
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(response(b"first"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")  # then closed

    raw = await serve(handler)
    async with httpx2.AsyncClient(transport=Http1Transport()) as client:
        assert (await client.get(raw.url)).content == b"first"
        with pytest.raises(httpx2.ReadError):
            await client.get(raw.url)
    assert raw.connections == 1


async def test_a_body_without_length_ends_with_the_connection(serve) -> None:
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    raw = await serve(handler)
    async with httpx2.AsyncClient(transport=Http1Transport()) as client:
        r = await client.get(raw.url)
        assert r.content == b"all of it"


async def test_chunks_are_pushed_as_they_arrive_and_the_end_is_a_future(serve) -> None:
    go = asyncio.Event()

    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nearly\r\n")
        await writer.drain()
        await go.wait()
        writer.write(b"4\r\nlate\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep the connection open: the body ends by its last chunk

    raw = await serve(handler)
    async with httpx2.AsyncClient(transport=Http1Transport()) as client:
        async with client.stream("POST", raw.url, content=b"{}") as r:
            push = r.extensions[PUSH]
            await asyncio.sleep(0.05)  # "early" is read before anyone subscribes
            got: list[bytes] = []
            ended = push.subscribe(got.append)
            assert got == [b"early"] and not ended.done()
            go.set()
            await asyncio.wait_for(ended, 5)
            assert got == [b"early", b"late"]


async def test_silence_longer_than_the_read_timeout_fails_the_body(serve) -> None:
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await reader.read()  # then nothing, until the client goes away

    raw = await serve(handler)
    timeout = httpx2.Timeout(5.0, read=0.3)
    async with httpx2.AsyncClient(transport=Http1Transport(), timeout=timeout) as client:
        async with client.stream("GET", raw.url) as r:
            got: list[bytes] = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(httpx2.ReadTimeout):
                await r.extensions[PUSH].subscribe(got.append)
            assert got == [b"hi"] and 0.25 < loop.time() - start < 2


@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the machine's openssl)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def test_https_verifies_the_server_certificate(certificate) -> None:
    import ssl

    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader, writer):
        try:
            await read_request(reader)
            writer.write(response(b"secret"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client that refused the certificate
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
    try:
        trusting = ssl.create_default_context(cafile=cert)
        async with httpx2.AsyncClient(transport=Http1Transport(ssl_context=trusting)) as client:
            assert (await client.get(url)).content == b"secret"
        async with httpx2.AsyncClient(transport=Http1Transport()) as client:  # the system's CAs
            with pytest.raises(httpx2.ConnectError):
                await client.get(url)
    finally:
        server.close()
