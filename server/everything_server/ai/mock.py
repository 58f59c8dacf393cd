"""An OpenAI-compatible mock model server (aiohttp, HTTP/1.1 + SSE, loopback).

The server uses it when no API key is configured; tests and benchmarks use it as the upstream. It
speaks the real wire format, so the real `openai` SDK talks to it unchanged:

- ``POST /v1/chat/completions``: ``stream=true`` sends ``chat.completion.chunk`` SSE events (a first
  chunk with the role, one chunk per token, a chunk with ``finish_reason``, a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``); ``stream=false`` answers one
  ``chat.completion`` with usage.
- ``POST /v1/images/generations``: real PNG bytes of the requested size (a deterministic pattern) as
  ``b64_json`` (or a ``url`` served by the mock with ``response_format=url``); ``stream=true`` sends
  ``image_generation.partial_image`` events then ``image_generation.completed``, as gpt-image-1 does.
- ``GET /v1/models``: the configured models.

Replies are deterministic: the words are drawn from a fixed vocabulary by a PRNG seeded with the
model and the last user message (without its directives), so a 5-token reply is a prefix of the
10-token reply to the same message. ``max_tokens``/``max_completion_tokens`` truncate the reply with
``finish_reason="length"``. ``prompt_tokens`` is estimated (about 4 characters per token).

Directives
----------
End-to-end tests (browser, grpcurl, server subprocesses) steer the mock from the text they send:
directives go in the LAST user message (chat) or in the prompt (images), anywhere in the text::

    [mock:tokens=50 rate=20]              50 tokens at 20 tokens/s (rate=0: as fast as possible)
    [mock:delay=0.5]                      wait 0.5 s before answering at all (before the headers)
    [mock:stall]                          send the headers and the role chunk, then nothing, until the
                                          client goes away (recorded as an abort)
    [mock:stall-after=3]                  send 3 tokens (images: 3 partial images), then stall
    [mock:status=429 retry-after=2]       answer HTTP 429 with `retry-after: 2`
    [mock:status=500]                     answer HTTP 500 (any 400-599; 404 says `model_not_found`)
    [mock:status=503 times=1]             fail only the first request carrying this directive, then
                                          answer normally (to exercise retries)
    [mock:malformed-after=2]              after 2 tokens send a chunk that is not JSON, then end
    [mock:cut-after=4]                    after 4 tokens close the TCP connection mid-body (the
                                          chunked body never terminates)
    [mock:echo]                           reply with a JSON text describing what was received:
                                          model, temperature, max_tokens, system prompt, messages
    [mock:text="Hello there"]             reply with exactly this text (one token per word)
    [mock:image-delay=0.2]                images: seconds per generation step
    [mock:url]                            images: answer with a `url` (served by the mock) even when
                                          `b64_json` was asked for, as DALL·E-style servers do

Several items go in one directive separated by spaces, or in several directives. Unknown keys get
an HTTP 400 so a typo fails loudly. Programmatic control does the same without touching the text:
``mock.enqueue(Behaviour(status=429, retry_after=1))`` applies to the next generation request
(each enqueued behaviour is used once), ``mock.defaults`` is the mutable base. Precedence: directive
> enqueued behaviour > defaults.

Records
-------
``mock.requests`` holds every request seen (path, headers without credentials, parsed JSON body, a
fingerprint of the bearer key). ``mock.aborts`` gets a record each time a client goes away before a
response was finished (aiohttp cancels the handler when the peer disconnects; the handler records
it on the way out), so tests can prove that a cancel reached the upstream: see ``wait_for_abort``.

Run it on its own::

    python -m everything_server.ai.mock --host 127.0.0.1 --port 8000 --tokens 200 --rate 0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from everything_server.ai.png import MAX_SIDE, pattern_png

log = logging.getLogger(__name__)

DEFAULT_CHAT_MODEL = "gpt-4o-mini"
DEFAULT_IMAGE_MODEL = "gpt-image-1"
DEFAULT_MODELS = (DEFAULT_CHAT_MODEL, "gpt-4o", "gpt-4.1-mini", DEFAULT_IMAGE_MODEL, "dall-e-3")

_VOCABULARY = (
    "the a model answer token stream light river mountain quiet signal garden window paper stone "
    "bright simple careful useful early later small large green blue golden silver idea question "
    "story number pattern system message reply thought moment little every another through around "
    "between under over before after while because although maybe surely clearly gently quickly "
    "slowly together alone again always never often sometimes here there now then"
).split()

_DIRECTIVE = re.compile(r"\[mock:([^\]]*)\]")
_ITEM = re.compile(r'([a-z][a-z-]*)(?:=("[^"]*"|\S+))?')
_PIECES = re.compile(r"\s*\S+|\s+$")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass
class Behaviour:
    """How the mock answers. `None` means "inherit" (directive > enqueued > defaults)."""

    tokens: int | None = None  # reply length in tokens (one word per chunk)
    rate: float | None = None  # tokens per second; 0 = as fast as possible
    delay: float | None = None  # seconds before answering (before the response headers)
    text: str | None = None  # fixed reply text instead of generated words
    echo: bool | None = None  # reply with a JSON description of the request
    stall: bool | None = None  # stop sending (after `stall_after` tokens) until the client goes
    stall_after: int | None = None
    status: int | None = None  # answer with this HTTP error status
    retry_after: float | None = None  # `retry-after` header for the error
    times: int | None = None  # apply `status` only to the first N requests with this directive
    malformed_after: int | None = None  # send a non-JSON chunk after N tokens, then end
    cut_after: int | None = None  # close the connection after N tokens
    image_delay: float | None = None  # seconds per image generation step
    image_url: bool | None = None  # answer images with a URL even when b64_json was asked for

    def over(self, base: Behaviour) -> Behaviour:
        """This behaviour's set fields on top of `base`."""
        changes = {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}
        return dataclasses.replace(base, **changes)


def default_behaviour(tokens: int = 20, rate: float = 0.0, image_delay: float = 0.02) -> Behaviour:
    return Behaviour(tokens=tokens, rate=rate, delay=0.0, echo=False, stall=False, image_delay=image_delay)


class DirectiveError(ValueError):
    pass


_DIRECTIVE_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "tokens": ("tokens", int),
    "rate": ("rate", float),
    "delay": ("delay", float),
    "text": ("text", str),
    "echo": ("echo", bool),
    "stall": ("stall", bool),
    "stall-after": ("stall_after", int),
    "status": ("status", int),
    "retry-after": ("retry_after", float),
    "times": ("times", int),
    "malformed-after": ("malformed_after", int),
    "cut-after": ("cut_after", int),
    "image-delay": ("image_delay", float),
    "url": ("image_url", bool),
}


def parse_directives(text: str) -> tuple[Behaviour, str, str]:
    """Split `[mock:...]` directives out of `text`: (behaviour, text without them, the raw directives)."""
    found = _DIRECTIVE.findall(text)
    if not found:
        return Behaviour(), text, ""
    values: dict[str, Any] = {}
    for body in found:
        for key, raw in _ITEM.findall(body):
            if key not in _DIRECTIVE_KEYS:
                raise DirectiveError(f"unknown mock directive {key!r}")
            name, kind = _DIRECTIVE_KEYS[key]
            if kind is bool:
                values[name] = raw.lower() not in ("0", "false", "no") if raw else True
                continue
            if not raw:
                raise DirectiveError(f"mock directive {key!r} needs a value")
            try:
                values[name] = kind(raw[1:-1] if raw.startswith('"') else raw)
            except ValueError:
                raise DirectiveError(f"bad value for mock directive {key!r}") from None
    if "stall_after" in values:
        values.setdefault("stall", True)
    status = values.get("status")
    if status is not None and not 400 <= status <= 599:
        raise DirectiveError("mock status must be between 400 and 599")
    clean = _DIRECTIVE.sub("", text).strip()
    return Behaviour(**values), clean, "".join(found)


def split_pieces(text: str) -> list[str]:
    """Split text into word tokens that concatenate back to exactly `text`."""
    return _PIECES.findall(text)


def generated_tokens(seed: str, count: int) -> list[str]:
    """`count` deterministic word tokens for `seed`; a shorter reply is a prefix of a longer one."""
    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    tokens: list[str] = []
    capital = True
    for i in range(count):
        word = rng.choice(_VOCABULARY)
        end = rng.random() < 0.12
        word = word.capitalize() if capital else word
        tokens.append(("" if i == 0 else " ") + word + ("." if end else ""))
        capital = end
    return tokens


def estimate_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def key_fingerprint(api_key: str) -> str:
    """How the mock records a key: a short hash, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass
class RecordedRequest:
    index: int
    method: str
    path: str
    headers: dict[str, str]  # without Authorization / api-key
    body: Any  # the parsed JSON body (None when there was none)
    api_key_fingerprint: str | None  # key_fingerprint() of the bearer token, if any
    received_at: float = field(default_factory=time.time)


@dataclass
class AbortRecord:
    """A client went away before the response was complete."""

    request_index: int
    path: str
    model: str | None
    sent: int  # tokens (chat) or partial images (images) sent before the client went away
    text: str  # the reply text sent so far (chat)
    at: float = field(default_factory=time.time)


class _Stream:
    """Per-response state the handler keeps so its `finally` knows whether this was an abort."""

    __slots__ = ("done", "sent", "text")

    def __init__(self) -> None:
        self.done = False
        self.sent = 0
        self.text: list[str] = []


def _error_body(status: int, message: str, model: str | None, param: str | None = None) -> dict[str, Any]:
    kind, code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "unsupported_country_region_territory"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error", None))
    if status == 404 and model:
        message = f"The model `{model}` does not exist or you do not have access to it."
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    *,
    model: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return web.Response(
        status=status,
        body=orjson.dumps(_error_body(status, message, model, param)),
        content_type="application/json",
        headers=headers,
    )


_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_MALFORMED = b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": \n\n'


class MockModelServer:
    """The mock server. `async with MockModelServer() as mock:` or `start()`/`stop()`;
    `start_in_thread()`/`stop_thread()` run it on its own loop in a background thread."""

    def __init__(
        self,
        *,
        tokens: int = 20,
        rate: float = 0.0,
        image_delay: float = 0.02,
        models: tuple[str, ...] = DEFAULT_MODELS,
        record: bool = True,
        max_records: int = 10_000,
    ) -> None:
        self.defaults = default_behaviour(tokens=tokens, rate=rate, image_delay=image_delay)
        self.models = list(models)
        self.record = record
        self.max_records = max_records
        self.requests: list[RecordedRequest] = []
        self.aborts: list[AbortRecord] = []
        self._queue: list[Behaviour] = []
        self._lock = threading.Lock()  # the queue and the records are touched from other threads
        self._times: dict[tuple[str, str], int] = {}
        self._files: dict[str, bytes] = {}
        self._counter = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._host = "127.0.0.1"
        self._port = 0
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if self._port == 0:
            raise RuntimeError("the mock server is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._tracked(self._chat))
        app.router.add_post("/v1/images/generations", self._tracked(self._images))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/mock/files/{name}", self._file)
        return app

    def _tracked(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def run(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            try:
                return await handler(request)
            finally:
                self._inflight.discard(task)

        return run

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> str:
        if self._runner is not None:
            raise RuntimeError("the mock server is already started")
        self._stopping = False
        # handler_cancellation: aiohttp cancels a handler when its client disconnects, which is how
        # a stalled or slow stream notices (and records) the abort.
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        # A large backlog so a benchmark opening 1,000 connections at once is not throttled by SYN retries.
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port or None)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = runner.addresses[0][1]  # the real port when 0 was asked for
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stopping = True  # handlers cancelled by the shutdown are not client aborts
            # Cancel streams in flight (stalled ones never end) instead of waiting out aiohttp's grace.
            for task in list(self._inflight):
                task.cancel()
            await runner.cleanup()
            self._port = 0

    async def __aenter__(self) -> MockModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 10.0) -> str:
        """Start on a new event loop in a daemon thread (for sync callers); returns the base URL."""
        if self._thread is not None:
            raise RuntimeError("the mock server already runs in a thread")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name="mock-model-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the mock server did not start in time")
        if failure:
            self._thread = None
            raise failure[0]
        return self.base_url

    def stop_thread(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._thread_loop = None

    # -- control and records -------------------------------------------------------------------------

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Use these behaviours, in order, for the next generation requests (one each)."""
        with self._lock:
            self._queue.extend(behaviours)

    def reset(self) -> None:
        """Forget records, queued behaviours and `times` counters (the defaults stay)."""
        with self._lock:
            self.requests.clear()
            self.aborts.clear()
            self._queue.clear()
            self._times.clear()
            self._files.clear()

    # A `timeout` argument (not asyncio.timeout) because callers in other threads and loops use it.
    async def wait_for_abort(self, timeout: float = 5.0, *, count: int = 1) -> AbortRecord:  # noqa: ASYNC109
        """Wait until at least `count` aborts are recorded; returns the `count`-th. Raises TimeoutError.

        Polls, so it works from any event loop (also while the mock runs in another thread)."""
        return await self._wait(
            lambda: self.aborts[count - 1] if len(self.aborts) >= count else None, timeout
        )

    async def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> RecordedRequest:  # noqa: ASYNC109
        """Wait until at least `count` requests are recorded; returns the `count`-th."""
        return await self._wait(
            lambda: self.requests[count - 1] if len(self.requests) >= count else None, timeout
        )

    def wait_for_abort_blocking(self, timeout: float = 5.0, *, count: int = 1) -> AbortRecord:
        deadline = time.monotonic() + timeout
        while len(self.aborts) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no client abort recorded within {timeout}s")
            time.sleep(0.01)
        return self.aborts[count - 1]

    @staticmethod
    async def _wait(probe: Callable[[], Any], timeout: float) -> Any:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while (found := probe()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mock did not see it within {timeout}s")
            await asyncio.sleep(0.01)
        return found

    def _record(self, request: web.Request, body: Any) -> RecordedRequest:
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("authorization", "api-key")}
        rec = RecordedRequest(
            index=next(self._counter),
            method=request.method,
            path=request.path,
            headers=headers,
            body=body,
            api_key_fingerprint=key_fingerprint(token) if token else None,
        )
        if self.record:
            with self._lock:
                self.requests.append(rec)
                if len(self.requests) > self.max_records:
                    del self.requests[: len(self.requests) - self.max_records]
        return rec

    def _abort(self, rec: RecordedRequest, model: str | None, state: _Stream) -> None:
        if state.done or self._stopping:
            return
        with self._lock:
            self.aborts.append(AbortRecord(rec.index, rec.path, model, state.sent, "".join(state.text)))

    def _resolve(self, directives: Behaviour, raw: str, path: str) -> Behaviour:
        with self._lock:
            queued = self._queue.pop(0) if self._queue else Behaviour()
            b = directives.over(queued.over(self.defaults))
            if b.status is not None and b.times is not None:
                # `times` counts requests carrying the same directive text: fail the first N only.
                key = (path, raw)
                seen = self._times[key] = self._times.get(key, 0) + 1
                if seen > b.times:
                    b = dataclasses.replace(b, status=None)
        return b

    async def _read_json(self, request: web.Request) -> tuple[Any, RecordedRequest]:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        return body, self._record(request, body)

    # -- handlers ---------------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        created = 1_700_000_000
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "everything-mock"}
            for m in self.models
        ]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def _file(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"])
        if data is None:
            return _error(404, "no such file")
        return web.Response(body=data, content_type="image/png")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, rec = await self._read_json(request)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", param="model")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "messages must be a non-empty array of objects", param="messages")
        last_user = next(
            (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        try:
            directives, clean, raw = parse_directives(last_user)
        except DirectiveError as exc:
            return _error(400, str(exc), param="messages")
        b = self._resolve(directives, raw, request.path)

        state = _Stream()
        try:
            if b.delay:
                await asyncio.sleep(b.delay)
            if b.status is not None:
                state.done = True
                return _error(b.status, f"mock error {b.status}", model=model, retry_after=b.retry_after)

            if b.text is not None:
                tokens = split_pieces(b.text)
            elif b.echo:
                tokens = split_pieces(self._echo(body, messages))
            else:
                tokens = generated_tokens(f"{model}\n{clean}", max(0, b.tokens or 0))
            finish = "stop"
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            if isinstance(limit, int) and 0 < limit < len(tokens):
                tokens, finish = tokens[:limit], "length"
            prompt_tokens = sum(estimate_tokens(message_text(m.get("content"))) + 3 for m in messages)

            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return await self._stream_chat(
                    request, rec, b, model, tokens, finish, prompt_tokens, include_usage, state
                )
            return await self._complete_chat(request, rec, b, model, tokens, finish, prompt_tokens, state)
        except (asyncio.CancelledError, ConnectionError):
            self._abort(rec, model, state)
            raise

    def _echo(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> str:
        system = "\n".join(
            message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
        )
        return orjson.dumps(
            {
                "model": body.get("model"),
                "temperature": body.get("temperature"),
                "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                "system": system or None,
                "messages": [
                    {"role": m.get("role"), "content": message_text(m.get("content"))} for m in messages
                ],
            }
        ).decode()

    async def _stream_chat(
        self,
        request: web.Request,
        rec: RecordedRequest,
        b: Behaviour,
        model: str,
        tokens: list[str],
        finish: str,
        prompt_tokens: int,
        include_usage: bool,
        state: _Stream,
    ) -> web.StreamResponse:
        chunk_id = f"chatcmpl-mock{rec.index:010d}"
        head = (
            b'data: {"id":"' + chunk_id.encode() + b'","object":"chat.completion.chunk","created":'
            + str(int(time.time())).encode() + b',"model":' + orjson.dumps(model)
            + b',"system_fingerprint":"fp_mock","choices":[{"index":0,"delta":'
        )  # fmt: skip
        tail = b',"logprobs":null,"finish_reason":null}]' + (
            b',"usage":null}\n\n' if include_usage else b"}\n\n"
        )

        resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": f"req_mock_{rec.index}"})
        await resp.prepare(request)
        await resp.write(head + b'{"role":"assistant","content":""}' + tail)

        stall_at = (b.stall_after or 0) if b.stall else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, token in enumerate(tokens):
            if await self._fault(request, resp, b, i, stall_at, _MALFORMED, state):
                return resp
            if b.rate:
                # An absolute schedule, so the rate holds however long each write took.
                wait = start + i / b.rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await resp.write(head + b'{"content":' + orjson.dumps(token) + b"}" + tail)
            state.sent += 1
            state.text.append(token)
        if await self._fault(request, resp, b, len(tokens), stall_at, _MALFORMED, state):
            return resp

        final = head + b'{},"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]'
        final += b',"usage":null}\n\n' if include_usage else b"}\n\n"
        # Done from here on: a client that hangs up after reading [DONE] is not an abort.
        state.done = True
        if include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
            final += (
                head[: head.index(b'"choices"')] + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"
            )
        await resp.write(final + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _fault(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        b: Behaviour,
        step: int,
        stall_at: int | None,
        malformed: bytes,
        state: _Stream,
    ) -> bool:
        """Apply a stall, cut or malformed chunk due at `step`; True when the response is over."""
        if stall_at is not None and step == stall_at:
            await asyncio.Event().wait()  # until the client goes away (the handler is cancelled)
        if b.malformed_after is not None and step == b.malformed_after:
            await resp.write(malformed)
            state.done = True
            await resp.write_eof()
            return True
        if b.cut_after is not None and step == b.cut_after:
            # close() flushes what was written, then FIN: the client sees a chunked body that never
            # ends (deterministic partial text, unlike an RST that may discard unread data).
            state.done = True
            if request.transport is not None:
                request.transport.close()
            return True
        return False

    async def _complete_chat(
        self,
        request: web.Request,
        rec: RecordedRequest,
        b: Behaviour,
        model: str,
        tokens: list[str],
        finish: str,
        prompt_tokens: int,
        state: _Stream,
    ) -> web.StreamResponse:
        if b.stall:
            await asyncio.Event().wait()
        if b.rate and tokens:
            await asyncio.sleep(len(tokens) / b.rate)
        if b.cut_after is not None:
            state.done = True
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        if b.malformed_after is not None:
            state.done = True
            return web.Response(
                body=b'{"id": "chatcmpl-broken", "choices": [', content_type="application/json"
            )
        text = "".join(tokens)
        completion = {
            "id": f"chatcmpl-mock{rec.index:010d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }
        state.sent, state.done = len(tokens), True
        return web.Response(
            body=orjson.dumps(completion),
            content_type="application/json",
            headers={"x-request-id": f"req_mock_{rec.index}"},
        )

    async def _images(self, request: web.Request) -> web.StreamResponse:
        body, rec = await self._read_json(request)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        model = body.get("model") or DEFAULT_IMAGE_MODEL
        if not isinstance(prompt, str) or not prompt.strip():
            return _error(400, "prompt must be a non-empty string", param="prompt")
        size = body.get("size") or "auto"
        match = _SIZE.match("1024x1024" if size == "auto" else str(size))
        width, height = (int(match[1]), int(match[2])) if match else (0, 0)
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return _error(400, f"invalid size {size!r}: use WIDTHxHEIGHT or auto", param="size")
        n = body.get("n") or 1
        partials = body.get("partial_images") or 0
        fmt = body.get("response_format") or "b64_json"
        if not isinstance(n, int) or not 1 <= n <= 10:
            return _error(400, "n must be between 1 and 10", param="n")
        if not isinstance(partials, int) or not 0 <= partials <= 3:
            return _error(400, "partial_images must be between 0 and 3", param="partial_images")
        if fmt not in ("b64_json", "url"):
            return _error(400, "response_format must be b64_json or url", param="response_format")
        try:
            directives, clean, raw = parse_directives(prompt)
        except DirectiveError as exc:
            return _error(400, str(exc), param="prompt")
        b = self._resolve(directives, raw, request.path)

        state = _Stream()
        try:
            if b.delay:
                await asyncio.sleep(b.delay)
            if b.status is not None:
                state.done = True
                return _error(b.status, f"mock error {b.status}", model=model, retry_after=b.retry_after)
            seed = f"{model}\n{clean}"
            size_text = f"{width}x{height}"
            usage = {
                "input_tokens": estimate_tokens(clean),
                "input_tokens_details": {"text_tokens": estimate_tokens(clean), "image_tokens": 0},
                "output_tokens": width * height // 1024 + 16,
            }
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size_text}
            step = b.image_delay or 0.0

            if body.get("stream"):
                resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": f"req_mock_{rec.index}"})
                await resp.prepare(request)
                stall_at = (b.stall_after or 0) if b.stall else None
                malformed = b"event: image_generation.partial_image\ndata: {not json\n\n"
                for k in range(partials + 1):
                    if await self._fault(request, resp, b, k, stall_at, malformed, state):
                        return resp
                    await asyncio.sleep(step)
                    reveal = (k + 1) / (partials + 1)
                    png = await asyncio.to_thread(pattern_png, width, height, seed=seed, reveal=reveal)
                    event: dict[str, Any] = {
                        "b64_json": base64.b64encode(png).decode(),
                        "created_at": int(time.time()),
                    }
                    if k < partials:
                        name = "image_generation.partial_image"
                        event.update(type=name, partial_image_index=k, **common)
                    else:
                        name = "image_generation.completed"
                        event.update(type=name, usage=usage, **common)
                    state.done = k == partials
                    await resp.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
                    state.sent += 1
                await resp.write_eof()
                return resp

            if b.stall:
                await asyncio.Event().wait()
            await asyncio.sleep(step * (partials + 1))
            data = []
            for i in range(n):
                png = await asyncio.to_thread(pattern_png, width, height, seed=f"{seed}\n{i}" if i else seed)
                if fmt == "url" or b.image_url:
                    name = f"{rec.index}-{i}.png"
                    self._files[name] = png
                    item = {"url": f"{request.url.origin()}/v1/mock/files/{name}"}
                else:
                    item = {"b64_json": base64.b64encode(png).decode()}
                if clean != prompt:
                    item["revised_prompt"] = clean
                data.append(item)
            if b.cut_after is not None:
                state.done = True
                if request.transport is not None:
                    request.transport.close()
                return web.Response()
            state.done = True
            if b.malformed_after is not None:
                return web.Response(body=b'{"created": 1, "data": [', content_type="application/json")
            result = {"created": int(time.time()), "data": data, **common, "usage": usage}
            return web.Response(
                body=orjson.dumps(result),
                content_type="application/json",
                headers={"x-request-id": f"req_mock_{rec.index}"},
            )
        except (asyncio.CancelledError, ConnectionError):
            self._abort(rec, model, state)
            raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m everything_server.ai.mock", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per reply (default 20)")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens per second, 0 = as fast as possible")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--image-delay", type=float, default=0.02, help="seconds per image generation step")
    parser.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT, to run several processes")
    parser.add_argument("--no-record", action="store_true", help="keep no request records (long benchmarks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def serve() -> None:
        mock = MockModelServer(
            tokens=args.tokens, rate=args.rate, image_delay=args.image_delay, record=not args.no_record
        )
        mock.defaults.delay = args.delay
        await mock.start(args.host, args.port, reuse_port=args.reuse_port)
        print(mock.base_url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await mock.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
