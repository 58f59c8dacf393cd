"""The mock model server over real loopback HTTP: wire format (checked with the real openai SDK and raw
bytes), determinism, directives, records of requests and aborts, images, thread and CLI modes."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import openai
import orjson
import pytest

from everything_server.ai.mock import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_IMAGE_MODEL,
    Behaviour,
    MockModelServer,
    generated_tokens,
    key_fingerprint,
    parse_directives,
)
from everything_server.ai.png import pattern_png, png_info

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sdk(mock: MockModelServer, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key=api_key, base_url=mock.base_url, max_retries=0, timeout=5.0)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


def chat_body(text: str, *, stream: bool = True, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": text}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body | extra


async def sdk_stream(sdk: openai.AsyncOpenAI, text: str, **extra: object) -> list:
    stream = await sdk.chat.completions.create(
        model=DEFAULT_CHAT_MODEL,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    return [chunk async for chunk in stream]


def content_of(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_sdk_streams_typed_chunks_with_usage(mock: MockModelServer, sdk: openai.AsyncOpenAI) -> None:
    chunks = await sdk_stream(sdk, "Tell me about rivers")

    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 20  # the default token count, one token per chunk
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 20
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + 20
    assert all(c.object == "chat.completion.chunk" and c.model == DEFAULT_CHAT_MODEL for c in chunks)


async def test_replies_are_deterministic_and_sized_by_directive(sdk: openai.AsyncOpenAI) -> None:
    first = content_of(await sdk_stream(sdk, "same question"))
    again = content_of(await sdk_stream(sdk, "same question"))
    other = content_of(await sdk_stream(sdk, "another question"))
    assert first == again
    assert first != other

    five = await sdk_stream(sdk, "same question [mock:tokens=5]")
    assert sum(1 for c in five if c.choices and c.choices[0].delta.content) == 5
    assert five[-1].usage.completion_tokens == 5
    # Directives do not change the words: a shorter reply is a prefix of a longer one.
    assert first.startswith(content_of(five))
    assert generated_tokens(f"{DEFAULT_CHAT_MODEL}\nsame question", 20) == split_like(first)


def split_like(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


async def test_non_streamed_completion_and_max_tokens(sdk: openai.AsyncOpenAI) -> None:
    full = await sdk.chat.completions.create(
        model=DEFAULT_CHAT_MODEL, messages=[{"role": "user", "content": "hello [mock:tokens=8]"}]
    )
    assert full.object == "chat.completion"
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens == 8
    cut = await sdk.chat.completions.create(
        model=DEFAULT_CHAT_MODEL,
        messages=[{"role": "user", "content": "hello [mock:tokens=8]"}],
        max_tokens=3,
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


async def test_sse_wire_format(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST", f"{mock.base_url}/chat/completions", json=chat_body("hi [mock:tokens=3]")
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert [p["choices"][0]["delta"].get("content") for p in payloads[1:4]] == split_like(
        "".join(p["choices"][0]["delta"]["content"] for p in payloads[1:4])
    )
    assert payloads[4]["choices"][0]["finish_reason"] == "stop"
    assert payloads[5]["choices"] == [] and payloads[5]["usage"]["completion_tokens"] == 3


async def test_rate_paces_tokens(sdk: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    chunks = await sdk_stream(sdk, "[mock:tokens=6 rate=50]")
    # 6 tokens at 50/s: the last one is due 5/50 s after the first.
    assert time.monotonic() - started >= 0.09
    assert chunks[-1].usage.completion_tokens == 6


async def test_status_directive_with_retry_after(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    r = await http.post(
        f"{mock.base_url}/chat/completions", json=chat_body("[mock:status=429 retry-after=2]")
    )
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"

    r = await http.post(f"{mock.base_url}/chat/completions", json=chat_body("[mock:status=500]"))
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"


async def test_status_times_lets_the_sdk_retry(mock: MockModelServer, api_key: str) -> None:
    client = openai.AsyncOpenAI(api_key=api_key, base_url=mock.base_url, max_retries=1, timeout=5.0)
    try:
        reply = await client.chat.completions.create(
            model=DEFAULT_CHAT_MODEL,
            messages=[{"role": "user", "content": "[mock:status=503 times=1 tokens=2]"}],
        )
    finally:
        await client.close()
    assert reply.usage.completion_tokens == 2
    assert len(mock.requests) == 2  # failed once, then answered


async def test_unknown_directive_is_a_400(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{mock.base_url}/chat/completions", json=chat_body("[mock:tokenz=3]"))
    assert r.status_code == 400
    assert "tokenz" in r.json()["error"]["message"]


def test_parse_directives() -> None:
    b, clean, raw = parse_directives('Hello [mock:tokens=5 rate=2.5] there [mock:stall-after=3 text="a b"]')
    assert (b.tokens, b.rate, b.stall, b.stall_after, b.text) == (5, 2.5, True, 3, "a b")
    assert clean == "Hello  there"
    assert raw
    assert parse_directives("no directives") == (Behaviour(), "no directives", "")


async def test_enqueue_and_defaults(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    mock.enqueue(Behaviour(status=500), Behaviour(tokens=2))
    first = await http.post(f"{mock.base_url}/chat/completions", json=chat_body("x", stream=False))
    second = await http.post(f"{mock.base_url}/chat/completions", json=chat_body("x", stream=False))
    assert first.status_code == 500
    assert second.json()["usage"]["completion_tokens"] == 2

    mock.defaults.tokens = 4
    third = await http.post(f"{mock.base_url}/chat/completions", json=chat_body("x", stream=False))
    assert third.json()["usage"]["completion_tokens"] == 4
    # A directive wins over the defaults and over a queued behaviour.
    mock.enqueue(Behaviour(tokens=9))
    fourth = await http.post(
        f"{mock.base_url}/chat/completions", json=chat_body("x [mock:tokens=1]", stream=False)
    )
    assert fourth.json()["usage"]["completion_tokens"] == 1


async def test_cut_after_closes_the_connection_mid_body(
    mock: MockModelServer, http: httpx.AsyncClient
) -> None:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST", f"{mock.base_url}/chat/completions", json=chat_body("[mock:cut-after=2]")
        ) as r:
            async for chunk in r.aiter_bytes():
                received += chunk
    assert received.count(b'"content":') == 3  # the role chunk and two tokens
    assert b"[DONE]" not in received
    assert mock.aborts == []  # the mock's own cut is not a client abort


async def test_malformed_after_sends_a_chunk_that_is_not_json(
    mock: MockModelServer, http: httpx.AsyncClient
) -> None:
    async with http.stream(
        "POST", f"{mock.base_url}/chat/completions", json=chat_body("[mock:malformed-after=1]")
    ) as r:
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert len(events) == 3
    orjson.loads(events[0])
    orjson.loads(events[1])
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(events[2])


async def test_stall_then_client_abort_is_recorded(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    seen = b""
    async with http.stream(
        "POST", f"{mock.base_url}/chat/completions", json=chat_body("[mock:stall-after=2]")
    ) as r:
        async for chunk in r.aiter_bytes():
            seen += chunk
            if seen.count(b'"content":') == 3:
                break  # leaving the block closes the connection
    abort = await mock.wait_for_abort(timeout=3)
    assert abort.path == "/v1/chat/completions"
    assert abort.sent == 2
    assert abort.text == "".join(generated_tokens(f"{DEFAULT_CHAT_MODEL}\n", 2))
    with pytest.raises(TimeoutError):
        await mock.wait_for_abort(timeout=0.1, count=2)


async def test_slow_stream_abort_is_recorded(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST", f"{mock.base_url}/chat/completions", json=chat_body("[mock:tokens=500 rate=100]")
    ) as r:
        async for chunk in r.aiter_bytes():
            if b'"content":"' in chunk.replace(b'"content":""', b""):
                break
    abort = await mock.wait_for_abort(timeout=3)
    assert 1 <= abort.sent < 500


async def test_finished_streams_are_not_aborts(mock: MockModelServer, sdk: openai.AsyncOpenAI) -> None:
    for _ in range(3):
        await sdk_stream(sdk, "[mock:tokens=3]")
    await asyncio.sleep(0.05)
    assert mock.aborts == []


async def test_echo_reports_what_was_received(sdk: openai.AsyncOpenAI) -> None:
    reply = await sdk.chat.completions.create(
        model="gpt-4o",
        temperature=0.25,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "[mock:echo] second"},
        ],
    )
    echo = orjson.loads(reply.choices[0].message.content)
    assert echo["model"] == "gpt-4o"
    assert echo["temperature"] == 0.25
    assert echo["system"] == "Be brief."
    assert [m["role"] for m in echo["messages"]] == ["system", "user", "assistant", "user"]


async def test_records_requests_without_credentials(
    mock: MockModelServer, sdk: openai.AsyncOpenAI, api_key: str
) -> None:
    await sdk_stream(sdk, "hello", temperature=0.5)
    rec = mock.requests[-1]
    assert rec.path == "/v1/chat/completions" and rec.method == "POST"
    assert rec.body["temperature"] == 0.5 and rec.body["stream"] is True
    assert rec.body["stream_options"] == {"include_usage": True}
    assert "authorization" not in {k.lower() for k in rec.headers}
    assert api_key not in repr(rec)
    assert rec.api_key_fingerprint == key_fingerprint(api_key)
    mock.reset()
    assert mock.requests == [] and mock.aborts == []


async def test_models_list(sdk: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in sdk.models.list()]
    assert DEFAULT_CHAT_MODEL in ids and DEFAULT_IMAGE_MODEL in ids


async def test_image_b64_is_a_png_of_the_requested_size(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.images.generate(model=DEFAULT_IMAGE_MODEL, prompt="a red fox", size="64x48")
    data = base64.b64decode(result.data[0].b64_json)
    info = png_info(data)
    assert (info.width, info.height) == (64, 48)
    assert result.usage.output_tokens > 0
    # Deterministic: the same prompt gives the same bytes.
    again = await sdk.images.generate(model=DEFAULT_IMAGE_MODEL, prompt="a red fox", size="64x48")
    assert again.data[0].b64_json == result.data[0].b64_json


async def test_image_stream_sends_partial_images_then_completed(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.images.generate(
        model=DEFAULT_IMAGE_MODEL, prompt="a lighthouse", size="32x40", stream=True, partial_images=2
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        info = png_info(base64.b64decode(event.b64_json))
        assert (info.width, info.height) == (32, 40)
        assert event.size == "32x40" and event.output_format == "png"
    assert events[-1].usage.total_tokens == events[-1].usage.input_tokens + events[-1].usage.output_tokens


async def test_image_url_response(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    r = await http.post(
        f"{mock.base_url}/images/generations",
        json={"model": "dall-e-3", "prompt": "a boat", "size": "16x16", "response_format": "url"},
    )
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://127.0.0.1:")
    image = await http.get(url)
    assert image.headers["content-type"] == "image/png"
    assert png_info(image.content).width == 16


async def test_image_directives_and_validation(mock: MockModelServer, http: httpx.AsyncClient) -> None:
    url = f"{mock.base_url}/images/generations"
    r = await http.post(
        url, json={"model": DEFAULT_IMAGE_MODEL, "prompt": "x [mock:status=429 retry-after=3]"}
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    r = await http.post(url, json={"model": DEFAULT_IMAGE_MODEL, "prompt": "x", "size": "huge"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    r = await http.post(url, json={"model": DEFAULT_IMAGE_MODEL, "prompt": "x", "partial_images": 9})
    assert r.status_code == 400


def test_png_encoder_and_checker() -> None:
    data = pattern_png(33, 7, seed="s")
    info = png_info(data)
    assert (info.width, info.height, info.bit_depth, info.color_type) == (33, 7, 8, 2)
    assert info.chunks == ["IHDR", "IDAT", "IEND"]
    assert pattern_png(33, 7, seed="s") == data != pattern_png(33, 7, seed="t")
    broken = bytearray(data)
    broken[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    with pytest.raises(ValueError, match="CRC"):
        png_info(bytes(broken))
    with pytest.raises(ValueError):
        pattern_png(0, 10)


def test_runs_in_a_background_thread() -> None:
    mock = MockModelServer(tokens=3)
    base_url = mock.start_in_thread()
    try:
        r = httpx.post(f"{base_url}/chat/completions", json=chat_body("hi", stream=False), timeout=5)
        assert r.json()["usage"]["completion_tokens"] == 3
        assert len(mock.requests) == 1
    finally:
        mock.stop_thread()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models", timeout=2)


def test_runs_standalone_from_the_command_line() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "everything_server.ai.mock", "--port", "0", "--tokens", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            r = httpx.post(f"{base_url}/chat/completions", json=chat_body("hi", stream=False), timeout=5)
            assert r.json()["usage"]["completion_tokens"] == 4
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0  # SIGTERM is a clean stop
