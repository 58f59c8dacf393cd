"""Fixtures for the AI layer tests: a real mock model server on loopback and a provider pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from everything_server.ai.mock import MockModelServer
from everything_server.ai.provider import ChatProvider

API_KEY = "sk-test-not-a-real-key"


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture
async def mock() -> AsyncIterator[MockModelServer]:
    async with MockModelServer(tokens=20, image_delay=0.0) as server:
        yield server


@pytest.fixture(params=["native", "aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every provider test runs on every HTTP transport (http1's push, and the two the SDK offers):
    they must behave the same."""
    return request.param


@pytest.fixture
async def provider(mock: MockModelServer, transport: str) -> AsyncIterator[ChatProvider]:
    # Short timeouts keep failure tests bounded; no retries so each directive is seen once.
    p = ChatProvider(
        transport=transport,
        api_key=API_KEY,
        base_url=mock.base_url,
        timeout=5.0,
        connect_timeout=2.0,
        stall_timeout=0.5,
        max_retries=0,
    )
    yield p
    await p.aclose()
