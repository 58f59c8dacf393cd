"""The AI provider: one small module around `openai.AsyncOpenAI`, for OpenAI and any OpenAI-compatible
server (vLLM, Ollama, LM Studio, the project's own mock).

Why raw streaming: the SDK's typed stream builds a pydantic object for every chunk (about 210 µs
each, most of a relay's CPU; see the performance issue). We keep the SDK for what it is good at
(auth, base URL, headers, retries of the initial request, error classes) through
`with_streaming_response`, and parse the SSE bytes ourselves with orjson.

Transports (`transport=`; tests run all three): "native", the default, sends chat streams through
`http1.Http1Transport`, which hands each body chunk to the SSE parser from the socket's read, with no
async iterator and no task wake-up per chunk (`relay_chat` is push-based for that reason: the text
goes to a callback), and everything else through the SDK's aiohttp adapter
(`openai.DefaultAioHttpClient`, a third of the CPU per chunk of the SDK's default httpx2 transport).
"aiohttp" and "httpx" use that one transport for everything, the stream's body pulled chunk by chunk.
A proxy configured in the environment makes "native" streams go through aiohttp too (http1 speaks no
proxy protocol).

Timeouts: `openai_timeout_seconds` is the SDK/httpx timeout for each operation of a non-streamed
request (connect uses `openai_connect_timeout_seconds`). For chat streams the read timeout is the
stall timeout instead: the time allowed between two reads from the socket, which is exactly
"the stream sent nothing for this long" and costs nothing per chunk. There is no total deadline on a
stream; the caller's deadline (a gRPC deadline, a cancel) ends it by cancelling the task. Image
generation is slow between steps, so it keeps `openai_timeout_seconds` as its read timeout.

Cancellation: cancelling a task in `relay_chat` closes the HTTP response (in a `finally`), which
closes the TCP connection, so the upstream stops generating (and billing). `generate_image` is an
async generator holding the response in `async with`: its consumers use `contextlib.aclosing(...)`
so that closing happens at once, not when the generator is garbage collected.

Errors become domain errors (`everything_server.errors`), raised after whatever text was already
yielded (the caller keeps the partial reply):

- 429 → ResourceExhausted(reason="UPSTREAM_RATE_LIMITED", retry_after=from `retry-after[-ms]`)
- 5xx, connection refused/reset, a stream cut before it ended → Unavailable("UPSTREAM_UNAVAILABLE")
- timeouts, a stalled stream, 408 → DeadlineExceeded("UPSTREAM_TIMEOUT")
- a chunk or body that is not the expected JSON → Unavailable("UPSTREAM_BAD_RESPONSE")
- 404 `model_not_found` or a 400/404 whose `param` is `model` → InvalidArgument("model"): the model
  name is the one input of ours the upstream judges, and it usually comes from the user's preferences,
  so the caller can tell the user. Every other 4xx (bad key, bad parameters) is our configuration's
  fault, not the user's → Unavailable("UPSTREAM_BAD_RESPONSE"), logged with the upstream message.

Client messages never include the upstream's error text (it can name accounts or organisations);
the HTTP status goes into the error's metadata as `upstream_status`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import httpx2  # the HTTP client the openai SDK is built on (its exceptions surface from raw streams)
import openai
import orjson
from opentelemetry import trace

from everything_server.ai.http1 import PUSH, Http1Transport
from everything_server.errors import (
    DeadlineExceeded,
    DomainError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from everything_server.config import Settings

log = logging.getLogger(__name__)

# After `data: [DONE]` only the end of the HTTP body is left; read it (briefly) so the connection
# goes back to the pool instead of being closed, which for TLS upstreams saves a handshake per reply.
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ChatEnd:
    """How a streamed reply ended: the finish reason and the usage the upstream reported (if any)."""

    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class ImagePartial:
    index: int
    data: bytes = field(repr=False)  # the encoded image (PNG from gpt-image-1 and the mock)


@dataclass(frozen=True, slots=True)
class ImageCompleted:
    data: bytes = field(repr=False)
    revised_prompt: str | None = None
    usage: Usage | None = None


ImageEvent = ImagePartial | ImageCompleted


class _BadResponse(Exception):
    """The upstream answered something that is not the OpenAI wire format."""


class _StreamFailed(Exception):
    """The upstream reported an error inside a stream, or ended it early."""


class _SSEDecoder:
    """Server-sent events from raw bytes: yields (event name, data) per event.

    Lines end in LF or CRLF; comments (keep-alives) and `id`/`retry` fields are ignored; an event
    not terminated by a blank line when the body ends is dropped, as the SSE spec says."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        lines = (self._buffer + chunk if self._buffer else chunk).split(b"\n")
        self._buffer = lines.pop()
        events: list[tuple[str | None, bytes]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                self._event, self._data = None, []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode("utf-8", "replace")
        return events


def _json(data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _BadResponse("the model upstream sent data that is not JSON") from None
    if not isinstance(obj, dict):
        raise _BadResponse("the model upstream sent JSON that is not an object")
    if obj.get("error"):
        raise _StreamFailed("the model upstream reported an error")
    return obj


def _usage(
    raw: Any, prompt_key: str = "prompt_tokens", completion_key: str = "completion_tokens"
) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    return Usage(int(raw.get(prompt_key) or 0), int(raw.get(completion_key) or 0))


def _chat_delta(data: bytes) -> tuple[str, str | None, Usage | None]:
    """One `chat.completion.chunk` → (text, finish_reason, usage); the role chunk carries none."""
    obj = _json(data)
    try:
        text, finish = "", None
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta:
                text = delta.get("content") or ""
            finish = choice.get("finish_reason")
        usage = _usage(obj.get("usage"))
    except (AttributeError, TypeError, ValueError, IndexError):
        raise _BadResponse("the model upstream sent a chunk of an unexpected shape") from None
    return text, finish, usage


class _ChatStream:
    """The SSE body of one chat stream, fed chunk by chunk (pushed by http1 or pulled from httpx):
    text goes to `on_text` as it comes; `first` is called once, before the first text."""

    __slots__ = ("_decoder", "done", "finish", "first", "on_done", "on_text", "usage")

    def __init__(self, on_text: Callable[[str], object], first: Callable[[], object] | None) -> None:
        self._decoder = _SSEDecoder()
        self.on_text = on_text
        self.first = first
        self.on_done: Callable[[], object] | None = None  # called when `data: [DONE]` came
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        for _event, data in self._decoder.feed(chunk):
            if self.done:
                return
            if data == b"[DONE]":
                self.done = True
                if self.on_done is not None:
                    self.on_done()
                return
            text, finish, usage = _chat_delta(data)
            if text:
                if self.first is not None:
                    self.first, first = None, self.first
                    first()
                self.on_text(text)
            if finish is not None:
                self.finish = finish
            if usage is not None:
                self.usage = usage


def _retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (a number or an HTTP date), if any."""
    with contextlib.suppress(ValueError, TypeError):
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(ValueError, TypeError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _transport_failure(exc: BaseException | None) -> str | None:
    """ "timeout" or "connection", judged by the deepest cause in the chain that tells.

    The top of the chain is not enough: the SDK's aiohttp adapter reports every aiohttp connection
    error (a refused connection too) as `httpx2.ConnectTimeout`, which the SDK turns into
    `APITimeoutError`; the original aiohttp/OS error is kept as the cause."""
    kind = None
    while exc is not None:
        # TimeoutError first: it is an OSError, and aiohttp's timeouts are also ClientErrors.
        if isinstance(exc, TimeoutError | httpx2.TimeoutException | openai.APITimeoutError):
            kind = "timeout"
        elif isinstance(
            exc, OSError | aiohttp.ClientError | httpx2.TransportError | openai.APIConnectionError
        ):
            kind = "connection"
        exc = exc.__cause__
    return kind


def _map_error(exc: Exception, model: str | None) -> DomainError:
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        err: DomainError
        if status == 429:
            err = ResourceExhausted(
                "the model provider is rate limiting requests",
                reason="UPSTREAM_RATE_LIMITED",
                retry_after=_retry_after(exc.response.headers),
            )
        elif status >= 500:
            err = Unavailable(
                f"the model provider failed (HTTP {status})", retry_after=_retry_after(exc.response.headers)
            )
        elif status == 408:
            err = DeadlineExceeded("the model provider timed out")
        elif exc.code == "model_not_found" or (status in (400, 404) and exc.param == "model"):
            err = InvalidArgument("model", f"the model {model!r} is not available")
        else:
            log.warning(
                "model upstream rejected a request: HTTP %s %s/%s: %.300s",
                status,
                exc.type,
                exc.code,
                exc.message,
            )
            err = Unavailable(
                f"the model provider rejected the request (HTTP {status})", reason="UPSTREAM_BAD_RESPONSE"
            )
        err.metadata["upstream_status"] = str(status)
        return err
    failure = _transport_failure(exc)
    if failure == "timeout":
        return DeadlineExceeded("the model provider did not answer in time", reason="UPSTREAM_TIMEOUT")
    if failure == "connection" or isinstance(exc, _StreamFailed):
        return Unavailable("the model provider connection failed", reason="UPSTREAM_UNAVAILABLE")
    return Unavailable("the model provider sent an invalid response", reason="UPSTREAM_BAD_RESPONSE")


@contextlib.contextmanager
def _upstream_errors(model: str | None) -> Iterator[None]:
    """Turn SDK, HTTP and parsing failures into domain errors (cancellation passes through)."""
    try:
        yield
    except DomainError:
        raise
    except (
        openai.APIError,
        httpx2.HTTPError,
        aiohttp.ClientError,
        _BadResponse,
        _StreamFailed,
        binascii.Error,
    ) as exc:
        raise _map_error(exc, model) from exc


async def _drain(body: AsyncIterator[bytes]) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in body:
                pass


def _proxied(scheme: str, host: str) -> bool:
    """Whether the environment routes requests to `host` through a proxy (HTTP(S)_PROXY, NO_PROXY)."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(host)


class ChatProvider:
    """Chat, titles, images and model listing against one OpenAI-compatible upstream."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        stall_timeout: float = 30.0,
        max_retries: int = 2,
        chat_model: str = "gpt-4o-mini",
        image_model: str = "gpt-image-1",
        transport: Literal["native", "aiohttp", "httpx"] = "native",
    ) -> None:
        self.chat_model = chat_model
        self.image_model = image_model
        self.metrics = None  # a metrics.Metrics, set by the container
        self.tracer: trace.Tracer = trace.NoOpTracer()  # set by the container when tracing is on
        default_timeout = openai.Timeout(timeout, connect=connect_timeout)
        self._stream_timeout = openai.Timeout(timeout, connect=connect_timeout, read=stall_timeout)
        # Our own client instance (with the SDK's defaults) so image URLs are fetched with the same
        # pool, without the SDK adding our API key to a request for someone else's host.
        # The SDK's aiohttp transport costs about a third of the CPU per streamed chunk of its default
        # httpx2/httpcore2 transport (measured: ~22 vs ~62 µs per chunk read on loopback).
        if transport == "httpx":
            self._http = openai.DefaultAsyncHttpxClient(timeout=default_timeout)
        else:
            self._http = openai.DefaultAioHttpClient(timeout=default_timeout)
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=default_timeout,
            max_retries=max_retries,
            http_client=self._http,
        )
        # Chat streams: the same SDK client (auth, base URL, retries) over http1 (see the module's
        # docstring), unless another transport was asked for or a proxy is in the way.
        self._streams = self._client
        self._stream_headers: dict[str, str] = {}
        url = self._client.base_url
        if transport == "native" and not _proxied(url.scheme, url.host):
            self._streams = self._client.copy(
                http_client=httpx2.AsyncClient(
                    transport=Http1Transport(), timeout=default_timeout, trust_env=False
                )
            )
            # A pushed body is handed on as it comes: no content decoding on the way.
            self._stream_headers = {"Accept-Encoding": "identity"}
        # OpenAI's own API wants `max_completion_tokens` (reasoning models reject `max_tokens`);
        # compatible servers have long understood `max_tokens` and not all know the new name.
        self._max_tokens_key = (
            "max_completion_tokens" if self._client.base_url.host == "api.openai.com" else "max_tokens"
        )

    @classmethod
    def from_settings(cls, settings: Settings, base_url_override: str | None = None) -> ChatProvider:
        base_url = base_url_override or settings.openai_base_url
        if base_url is None and settings.openai_api_key is None:
            raise ValueError(
                "no OPENAI_API_KEY or OPENAI_BASE_URL: start the mock model server and pass its base_url"
            )
        # Local OpenAI-compatible servers need no key, but the SDK insists on one.
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "no-key"
        return cls(
            api_key=api_key,
            base_url=base_url,
            timeout=settings.openai_timeout_seconds,
            connect_timeout=settings.openai_connect_timeout_seconds,
            stall_timeout=settings.openai_stall_timeout_seconds,
            max_retries=settings.openai_max_retries,
            chat_model=settings.chat_model,
            image_model=settings.image_model,
            transport=settings.openai_transport,
        )

    @property
    def client(self) -> openai.AsyncOpenAI:
        return self._client

    @property
    def native_streams(self) -> bool:
        """Whether chat streams go through http1 (see the module's docstring)."""
        return self._streams is not self._client

    @property
    def base_url(self) -> str:
        return str(self._client.base_url)

    def _chat_body(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        temperature: float | None,
        max_tokens: int | None,
        *,
        stream: bool,
    ) -> dict[str, Any]:
        """The request body, already in its wire shape. It goes out as it is through the SDK's own
        `post` (its auth, base URL, retries and timeouts): `chat.completions.create` would first
        walk every parameter and message against its TypedDicts (measured: 0.15 ms per request
        with one message, ~110 µs more per message), time added to each reply's first token."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body[self._max_tokens_key] = max_tokens
        return body

    async def relay_chat(
        self,
        *,
        model: str,
        messages: Sequence[ChatMessage],
        on_text: Callable[[str], object],
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> ChatEnd:
        """Stream a reply: each piece of text goes to `on_text` as it arrives (called from the
        socket's read with the native transport: it must not block), and the end is returned.
        Failures raise domain errors after the text already relayed; cancelling the caller closes
        the upstream response at once."""
        body = self._chat_body(model, messages, temperature, max_tokens, stream=True)
        started = time.perf_counter()
        metrics = self.metrics
        first = (lambda: metrics.first_token(model, started)) if metrics is not None else None
        parser = _ChatStream(on_text, first)
        with self.tracer.start_as_current_span(
            "upstream.chat.completions",
            kind=trace.SpanKind.CLIENT,
            attributes={"gen_ai.request.model": model},
        ):
            try:
                with _upstream_errors(model):
                    await self._relay(body, parser)
            except DomainError as exc:
                if metrics is not None:
                    metrics.upstream_error(exc.reason)
                trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, exc.reason))
                raise
        if parser.usage is not None and metrics is not None:
            metrics.tokens(model, parser.usage.prompt_tokens, parser.usage.completion_tokens)
        return ChatEnd(parser.finish, parser.usage)

    async def _relay(self, body: dict[str, Any], parser: _ChatStream) -> None:
        # cast_to=httpx2.Response: the SDK hands back the HTTP response as it is (an error status is
        # raised before, with the SDK's retries), its body unread: streamed here.
        response = await self._streams.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            body=body,
            options={"timeout": self._stream_timeout, "headers": self._stream_headers},
            stream=True,
            stream_cls=openai.AsyncStream[Any],
        )
        try:
            push = response.extensions.get(PUSH)
            if push is not None and response.headers.get("content-encoding", "identity") == "identity":
                parser.on_done = lambda: push.end_within(_DRAIN_SECONDS)
                await push.subscribe(parser.feed)
            else:
                async with contextlib.aclosing(response.aiter_bytes()) as chunks:
                    async for chunk in chunks:
                        parser.feed(chunk)
                        if parser.done:
                            await _drain(chunks)
                            break
            # The body ended without [DONE]: fine after a finish_reason (some servers omit it),
            # otherwise the upstream went away mid-reply.
            if not parser.done and parser.finish is None:
                raise _StreamFailed("the model stream ended before the reply was finished")
        finally:
            await response.aclose()

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[ChatMessage],
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> tuple[str, Usage | None]:
        """A non-streamed reply (auto titles): (text, usage)."""
        body = self._chat_body(model, messages, temperature, max_tokens, stream=False)
        with _upstream_errors(model):
            response = await self._client.post("/chat/completions", cast_to=httpx2.Response, body=body)
            obj = _json(response.content)
            try:
                text = obj["choices"][0]["message"].get("content") or ""
                return text, _usage(obj.get("usage"))
            except (KeyError, IndexError, TypeError, AttributeError):
                raise _BadResponse("the model upstream sent a completion of an unexpected shape") from None

    async def generate_image(
        self, *, model: str, prompt: str, size: str, partial_images: int = 0
    ) -> AsyncIterator[ImageEvent]:
        """Generate one image: `partial_images` ImagePartial events (streamed), then ImageCompleted."""
        params: dict[str, Any] = {"model": model, "prompt": prompt, "size": size, "n": 1}
        if not model.startswith("gpt-image"):
            # gpt-image models always answer b64_json and reject the parameter; DALL·E and
            # compatible servers default to a URL.
            params["response_format"] = "b64_json"
        with _upstream_errors(model):
            if partial_images <= 0:
                response = await self._client.images.with_raw_response.generate(**params)
                yield await self._image_result(_json(response.http_response.content))
                return
            async with self._client.images.with_streaming_response.generate(
                **params, stream=True, partial_images=partial_images
            ) as response:
                decoder = _SSEDecoder()
                async with contextlib.aclosing(response.http_response.aiter_bytes()) as body:
                    async for chunk in body:
                        for event, data in decoder.feed(chunk):
                            if data == b"[DONE]":
                                continue
                            obj = _json(data)
                            kind = obj.get("type") or event or ""
                            if kind.endswith("partial_image"):
                                index = int(obj.get("partial_image_index") or 0)
                                yield ImagePartial(index, base64.b64decode(obj["b64_json"], validate=True))
                            elif kind.endswith("completed"):
                                yield ImageCompleted(
                                    base64.b64decode(obj["b64_json"], validate=True),
                                    obj.get("revised_prompt"),
                                    _usage(obj.get("usage"), "input_tokens", "output_tokens"),
                                )
                                await _drain(body)
                                return
                            elif kind == "error" or kind.endswith(".failed"):
                                raise _StreamFailed("the image stream reported an error")
                raise _StreamFailed("the image stream ended before the image was completed")

    async def _image_result(self, obj: dict[str, Any]) -> ImageCompleted:
        try:
            item = obj["data"][0]
            b64, url = item.get("b64_json"), item.get("url")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _BadResponse("the image response has no data") from None
        if b64:
            data = base64.b64decode(b64, validate=True)
        elif url:
            download = await self._http.get(url)
            download.raise_for_status()
            data = download.content
        else:
            raise _BadResponse("the image response has neither b64_json nor url")
        return ImageCompleted(
            data, item.get("revised_prompt"), _usage(obj.get("usage"), "input_tokens", "output_tokens")
        )

    async def list_models(self) -> list[str]:
        with _upstream_errors(None):
            return [m.id async for m in self._client.models.list()]

    async def aclose(self) -> None:
        if self._streams is not self._client:
            await self._streams.close()
        await self._client.close()  # closes self._http too
