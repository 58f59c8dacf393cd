"""Load generator processes: each runs its share of the concurrent clients in its own event loop.

A worker gets a spec (what to call, its client slots), builds its clients, makes one warm-up call
(a one-token reply, so lazy imports and first connections stay out of the figures), says ready,
gets the window and answers one result dict through its pipe. Every slot runs closed-loop, one
stream (or unary call) after the other, from its start (spread over `ramp` seconds) until
`stop_at`; in-flight streams may then finish until `hard_stop`. Kinds:

- ``openai``: the openai SDK streaming chat completions (the mock itself, or LiteLLM).
- ``grpc``: everything's ChatService.SendMessage over gRPC. A titled thread is created first (so
  no auto-title request is added to the reply); TTFT is measured from the SendMessage call.
- ``grpcweb``: the same over gRPC-Web (HTTP/1.1, binary frames), as a browser does through Envoy.
- ``unary``: one unary RPC in a loop (GetPreferences, ListThreads, GetCurrentUser).

Tokens are counted as words of the received text (the mock sends one word per token), so a server
that coalesces deltas into fewer messages is counted the same. Tokens per second count the tokens
that arrived between the end of the ramp and `stop_at` (all slots busy).

RESOURCE_EXHAUSTED (gRPC; HTTP 429 from LiteLLM) is a refusal, counted apart from errors with how
long it took to come back (from the start of the refused call): past capacity, admission control
should answer it quickly. A refused gRPC slot waits as long as the refusal's RetryInfo asks (the
other clients, and a refusal without one: `refusal_backoff` seconds), then asks again in the same
thread, as a client honouring it would, instead of hammering the server in a tight loop. Every
worker also samples how many of its streams are open (admitted: from their first message, or the
HTTP response for the openai SDK, to their end) every OPEN_SAMPLE_SECONDS, on a clock shared by
all workers, so the sum is the number of open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time
import traceback
from array import array
from collections import Counter
from typing import Any

DEADLINE_SLACK = 5.0
OPEN_SAMPLE_SECONDS = 0.25
REFUSED = "RESOURCE_EXHAUSTED"
WARMUP_PROMPT = "warm up [mock:tokens=1 rate=0]"


def _retry_delay(trailing_metadata) -> float | None:
    """Seconds the RetryInfo of a gRPC error status asks to wait, if it carries one."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToTimedelta().total_seconds()
    return None


class Recorder:
    """What one worker saw. Times are perf_counter seconds; `off` maps them to wall time."""

    def __init__(self) -> None:
        self.off = time.time() - time.perf_counter()
        self.start = self.count_from = self.stop = float("inf")
        self.ttft = array("d")
        self.ttfe = array("d")  # gRPC: time to the first event (user_message_saved): the setup part
        self.gaps = array("d")
        self.latency = array("d")
        self.error_latency = array("d")  # attempt start -> error (refusals not included)
        self.refusal_latency = array("d")  # refused call's start -> RESOURCE_EXHAUSTED
        self.refused = 0
        self.open = 0  # streams open right now (first message received, not ended)
        self.open_samples = array("i")  # open streams at start + k * OPEN_SAMPLE_SECONDS
        self.started = 0
        self.completed = 0
        self.tokens = 0
        self.tokens_in_window = 0
        self.no_first_token = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.first_start: float | None = None
        self.last_end: float | None = None

    def window(self, start_at: float, ramp: float, stop_at: float) -> None:
        self.start = start_at - self.off
        self.count_from = self.start + ramp
        self.stop = stop_at - self.off

    def error(self, code: str, detail: str = "", since: float | None = None) -> None:
        if code == REFUSED:
            self.refused += 1
            if since is not None:
                self.refusal_latency.append(time.perf_counter() - since)
        else:
            self.errors[code] += 1
            if since is not None:
                self.error_latency.append(time.perf_counter() - since)
        if code not in self.error_samples and detail:
            self.error_samples[code] = detail[:300]

    async def sample_open(self) -> None:
        """Record `open` at start + k * OPEN_SAMPLE_SECONDS until the hard stop (cancelled)."""
        k = 0
        while True:
            at = self.start + k * OPEN_SAMPLE_SECONDS
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.open_samples.append(self.open)
            k += 1

    def began(self) -> float:
        t = time.perf_counter()
        self.started += 1
        if self.first_start is None:
            self.first_start = t
        return t

    def ended(self, completed: bool) -> None:
        t = time.perf_counter()
        self.last_end = t if self.last_end is None else max(self.last_end, t)
        if completed:
            self.completed += 1

    def result(self) -> dict[str, Any]:
        def wall(t: float | None) -> float | None:
            return None if t is None else t + self.off

        return {
            "started": self.started,
            "completed": self.completed,
            "tokens": self.tokens,
            "tokens_in_window": self.tokens_in_window,
            "no_first_token": self.no_first_token,
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "ttft": self.ttft.tobytes(),
            "ttfe": self.ttfe.tobytes(),
            "gaps": self.gaps.tobytes(),
            "latency": self.latency.tobytes(),
            "error_latency": self.error_latency.tobytes(),
            "refused": self.refused,
            "refusal_latency": self.refusal_latency.tobytes(),
            "open_samples": self.open_samples.tobytes(),
            "first_start": wall(self.first_start),
            "last_end": wall(self.last_end),
        }


class Tokens:
    """Per-stream token timing: TTFT from `t0`, gaps between content-bearing messages."""

    __slots__ = ("rec", "t0", "last", "count")

    def __init__(self, rec: Recorder, t0: float):
        self.rec, self.t0, self.last, self.count = rec, t0, None, 0

    def add(self, text: str) -> None:
        n = len(text.split())
        if not n:
            return
        t = time.perf_counter()
        rec = self.rec
        if self.last is None:
            rec.ttft.append(t - self.t0)
        else:
            rec.gaps.append(t - self.last)
        self.last = t
        self.count += n
        rec.tokens += n
        if rec.count_from <= t <= rec.stop:
            rec.tokens_in_window += n


COMPLETED = 2  # MESSAGE_STATUS_COMPLETED


async def _read_reply(replies: Any, tk: Tokens, rec: Recorder) -> int:
    """Read a SendMessage stream (gRPC or gRPC-Web, decoded): its tokens, the time to its first
    event, the open-stream count while it is open. The final message status (0: none came)."""
    status = 0
    opened = False
    try:
        async for resp in replies:
            if not opened:
                opened = True
                rec.open += 1
            if resp.HasField("text_delta"):
                tk.add(resp.text_delta.text)
            elif resp.HasField("user_message_saved"):
                rec.ttfe.append(time.perf_counter() - tk.t0)
            elif resp.HasField("message_completed"):
                status = resp.message_completed.message.status
    finally:
        if opened:
            rec.open -= 1
    return status


class _Null(Recorder):
    """A recorder for the warm-up call: records nothing anyone reads."""


# -- clients ------------------------------------------------------------------------------------------


class OpenAIClient:
    def __init__(self, spec: dict[str, Any]):
        import httpx2
        import openai

        self.spec = spec
        self.openai = openai
        n = len(spec["slots"])
        http = openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=n + 16, max_keepalive_connections=n + 16),
            timeout=openai.Timeout(spec["stream_timeout"], connect=10.0),
        )
        self.client = openai.AsyncOpenAI(
            base_url=spec["target"], api_key=spec["api_key"], max_retries=0, http_client=http
        )

    async def setup(self) -> None:
        pass

    def slot(self, i: int, rec: Recorder, prompt: str):
        spec, openai, client = self.spec, self.openai, self.client
        messages = [{"role": "user", "content": prompt}]

        async def one() -> bool:
            t0 = rec.began()
            tk = Tokens(rec, t0)
            ok = refused = opened = False
            try:
                async with asyncio.timeout(spec["stream_timeout"]):
                    stream = await client.chat.completions.create(
                        model=spec["model"],
                        messages=messages,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    opened = True
                    rec.open += 1
                    async for chunk in stream:
                        if chunk.choices:
                            text = chunk.choices[0].delta.content
                            if text:
                                tk.add(text)
                ok = True
            except TimeoutError:
                rec.error("TIMEOUT", since=t0)
            except openai.APIStatusError as exc:
                refused = exc.status_code == 429
                code = REFUSED if refused else f"HTTP_{exc.status_code}"
                rec.error(code, str(exc), since=t0)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                rec.error(type(exc).__name__, str(exc), since=t0)
            finally:
                if opened:
                    rec.open -= 1
            if tk.last is None:
                rec.no_first_token += 1
            rec.ended(ok)
            return refused

        return one

    async def close(self) -> None:
        await self.client.close()


class GrpcClient:
    """Channels shared by the slots: one connection each (channels with equal arguments would
    share one), round robin over the listed replicas."""

    def __init__(self, spec: dict[str, Any]):
        import grpc

        from everything.auth.v1 import auth_service_pb2_grpc
        from everything.chat.v1 import chat_service_pb2_grpc
        from everything.preferences.v1 import preferences_service_pb2_grpc

        self.spec = spec
        self.grpc = grpc
        count = max(1, min(len(spec["slots"]), spec.get("channels", 8)))
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        self.channels = [grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(count)]
        self.stubs = [
            {
                "auth": auth_service_pb2_grpc.AuthServiceStub(ch),
                "chat": chat_service_pb2_grpc.ChatServiceStub(ch),
                "prefs": preferences_service_pb2_grpc.PreferencesServiceStub(ch),
            }
            for ch in self.channels
        ]

    async def setup(self) -> None:
        for ch in self.channels:
            await asyncio.wait_for(ch.channel_ready(), 30)

    def slot(self, i: int, rec: Recorder, prompt: str):
        from everything.chat.v1 import chat_service_pb2 as chat_pb

        spec, grpc = self.spec, self.grpc
        stub = self.stubs[i % len(self.stubs)]["chat"]
        md = (("authorization", f"Bearer {spec['slots'][i]['token']}"),)
        timeout = spec["stream_timeout"]

        thread_id = None  # kept after a refusal: the retry asks again in the same thread

        async def one() -> bool | float:
            nonlocal thread_id
            tk = None
            ok = refused = False
            attempt = time.perf_counter()  # the call in progress started then (for its latency)
            status = 0
            try:
                if thread_id is None:
                    thread = await stub.CreateThread(
                        chat_pb.CreateThreadRequest(title="bench"), metadata=md, timeout=timeout
                    )
                    thread_id = thread.thread.id
                tk = Tokens(rec, rec.began())
                attempt = tk.t0
                call = stub.SendMessage(
                    chat_pb.SendMessageRequest(thread_id=thread_id, content=prompt),
                    metadata=md,
                    timeout=timeout,
                )
                status = await _read_reply(call, tk, rec)
                ok = status == COMPLETED
                if not ok:  # ended without an error status but not COMPLETED (or no final event)
                    rec.error(f"MESSAGE_STATUS_{status}", since=attempt)
            except grpc.aio.AioRpcError as exc:
                ok = False
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused = _retry_delay(exc.trailing_metadata()) or True
                rec.error(exc.code().name, exc.details() or "", since=attempt)
            except Exception as exc:  # noqa: BLE001
                ok = False
                rec.error(type(exc).__name__, str(exc), since=attempt)
            if tk is None:  # CreateThread failed: an attempt that never began streaming
                rec.began()
            if tk is None or tk.last is None:
                rec.no_first_token += 1
            rec.ended(ok)
            if not refused:
                thread_id = None
            return refused

        return one

    def unary_slot(self, i: int, rec: Recorder):
        from everything.auth.v1 import auth_service_pb2 as auth_pb
        from everything.chat.v1 import chat_service_pb2 as chat_pb
        from everything.preferences.v1 import preferences_service_pb2 as prefs_pb

        stubs = self.stubs[i % len(self.stubs)]
        method = self.spec["method"]
        if method == "GetPreferences":
            fn, request = stubs["prefs"].GetPreferences, prefs_pb.GetPreferencesRequest()
        elif method == "ListThreads":
            fn, request = stubs["chat"].ListThreads, chat_pb.ListThreadsRequest(page_size=20)
        elif method == "GetCurrentUser":
            fn, request = stubs["auth"].GetCurrentUser, auth_pb.GetCurrentUserRequest()
        else:
            raise ValueError(f"unknown unary method {method}")
        md = (("authorization", f"Bearer {self.spec['slots'][i]['token']}"),)
        timeout, grpc = self.spec["stream_timeout"], self.grpc

        async def one() -> bool:
            t0 = rec.began()
            ok = refused = False
            try:
                await fn(request, metadata=md, timeout=timeout)
                ok = True
                rec.latency.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                rec.error(exc.code().name, exc.details() or "", since=t0)
            rec.ended(ok)
            return refused

        return one

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close(grace=None)


_CODES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED"
).split()


def _code_name(value: str | None) -> str:
    try:
        return _CODES[int((value or "2").strip())]
    except (ValueError, IndexError):
        return "UNKNOWN"


class _GrpcWebError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class GrpcWebClient:
    """gRPC-Web (binary) over HTTP/1.1 with aiohttp: one connection per concurrent call."""

    def __init__(self, spec: dict[str, Any]):
        import aiohttp

        self.spec = spec
        self.base = spec["target"].rstrip("/")
        connector = aiohttp.TCPConnector(limit=len(spec["slots"]) + 16)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=spec["stream_timeout"] + DEADLINE_SLACK),
        )

    async def setup(self) -> None:
        pass

    async def call(self, method: str, token: str, request: bytes):
        """POST one call; yields the payload of each data frame; raises on a non-OK status."""
        timeout = self.spec["stream_timeout"]
        headers = {
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "accept": "application/grpc-web+proto",
            "authorization": f"Bearer {token}",
            "grpc-timeout": f"{int(timeout * 1000)}m",
        }
        url = f"{self.base}/everything.chat.v1.ChatService/{method}"
        body = struct.pack(">BI", 0, len(request)) + request
        async with self.session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                # Envoy's own answers (no healthy upstream, overflow) carry a grpc-status too.
                code = _code_name(resp.headers["grpc-status"]) if "grpc-status" in resp.headers else ""
                detail = resp.headers.get("grpc-message", "") or (await resp.text())[:200]
                raise _GrpcWebError(code or f"HTTP_{resp.status}", f"HTTP {resp.status}: {detail}")
            if "grpc-status" in resp.headers:  # a trailers-only answer
                code = _code_name(resp.headers["grpc-status"])
                if code != "OK":
                    raise _GrpcWebError(code, resp.headers.get("grpc-message", ""))
                return
            buf = bytearray()
            status = None
            async for chunk in resp.content.iter_any():
                buf += chunk
                while len(buf) >= 5:
                    flag, length = struct.unpack_from(">BI", buf)
                    if len(buf) < 5 + length:
                        break
                    payload = bytes(buf[5 : 5 + length])
                    del buf[: 5 + length]
                    if flag & 0x80:
                        lines = payload.decode().split("\r\n")
                        trailers = dict(ln.split(":", 1) for ln in lines if ":" in ln)
                        status = trailers.get("grpc-status", "").strip()
                        if status != "0":
                            raise _GrpcWebError(_code_name(status), trailers.get("grpc-message", "").strip())
                    else:
                        yield payload
            if status is None:
                raise _GrpcWebError("NO_TRAILERS", "the response ended without grpc-status")

    def slot(self, i: int, rec: Recorder, prompt: str):
        from everything.chat.v1 import chat_service_pb2 as chat_pb

        token = self.spec["slots"][i]["token"]
        timeout = self.spec["stream_timeout"]

        async def one() -> bool:
            tk = None
            ok = refused = False
            attempt = time.perf_counter()  # the call in progress started then (for its latency)
            status = 0
            try:
                async with asyncio.timeout(timeout + DEADLINE_SLACK):
                    thread_id = ""
                    create = chat_pb.CreateThreadRequest(title="bench").SerializeToString()
                    async for payload in self.call("CreateThread", token, create):
                        thread_id = chat_pb.CreateThreadResponse.FromString(payload).thread.id
                    tk = Tokens(rec, rec.began())
                    attempt = tk.t0
                    req = chat_pb.SendMessageRequest(thread_id=thread_id, content=prompt).SerializeToString()
                    frames = self.call("SendMessage", token, req)
                    replies = (chat_pb.SendMessageResponse.FromString(payload) async for payload in frames)
                    status = await _read_reply(replies, tk, rec)
                    ok = status == COMPLETED
                if not ok:
                    rec.error(f"MESSAGE_STATUS_{status}", since=attempt)
            except _GrpcWebError as exc:
                ok = False
                refused = exc.code == REFUSED
                rec.error(exc.code, str(exc), since=attempt)
            except TimeoutError:
                ok = False
                rec.error("TIMEOUT", since=attempt)
            except Exception as exc:  # noqa: BLE001
                ok = False
                rec.error(type(exc).__name__, str(exc), since=attempt)
            if tk is None:
                rec.began()
            if tk is None or tk.last is None:
                rec.no_first_token += 1
            rec.ended(ok)
            return refused

        return one

    async def close(self) -> None:
        await self.session.close()


CLIENTS = {"openai": OpenAIClient, "grpc": GrpcClient, "grpcweb": GrpcWebClient, "unary": GrpcClient}


# -- the closed loop ------------------------------------------------------------------------------------


async def _run_slots(spec: dict[str, Any], rec: Recorder, ones: list) -> None:
    """Run every slot closed-loop in the window; at most `per_slot` calls per slot when given (a
    refused call does not count: the slot asks again while the window lasts). After a refusal a
    slot waits as long as the refusal's RetryInfo asks, else `refusal_backoff` seconds."""
    per_slot = spec.get("per_slot")
    ramp = spec.get("ramp", 0.0)
    backoff = spec.get("refusal_backoff", 0.0)
    rng = random.Random(os.getpid())

    async def loop(one) -> None:
        delay = rec.start + rng.uniform(0, ramp) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        done = 0
        while time.perf_counter() < rec.stop and (per_slot is None or done < per_slot):
            refused = await one()
            done += not refused
            # The server's RetryInfo when the client read it (a float), else the fixed back-off.
            wait = refused if type(refused) is float else backoff if refused else 0.0
            if wait > 0:
                await asyncio.sleep(min(wait, max(rec.stop - time.perf_counter(), 0.0)))

    sampler = asyncio.create_task(rec.sample_open())
    tasks = [asyncio.create_task(loop(one)) for one in ones]
    hard = spec["hard_stop"] - rec.off - time.perf_counter()
    _done, pending = await asyncio.wait(tasks, timeout=max(hard, 0.1))
    sampler.cancel()
    for t in pending:  # past the hard stop: whatever still runs is cut (counted as not completed)
        t.cancel()
    if pending:
        rec.error("HARD_STOP", f"{len(pending)} slots still running at the hard stop")
        await asyncio.wait(pending, timeout=5)


async def _main(spec: dict[str, Any], conn) -> dict[str, Any] | None:
    client = CLIENTS[spec["kind"]](spec)
    try:
        await client.setup()
        if spec["kind"] != "unary" and spec.get("warmup", True):
            await client.slot(0, _Null(), WARMUP_PROMPT)()
        conn.send({"ready": True})
        if not await asyncio.to_thread(conn.poll, 120):
            return None
        timing = conn.recv()
        rec = Recorder()
        rec.window(timing["start_at"], spec.get("ramp", 0.0), timing["stop_at"])
        spec.update(timing)
        if spec["kind"] == "unary":
            ones = [client.unary_slot(i, rec) for i in range(len(spec["slots"]))]
        else:
            ones = [client.slot(i, rec, spec["prompt"]) for i in range(len(spec["slots"]))]
        t0 = os.times()
        await _run_slots(spec, rec, ones)
        t1 = os.times()
        result = rec.result()
        result["cpu_s"] = (t1.user - t0.user) + (t1.system - t0.system)
        return result
    finally:
        await client.close()


def worker(spec: dict[str, Any], conn) -> None:
    """Entry point of a load generator process (multiprocessing, spawn): build the clients, warm
    up, say ready, get the window (start_at, stop_at, hard_stop), run it, answer the result (with
    this process's own CPU seconds in the window)."""
    try:
        result = asyncio.run(_main(spec, conn))
        if result is not None:
            conn.send({"ok": True, "result": result})
    except BaseException:  # noqa: BLE001 - reported to the orchestrator
        with contextlib.suppress(Exception):
            conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()
