"""Search fixtures: fake web engines on loopback and a second in-process server configured to use
them (the session `app` has no web provider, so it searches the user's history by default).

Both servers share the database and the JWT keys, so any signed-up user can call either; they are
two replicas of one service (a cancel sent to one reaches a search running on the other)."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest

from everything.search.v1 import search_service_pb2 as pb
from everything.search.v1 import search_service_pb2_grpc
from everything_server.app import App
from tests.conftest import make_settings
from tests.search.engines import FakeEngines

BRAVE_KEY = "brave-test-key"
TAVILY_KEY = "tvly-test-key"
PROVIDER_TIMEOUT = 1.0


@pytest.fixture(scope="session")
async def running_engines():
    fake = FakeEngines(brave_key=BRAVE_KEY, tavily_key=TAVILY_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def engines(running_engines):
    """The fake engines, all up and answering, with no recorded requests."""
    await running_engines.reset(brave_key=BRAVE_KEY, tavily_key=TAVILY_KEY)
    yield running_engines
    await running_engines.reset(brave_key=BRAVE_KEY, tavily_key=TAVILY_KEY)


@pytest.fixture(scope="session")
async def web_app(settings_env, running_engines, app):
    engines = running_engines
    settings = make_settings(
        settings_env,
        searxng_url=engines["searxng"].base_url,
        brave_api_key=BRAVE_KEY,
        brave_url=engines["brave"].base_url + "/res/v1/web/search",
        tavily_api_key=TAVILY_KEY,
        tavily_url=engines["tavily"].base_url + "/search",
        search_timeout_seconds=PROVIDER_TIMEOUT,
    )
    server = App(settings)
    await server.start()
    yield server
    await server.stop(grace=5)


@pytest.fixture(scope="session")
async def web_stub(web_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{web_app.port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        yield search_service_pb2_grpc.SearchServiceStub(ch)


# -- helpers --------------------------------------------------------------------------------------


def marker() -> str:
    """A word no other test uses, to find this test's request among the mock's records."""
    return "zq" + uuid.uuid4().hex[:10]


async def collect(stub, md, timeout: float = 20, **request) -> list[pb.SearchResponse]:
    """Every event of a Search call (it must end OK)."""
    return [e async for e in stub.Search(pb.SearchRequest(**request), metadata=md, timeout=timeout)]


async def collect_until_error(stub, md, timeout: float = 20, **request):
    """(events, error) of a Search call that must fail."""
    events = []
    try:
        async for e in stub.Search(pb.SearchRequest(**request), metadata=md, timeout=timeout):
            events.append(e)
    except grpc.aio.AioRpcError as err:
        return events, err
    raise AssertionError("the search succeeded")


def summary(events) -> str:
    return "".join(e.summary_delta.text for e in events if e.WhichOneof("event") == "summary_delta")


def chat_request_with(mock_model, word: str) -> dict:
    """The body of the (only) chat request the mock received whose messages mention `word`."""
    found = [
        r.body
        for r in mock_model.requests
        if r.path.endswith("/chat/completions") and word in json.dumps((r.body or {}).get("messages"))
    ]
    assert len(found) == 1, f"expected one model request mentioning {word}, got {len(found)}"
    return found[0]


async def set_preferences(db_conn, user_id: str, data: dict) -> None:
    await db_conn.execute(
        "INSERT INTO preferences (user_id, data) VALUES ($1, $2::jsonb) "
        "ON CONFLICT (user_id) DO UPDATE SET data = EXCLUDED.data",
        uuid.UUID(user_id),
        json.dumps(data),
    )


async def add_chat_message(db_conn, user_id: str, content: str, title: str = "Trip planning") -> uuid.UUID:
    """A past chat (thread + completed user message) written straight to the tables; returns the thread id."""
    thread_id = uuid.uuid4()
    await db_conn.execute(
        "INSERT INTO threads (id, user_id, title) VALUES ($1, $2, $3)", thread_id, uuid.UUID(user_id), title
    )
    await db_conn.execute(
        "INSERT INTO messages (id, thread_id, user_id, role, content, status, turn) "
        "VALUES ($1, $2, $3, 'user', $4, 'completed', 1)",
        uuid.uuid4(),
        thread_id,
        uuid.UUID(user_id),
        content,
    )
    return thread_id


async def wait_for_row(db_conn, search_id: str, predicate, timeout: float = 10):  # noqa: ASYNC109
    """The search_queries row once `predicate(row)` holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await db_conn.fetchrow("SELECT * FROM search_queries WHERE id = $1", uuid.UUID(search_id))
        if row is not None and predicate(row):
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"search row did not reach the expected state: {dict(row or {})}")
        await asyncio.sleep(0.05)
