"""How calls get from grpc core to the event loop quickly when the loop is busy.

Two things in grpc.aio (grpcio 1.85) make a loaded server take new calls slowly, so that past
capacity calls wait in grpc core for seconds, where no code of ours can refuse them (and after 30 s
grpc core cancels them, `grpc.server_max_unrequested_time_in_server`):

1. **Completion wake-ups.** grpc.aio's poller thread writes one byte to a socket pair for every
   completion it queues, and the loop's reader (`PollerCompletionQueue._handle_events`) reads one
   byte per call, then runs every queued completion. Under load the bytes pile up faster than the
   loop's iterations read them; once the socket's buffer is full the poller's write blocks, and
   from then on completions (new calls, messages sent, messages received) reach the loop about one
   per loop iteration. `drain_wakeups` wraps that reader so that each call reads all the bytes
   waiting but one, which grpc.aio's reader then reads itself: one wake-up per iteration runs every
   completion queued, and the poller never blocks.
2. **One call requested per method.** grpc.aio asks grpc core for the next call of a method only
   after the last one's wake-up, a task and an `asyncio.wait` have run (a few loop iterations).
   `Acceptors` keeps `per_method` more calls requested for each method, each by a task that hands
   the call it got to grpc.aio's own handling (interceptors, handler, cancellation, status) and asks
   for the next one at once.

Neither alone helps (measured with 1,000 unary calls at once against a loop kept busy 5 ms per
iteration: 27-30 s for all of them by default, 30 s with the drain alone, 20-22 s with 16 more
calls requested per method alone; with both, 1.4 s at 16 and 0.5 s at 64). Both use private parts
of grpc.aio (the reader's callback name, `cygrpc.AioServer._request_registered_call`,
`cygrpc._handle_rpc`, `cygrpc._schedule_rpc_coro`, `cygrpc._MethodResolver`), looked for at start:
on a grpc without them a warning is logged and the server runs as grpc.aio does by itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

import grpc

log = logging.getLogger(__name__)

_READER_NAME = "_handle_events"


def drain_wakeups(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Wrap grpc.aio's completion reader(s) on `loop` (see the module's docstring); returns how many
    readers are wrapped now. Idempotent: a reader already wrapped is left as it is."""
    loop = loop or asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return 0
    wrapped = 0
    for key in list(selector.get_map().values()):
        reader = key.data[0] if key.data else None
        callback = getattr(reader, "_callback", None)
        if getattr(callback, "_drains", False):
            wrapped += 1
            continue
        if getattr(getattr(callback, "func", callback), "__name__", "") != _READER_NAME:
            continue
        sock, args = key.fileobj, reader._args
        if not isinstance(sock, socket.socket):
            continue

        # Read into one buffer of the reader's own: this runs at every wake-up of the loop by grpc.
        def drained(sock=sock, callback=callback, args=args, buffer=bytearray(1 << 16)) -> None:
            try:
                waiting = sock.recv_into(buffer, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return  # nothing to read: grpc.aio's blocking recv(1) must not run
            if waiting > 1:
                sock.recv_into(buffer, waiting - 1)
            callback(*args)  # reads the last byte, then runs every completion queued

        drained._drains = True  # type: ignore[attr-defined]
        loop.remove_reader(sock)
        loop.add_reader(sock, drained)
        wrapped += 1
    return wrapped


def _internals():
    from grpc._cython import cygrpc

    names = ("_handle_rpc", "_schedule_rpc_coro", "_MethodResolver", "AioServer")
    if not all(hasattr(cygrpc, n) for n in names) or not hasattr(
        cygrpc.AioServer, "_request_registered_call"
    ):
        return None
    return cygrpc


class HandlerRecorder:
    """Stands in for the server in generated `add_*Servicer_to_server` functions: forwards every
    registration to it and keeps the registered method handlers by full method name."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)
        for name, handler in method_handlers.items():
            self.handlers[f"/{service_name}/{name}"] = handler


class Acceptors:
    """`per_method` more calls requested from grpc core for each of `handlers`' methods (see the
    module's docstring). Each task ends when grpc core fails its request, which it does to every
    request it holds when the server stops."""

    def __init__(
        self,
        server: grpc.aio.Server,
        handlers: dict[str, grpc.RpcMethodHandler],
        interceptors: Iterable[grpc.aio.ServerInterceptor],
        per_method: int,
    ):
        self._server = server
        self._handlers = dict(handlers)
        self._interceptors = tuple(interceptors)
        self._per_method = per_method
        self._tasks: set[asyncio.Task] = set()
        self._rpcs: set[asyncio.Task] = set()
        self.taken = 0  # calls these acceptors have taken

    @property
    def running(self) -> int:
        """Acceptor tasks that have not ended."""
        return len(self._tasks)

    def start(self) -> bool:
        """Start the acceptors, once the server has started. False if there is nothing to do or
        this grpc lacks what they use."""
        if self._per_method <= 0 or not self._handlers:
            return False
        cygrpc = _internals()
        core = getattr(self._server, "_server", None)
        if cygrpc is None or not isinstance(core, cygrpc.AioServer) or not core.is_running():
            log.warning("grpc.aio internals not found: calls are requested one at a time per method")
            return False
        resolver = cygrpc._MethodResolver([], dict(self._handlers))
        loop = asyncio.get_running_loop()
        for method in self._handlers:
            for _ in range(self._per_method):
                task = loop.create_task(self._accept(cygrpc, core, resolver, method, loop), name="acceptor")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return True

    async def stop(self, wait: float = 1.0) -> None:
        """After the server's stop: its failed requests end the acceptors; those a loaded loop has
        not run within `wait` seconds are cancelled, so that none outlives the server."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=wait)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, cygrpc, core, resolver, method: str, loop) -> None:
        method_bytes = method.encode()
        while core.is_running():
            try:
                rpc_state = await core._request_registered_call(method_bytes)
            except Exception:  # the server is stopping: grpc core fails the requests it holds
                if core.is_running():
                    log.warning("a call request failed; this acceptor stops", exc_info=True)
                return
            self.taken += 1
            coro = cygrpc._handle_rpc(method, resolver, self._interceptors, rpc_state, loop, False)
            rpc = loop.create_task(cygrpc._schedule_rpc_coro(coro, rpc_state, loop, method), name="rpc_task")
            self._rpcs.add(rpc)  # the loop keeps only a weak reference to a task
            rpc.add_done_callback(self._rpcs.discard)
