"""The provider against the mock over real loopback HTTP with the real openai SDK: streaming, usage,
error mapping, cancellation reaching the upstream, titles, images and settings."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import orjson
import pytest

from everything_server.ai.mock import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_IMAGE_MODEL,
    MockModelServer,
    key_fingerprint,
)
from everything_server.ai.png import png_info
from everything_server.ai.provider import (
    ChatMessage,
    ChatProvider,
    ImageCompleted,
    ImagePartial,
    Usage,
    _retry_after,
    _SSEDecoder,
)
from everything_server.config import Settings
from everything_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

pytestmark = pytest.mark.timeout(30)

MODEL = DEFAULT_CHAT_MODEL


@dataclass(slots=True)
class ChatDelta:
    """What `collect` records of a stream: each text, then the end (finish reason and usage)."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You are terse."), ChatMessage("user", text)]


async def collect(
    provider: ChatProvider, text: str, **kwargs: object
) -> tuple[list[ChatDelta], BaseException | None]:
    """All deltas of a stream, and the error that ended it (if any)."""
    deltas: list[ChatDelta] = []
    try:
        end = await provider.relay_chat(
            model=MODEL, messages=user(text), on_text=lambda t: deltas.append(ChatDelta(t)), **kwargs
        )
    except Exception as exc:  # the test inspects it
        return deltas, exc
    deltas.append(ChatDelta("", end.usage, end.finish_reason))
    return deltas, None


def text_of(deltas: list[ChatDelta]) -> str:
    return "".join(d.text for d in deltas)


async def test_stream_happy_path_with_usage(mock: MockModelServer, provider: ChatProvider) -> None:
    deltas, error = await collect(provider, "Hello there [mock:tokens=12]")
    assert error is None
    assert sum(1 for d in deltas if d.text) == 12
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 12
    assert deltas[-1].usage.prompt_tokens > 0

    # The same request gives the same reply, streamed or not.
    again, _ = await collect(provider, "Hello there [mock:tokens=12]")
    text, usage = await provider.complete(model=MODEL, messages=user("Hello there [mock:tokens=12]"))
    assert text_of(deltas) == text_of(again) == text
    assert usage == Usage(deltas[-1].usage.prompt_tokens, 12)

    body = mock.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert mock.aborts == []


async def test_parameters_reach_the_upstream(mock: MockModelServer, provider: ChatProvider) -> None:
    deltas, error = await collect(provider, "[mock:echo]", temperature=0.2, max_tokens=50)
    assert error is None
    echo = orjson.loads(text_of(deltas))
    assert echo["model"] == MODEL
    assert echo["temperature"] == 0.2
    assert echo["system"] == "You are terse."
    # Not api.openai.com, so the long-standing `max_tokens` name is used.
    assert mock.requests[-1].body["max_tokens"] == 50
    assert "max_completion_tokens" not in mock.requests[-1].body


async def test_rate_limit_maps_to_resource_exhausted_with_retry_after(provider: ChatProvider) -> None:
    deltas, error = await collect(provider, "[mock:status=429 retry-after=2]")
    assert deltas == []
    assert isinstance(error, ResourceExhausted)
    assert error.reason == "UPSTREAM_RATE_LIMITED"
    assert error.retry_after == 2.0
    assert error.metadata["upstream_status"] == "429"

    with pytest.raises(ResourceExhausted) as info:
        await provider.complete(model=MODEL, messages=user("[mock:status=429 retry-after=1.5]"))
    assert info.value.retry_after == 1.5


async def test_server_error_maps_to_unavailable(provider: ChatProvider) -> None:
    _, error = await collect(provider, "[mock:status=500]")
    assert isinstance(error, Unavailable) and error.reason == "UPSTREAM_UNAVAILABLE"


async def test_unknown_model_maps_to_invalid_argument(provider: ChatProvider) -> None:
    _, error = await collect(provider, "[mock:status=404]")
    assert isinstance(error, InvalidArgument)
    assert error.violations[0].field == "model"


async def test_other_client_errors_map_to_bad_response(provider: ChatProvider) -> None:
    _, error = await collect(provider, "[mock:status=401]")
    assert isinstance(error, Unavailable) and error.reason == "UPSTREAM_BAD_RESPONSE"


async def test_malformed_chunk_after_partial_text(provider: ChatProvider) -> None:
    deltas, error = await collect(provider, "[mock:malformed-after=2]")
    assert sum(1 for d in deltas if d.text) == 2
    assert isinstance(error, Unavailable) and error.reason == "UPSTREAM_BAD_RESPONSE"


async def test_cut_connection_after_partial_text(mock: MockModelServer, provider: ChatProvider) -> None:
    deltas, error = await collect(provider, "story [mock:cut-after=4]")
    assert isinstance(error, Unavailable) and error.reason == "UPSTREAM_UNAVAILABLE"
    full, _ = await collect(provider, "story [mock:tokens=20]")
    assert sum(1 for d in deltas if d.text) == 4
    assert text_of(full).startswith(text_of(deltas))  # the partial text stays with the caller


async def test_stall_maps_to_deadline_exceeded(mock: MockModelServer, provider: ChatProvider) -> None:
    started = time.monotonic()
    deltas, error = await collect(provider, "[mock:stall-after=3]")
    elapsed = time.monotonic() - started
    assert isinstance(error, DeadlineExceeded) and error.reason == "UPSTREAM_TIMEOUT"
    assert sum(1 for d in deltas if d.text) == 3
    assert 0.4 <= elapsed < 3  # the 0.5 s stall timeout, not a hang
    abort = await mock.wait_for_abort(timeout=3)  # giving up closed the upstream stream
    assert abort.sent == 3


async def test_no_headers_in_time_maps_to_deadline_exceeded(provider: ChatProvider) -> None:
    _, error = await collect(provider, "[mock:delay=5]")
    assert isinstance(error, DeadlineExceeded)


async def test_connection_refused_maps_to_unavailable(transport: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    provider = ChatProvider(
        api_key="k",
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=0,
        connect_timeout=2,
        transport=transport,
    )
    try:
        _, error = await collect(provider, "hi")
        assert isinstance(error, Unavailable) and error.reason == "UPSTREAM_UNAVAILABLE"
    finally:
        await provider.aclose()


async def test_a_consumer_error_mid_stream_aborts_the_upstream(
    mock: MockModelServer, provider: ChatProvider
) -> None:
    seen: list[str] = []

    class Enough(Exception):
        pass

    def on_text(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            raise Enough

    with pytest.raises(Enough):
        await provider.relay_chat(model=MODEL, messages=user("[mock:tokens=200 rate=100]"), on_text=on_text)
    assert len(seen) == 3
    abort = await mock.wait_for_abort(timeout=3)
    assert abort.path == "/v1/chat/completions" and abort.model == MODEL
    assert 3 <= abort.sent < 200


async def test_task_cancel_mid_stream_aborts_the_upstream(
    mock: MockModelServer, provider: ChatProvider
) -> None:
    first = asyncio.Event()

    task = asyncio.create_task(
        provider.relay_chat(
            model=MODEL, messages=user("[mock:tokens=200 rate=100]"), on_text=lambda _: first.set()
        )
    )
    await asyncio.wait_for(first.wait(), 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    abort = await mock.wait_for_abort(timeout=3)
    assert abort.sent < 200


async def test_cancel_of_a_stalled_stream_aborts_the_upstream(mock: MockModelServer, transport: str) -> None:
    # A long stall timeout: only the cancel can end this one.
    provider = ChatProvider(
        api_key="k", base_url=mock.base_url, stall_timeout=60, max_retries=0, transport=transport
    )
    try:
        task = asyncio.create_task(collect(provider, "[mock:stall]"))
        await mock.wait_for_requests(1, timeout=3)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        abort = await mock.wait_for_abort(timeout=3)
        assert abort.sent == 0
    finally:
        await provider.aclose()


async def test_sdk_retries_the_initial_request(mock: MockModelServer, transport: str) -> None:
    provider = ChatProvider(api_key="k", base_url=mock.base_url, max_retries=1, transport=transport)
    try:
        deltas, error = await collect(provider, "[mock:status=503 times=1 tokens=3]")
    finally:
        await provider.aclose()
    assert error is None and sum(1 for d in deltas if d.text) == 3
    assert len(mock.requests) == 2


async def test_complete_for_titles(mock: MockModelServer, provider: ChatProvider) -> None:
    text, usage = await provider.complete(
        model=MODEL, messages=user("name this chat"), max_tokens=4, temperature=0
    )
    assert len(text.split()) == 4
    assert usage is not None and usage.completion_tokens == 4
    assert mock.requests[-1].body.get("stream") is None
    with pytest.raises(Unavailable):
        await provider.complete(model=MODEL, messages=user("[mock:malformed-after=0]"))


async def test_image_without_partials(mock: MockModelServer, provider: ChatProvider) -> None:
    events = [
        e async for e in provider.generate_image(model=DEFAULT_IMAGE_MODEL, prompt="a cat", size="40x30")
    ]
    assert len(events) == 1 and isinstance(events[0], ImageCompleted)
    info = png_info(events[0].data)
    assert (info.width, info.height) == (40, 30)
    assert events[0].usage is not None and events[0].usage.completion_tokens > 0
    # gpt-image models always answer b64_json and reject response_format; others are asked for it.
    assert "response_format" not in mock.requests[-1].body
    [other] = [e async for e in provider.generate_image(model="dall-e-3", prompt="a cat", size="40x30")]
    assert mock.requests[-1].body["response_format"] == "b64_json"
    assert png_info(other.data).width == 40


async def test_image_url_answer_is_downloaded(provider: ChatProvider) -> None:
    [event] = [
        e async for e in provider.generate_image(model="dall-e-3", prompt="a dog [mock:url]", size="24x24")
    ]
    assert isinstance(event, ImageCompleted)
    assert png_info(event.data).width == 24
    assert event.revised_prompt == "a dog"


async def test_image_stream_with_partials(mock: MockModelServer, provider: ChatProvider) -> None:
    events = [
        e
        async for e in provider.generate_image(
            model=DEFAULT_IMAGE_MODEL, prompt="a tower", size="48x32", partial_images=2
        )
    ]
    assert [type(e) for e in events] == [ImagePartial, ImagePartial, ImageCompleted]
    assert [e.index for e in events[:2]] == [0, 1]
    assert all((png_info(e.data).width, png_info(e.data).height) == (48, 32) for e in events)
    assert events[-1].usage is not None
    body = mock.requests[-1].body
    assert body["stream"] is True and body["partial_images"] == 2
    assert mock.aborts == []


async def test_image_errors_are_mapped(provider: ChatProvider) -> None:
    with pytest.raises(ResourceExhausted) as info:
        async for _ in provider.generate_image(
            model=DEFAULT_IMAGE_MODEL, prompt="x [mock:status=429 retry-after=4]", size="8x8"
        ):
            pass
    assert info.value.retry_after == 4.0

    got: list[object] = []
    with pytest.raises(Unavailable) as cut:
        async for event in provider.generate_image(
            model=DEFAULT_IMAGE_MODEL, prompt="x [mock:cut-after=1]", size="8x8", partial_images=2
        ):
            got.append(event)
    assert cut.value.reason == "UPSTREAM_UNAVAILABLE"
    assert len(got) == 1 and isinstance(got[0], ImagePartial)


async def test_list_models(provider: ChatProvider) -> None:
    models = await provider.list_models()
    assert MODEL in models and DEFAULT_IMAGE_MODEL in models


async def test_from_settings(mock: MockModelServer) -> None:
    settings = Settings(
        _env_file=None,
        OPENAI_API_KEY="sk-from-settings",
        openai_stall_timeout_seconds=0.3,
        openai_max_retries=0,
        chat_model="gpt-4.1-mini",
    )
    provider = ChatProvider.from_settings(settings, base_url_override=mock.base_url)
    try:
        assert provider.base_url.startswith(mock.base_url)
        assert provider.chat_model == "gpt-4.1-mini"
        _, error = await collect(provider, "[mock:stall]")
        assert isinstance(error, DeadlineExceeded)  # the stall timeout came from the settings
        assert mock.requests[-1].api_key_fingerprint == key_fingerprint("sk-from-settings")
    finally:
        await provider.aclose()

    with pytest.raises(ValueError, match="mock"):
        ChatProvider.from_settings(Settings(_env_file=None, OPENAI_API_KEY=None, OPENAI_BASE_URL=None))


async def test_streams_go_through_http1_unless_another_transport_or_a_proxy_is_set(
    mock: MockModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)

    async def streams_native(**settings: object) -> bool:
        provider = ChatProvider.from_settings(
            Settings(_env_file=None, **settings), base_url_override=mock.base_url
        )
        await provider.aclose()
        return provider.native_streams

    assert await streams_native() is True
    assert await streams_native(openai_transport="aiohttp") is False
    assert await streams_native(openai_transport="httpx") is False
    with pytest.raises(ValueError, match="openai_transport"):
        Settings(_env_file=None, openai_transport="carrier-pigeon")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # http1 speaks no proxy protocol
    assert await streams_native() is False
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert await streams_native() is True


def test_sse_decoder_handles_split_lines_crlf_and_comments() -> None:
    decoder = _SSEDecoder()
    stream = b': keep-alive\r\n\r\nevent: thing\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: [DONE]\n\n'
    events = []
    for i in range(0, len(stream), 3):  # arbitrary network splits
        events += decoder.feed(stream[i : i + 3])
    assert events == [("thing", b'{"a":\n1}'), (None, b"[DONE]")]
    assert decoder.feed(b"data: unterminated") == []


def test_retry_after_header_forms() -> None:
    assert _retry_after(httpx2.Headers({"retry-after-ms": "1500"})) == 1.5
    assert _retry_after(httpx2.Headers({"retry-after": "7"})) == 7.0
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(httpx2.Headers({"retry-after": date})) <= 31
    assert _retry_after(httpx2.Headers({"retry-after": "soon"})) is None
    assert _retry_after(httpx2.Headers()) is None
