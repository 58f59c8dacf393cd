"""rpc/acceptors.py: grpc.aio's completion wake-ups drained, and more calls of a method requested
from grpc core at a time, on real grpc.aio servers over loopback."""

from __future__ import annotations

import asyncio
import functools
import socket
import uuid

import grpc
import pytest

from everything_server.rpc.acceptors import Acceptors, HandlerRecorder, drain_wakeups
from everything_server.rpc.context import Principal
from everything_server.rpc.interceptor import Caps, ServerInterceptor


class _Reader:
    """Stands for grpc.aio's completion reader: reads one byte per call, as it does."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.calls = 0

    def _handle_events(self, loop) -> None:
        self.sock.recv(1)
        self.calls += 1


async def test_the_drained_reader_reads_every_waiting_byte_in_one_wake_up():
    loop = asyncio.get_running_loop()
    read, write = socket.socketpair()
    try:
        reader = _Reader(read)
        loop.add_reader(read, functools.partial(reader._handle_events, loop))
        assert drain_wakeups(loop) >= 1
        assert drain_wakeups(loop) >= 1  # a reader already wrapped stays as it is
        write.send(b"1" * 500)  # 500 completions queued
        for _ in range(20):
            await asyncio.sleep(0.01)
        # One wake-up ran the reader once and left nothing to read: without the drain it would
        # run once per byte, one byte per loop iteration.
        assert reader.calls == 1
        with pytest.raises(BlockingIOError):
            read.recv(1, socket.MSG_DONTWAIT)
        write.send(b"1")
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert reader.calls == 2
    finally:
        loop.remove_reader(read)
        read.close()
        write.close()


async def _echo(request: bytes, context) -> bytes:
    await asyncio.sleep(0)
    return request


async def _count(request: bytes, context):
    for i in range(3):
        yield bytes([i])


def _server(per_method: int, interceptors=()):
    server = grpc.aio.server(interceptors=list(interceptors))
    recorder = HandlerRecorder(server)
    recorder.add_registered_method_handlers(
        "test.Accept",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Count": grpc.unary_stream_rpc_method_handler(_count),
        },
    )
    port = server.add_insecure_port("127.0.0.1:0")
    return server, recorder, port


def _verify(token: str) -> Principal:
    return Principal(user_id=uuid.UUID(int=int(token)), session_id=uuid.UUID(int=0))


class _Hog:
    """Keeps the loop busy a few milliseconds per iteration, as many streams would, and records how
    many calls the acceptors had taken at each iteration."""

    def __init__(self, acceptors: Acceptors, block: float = 0.003):
        self.acceptors, self.block = acceptors, block
        self.taken: list[int] = []
        self._stopped = False

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        if self._stopped:
            return
        self.taken.append(self.acceptors.taken)
        end = asyncio.get_running_loop().time() + self.block
        while asyncio.get_running_loop().time() < end:
            pass
        asyncio.get_running_loop().call_soon(self._run)

    def stop(self) -> None:
        self._stopped = True

    def most_in_one_iteration(self) -> int:
        return max((b - a for a, b in zip(self.taken, self.taken[1:], strict=False)), default=0)


async def test_a_busy_server_takes_a_burst_of_calls_many_per_loop_iteration():
    interceptor = ServerInterceptor(_verify, caps=Caps(max_streams_per_user=1000))
    server, recorder, port = _server(16, [interceptor])
    await server.start()
    acceptors = Acceptors(server, recorder.handlers, [interceptor], 16)
    assert acceptors.start()
    assert drain_wakeups() >= 1
    hog = _Hog(acceptors)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            md = (("authorization", "Bearer 1"),)
            echo = functools.partial(
                ch.unary_unary("/test.Accept/Echo", _registered_method=True), metadata=md
            )
            count = functools.partial(
                ch.unary_stream("/test.Accept/Count", _registered_method=True), metadata=md
            )
            assert await echo(b"x", timeout=10) == b"x"
            hog.start()
            replies = await asyncio.gather(*(echo(bytes([i % 256]), timeout=30) for i in range(300)))
            streams = await asyncio.gather(*(_read_all(count(b"", timeout=30)) for _ in range(50)))
        # Every call was answered, through the interceptor and the handler, in order.
        assert replies == [bytes([i % 256]) for i in range(300)]
        assert streams == [[b"\x00", b"\x01", b"\x02"]] * 50
        # Most of them were taken by the acceptors, several in one loop iteration (grpc.aio alone
        # takes one call of a method every few iterations).
        assert acceptors.taken > 200
        assert hog.most_in_one_iteration() >= 4
    finally:
        hog.stop()
        await server.stop(0)
        # The server's stop failed the calls the acceptors had requested, which ends their tasks;
        # what a loaded loop has not run yet, stop() cancels.
        await acceptors.stop()
    assert acceptors.running == 0


async def _read_all(call) -> list[bytes]:
    return [m async for m in call]


async def test_the_servers_stop_ends_the_acceptors_and_stop_leaves_none_behind():
    server, recorder, _ = _server(4)
    await server.start()
    try:
        acceptors = Acceptors(server, recorder.handlers, [], 4)
        assert acceptors.start()
        # (Other servers of the test session run acceptors of their own in the same loop.)
        assert acceptors.running == 2 * 4  # two methods, four calls requested ahead for each
    finally:
        # A server left running would keep grpc.aio's poller thread, and pytest's exit, waiting.
        await server.stop(0)
    # grpc core fails the calls requested from a server that stops: the acceptors end by themselves.
    for _ in range(250):
        if not acceptors.running:
            break
        await asyncio.sleep(0.02)
    assert acceptors.running == 0
    await acceptors.stop()  # nothing left to cancel

    # One that is still waiting when stop() is called (a loop too busy to have run it) is cancelled.
    stuck = asyncio.get_running_loop().create_task(asyncio.sleep(60), name="acceptor")
    acceptors._tasks.add(stuck)
    stuck.add_done_callback(acceptors._tasks.discard)
    await acceptors.stop(wait=0.01)
    assert stuck.cancelled() and acceptors.running == 0


async def test_no_acceptors_are_started_when_none_are_asked_for():
    server, recorder, _ = _server(0)
    await server.start()
    try:
        assert not Acceptors(server, recorder.handlers, [], 0).start()
        assert not Acceptors(server, {}, [], 4).start()
    finally:
        await server.stop(0)
