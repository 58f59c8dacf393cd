"""SearchService through real stubs: sources then a cited summary, providers over loopback HTTP, the
user's history, failures, disconnect, cancel, ownership, validation and preferences."""

from __future__ import annotations

import asyncio
import re
import uuid

import grpc
import orjson
import pytest

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.search.v1 import search_pb2
from everything.search.v1 import search_service_pb2 as pb
from everything_server.ai.mock import Behaviour
from tests.search.conftest import (
    BRAVE_KEY,
    TAVILY_KEY,
    add_chat_message,
    chat_request_with,
    collect,
    collect_until_error,
    marker,
    set_preferences,
    summary,
    wait_for_row,
)
from tests.search.engines import SHARED_URL
from tests.support import details, expect_error

COMPLETED = search_pb2.SEARCH_STATUS_COMPLETED
CANCELLED = search_pb2.SEARCH_STATUS_CANCELLED
RUNNING = search_pb2.SEARCH_STATUS_RUNNING


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def assert_well_formed(events) -> None:
    """One search id, seq 1, 2, 3, ... and the event order of the contract."""
    assert len({e.search_id for e in events}) == 1
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    k = kinds(events)
    assert k[0] == "started"
    if k[-1] == "completed":
        assert k[-2] == "usage_reported"
        middle = k[2:-2] if k[1] == "sources_found" else k[1:-2]
        assert set(middle) <= {"summary_delta"}


# -- the happy path -------------------------------------------------------------------------------


async def test_search_streams_sources_then_a_summary_citing_them_and_saves_it(
    web_stub, user, engines, mock_model, db_conn
):
    word = marker()
    reply = "Rivers are long [1] and searx agrees [2]."
    mock_model.enqueue(Behaviour(text=reply))
    events = await collect(web_stub, user.md, query=f"how long are rivers {word}", providers=["searxng"])

    assert_well_formed(events)
    started = events[0].started.search
    assert started.status == RUNNING and started.query == f"how long are rivers {word}"
    sources = list(events[1].sources_found.sources)
    assert [s.index for s in sources] == list(range(1, len(sources) + 1))
    assert {s.provider for s in sources} == {"searxng"}
    assert sources[0].url == "https://searx.example/1"
    # Engine markup is gone, entities decoded, and a non-web URL was never offered as a source.
    assert sources[0].snippet == "Rivers are long & searx snippet 1"
    assert all(s.url.startswith("https://") for s in sources)

    text = summary(events)
    assert text == reply
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
    assert cited and cited <= {s.index for s in sources}

    done = events[-1].completed.search
    assert done.status == COMPLETED and done.summary == reply and done.id == events[0].search_id
    assert list(done.sources) == sources
    assert done.usage.completion_tokens > 0 and not done.usage.estimated
    assert events[-2].usage_reported.usage == done.usage
    assert list(done.providers) == ["searxng"]

    # The model got the numbered sources and the citation rule, the query last.
    body = chat_request_with(mock_model, word)
    system, user_msg = body["messages"][0]["content"], body["messages"][-1]["content"]
    assert "square brackets" in system
    for s in sources:
        assert f"[{s.index}] {s.title}\nURL: {s.url}" in user_msg
    assert user_msg.rstrip().endswith(word)

    row = await db_conn.fetchrow("SELECT * FROM search_queries WHERE id = $1", uuid.UUID(done.id))
    assert row["status"] == "completed" and row["summary"] == reply
    assert [s["url"] for s in orjson.loads(row["sources"])] == [s.url for s in sources]
    got = await web_stub.GetSearch(pb.GetSearchRequest(search_id=done.id), metadata=user.md)
    assert got.search == done


async def test_sources_of_several_providers_are_merged_without_duplicate_urls(web_stub, user, engines):
    events = await collect(web_stub, user.md, query="rivers", providers=["searxng", "brave"], max_sources=20)
    sources = events[1].sources_found.sources
    urls = [s.url for s in sources]
    # Both engines found the shared page (one with a trailing slash): it is offered once.
    assert urls.count(SHARED_URL) + urls.count(SHARED_URL + "/") == 1
    assert {s.provider for s in sources} == {"searxng", "brave"}
    # Round-robin: each provider's best hit comes first.
    assert [s.url for s in sources[:2]] == ["https://searx.example/1", "https://brave.example/1"]
    assert [s.index for s in sources] == list(range(1, len(sources) + 1))


async def test_max_sources_caps_the_sources(web_stub, user, engines):
    events = await collect(web_stub, user.md, query="rivers", providers=["searxng", "brave"], max_sources=2)
    assert len(events[1].sources_found.sources) == 2


# -- hosted providers -----------------------------------------------------------------------------


async def test_brave_gets_its_subscription_token_and_its_markup_is_removed(web_stub, user, engines):
    events = await collect(web_stub, user.md, query="bold rivers", providers=["brave"], max_sources=5)
    seen = engines["brave"].requests[-1]
    assert seen.headers["X-Subscription-Token"] == BRAVE_KEY
    assert seen.query["q"] == "bold rivers" and seen.query["count"] == "5"
    sources = events[1].sources_found.sources
    assert sources[0].snippet == "A bold claim about rivers" and sources[0].provider == "brave"
    assert events[-1].completed.search.status == COMPLETED


async def test_tavily_gets_a_bearer_key_and_the_requested_number_of_results(web_stub, user, engines):
    events = await collect(web_stub, user.md, query="rivers", providers=["tavily"], max_sources=3)
    seen = engines["tavily"].requests[-1]
    assert seen.method == "POST" and seen.headers["Authorization"] == f"Bearer {TAVILY_KEY}"
    assert seen.body["query"] == "rivers" and seen.body["max_results"] == 3
    assert [s.url for s in events[1].sources_found.sources] == [
        f"https://tavily.example/{i}" for i in (1, 2, 3)
    ]


async def test_a_rejected_api_key_is_a_provider_failure(web_stub, user, engines, db_conn):
    engines["brave"].key = "another-key"
    events, err = await collect_until_error(web_stub, user.md, query="rivers", providers=["brave"])
    d = details(err)
    assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "SEARCH_PROVIDER_UNAVAILABLE"
    assert BRAVE_KEY not in d.message
    row = await wait_for_row(db_conn, events[0].search_id, lambda r: r["status"] != "running")
    assert row["status"] == "failed" and row["error_reason"] == "SEARCH_PROVIDER_UNAVAILABLE"


# -- provider failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["status", "down", "stall", "garbage"])
async def test_searxng_failing_fails_a_search_that_asked_only_searxng(
    web_stub, user, engines, mock_model, db_conn, mode
):
    await engines.set_mode("searxng", mode)
    word = marker()
    started = asyncio.get_running_loop().time()
    events, err = await collect_until_error(web_stub, user.md, query=f"rivers {word}", providers=["searxng"])
    assert asyncio.get_running_loop().time() - started < 5  # the provider timeout bounds a stall
    d = details(err)
    assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "SEARCH_PROVIDER_UNAVAILABLE"
    assert kinds(events) == ["started"]
    row = await wait_for_row(db_conn, events[0].search_id, lambda r: r["status"] != "running")
    assert row["status"] == "failed" and row["error_reason"] == "SEARCH_PROVIDER_UNAVAILABLE"
    assert not any(word in orjson.dumps(r.body).decode() for r in mock_model.requests)  # model never asked


async def test_searxng_down_falls_back_to_history_when_providers_were_not_requested(
    web_stub, user, engines, db_conn
):
    await set_preferences(db_conn, user.id, {"search_providers": ["searxng"]})
    thread_id = await add_chat_message(db_conn, user.id, "We should canoe the Danube delta in May")
    await engines.set_mode("searxng", "down")
    events = await collect(web_stub, user.md, query="canoe danube")
    done = events[-1].completed.search
    assert done.status == COMPLETED
    assert list(done.providers) == ["searxng", "history"]
    assert [s.url for s in done.sources] == [f"everything:thread/{thread_id}"]
    assert len(engines["searxng"].requests) == 0  # it was down: refused before any request


async def test_one_provider_failing_still_answers_with_the_others(web_stub, user, engines):
    await engines.set_mode("searxng", "status", 502)
    events = await collect(web_stub, user.md, query="rivers", providers=["searxng", "brave"])
    done = events[-1].completed.search
    assert done.status == COMPLETED
    assert {s.provider for s in done.sources} == {"brave"}
    assert len(engines["searxng"].requests) == 1


# -- history --------------------------------------------------------------------------------------


async def test_history_is_the_default_without_web_providers_and_finds_only_own_chats(
    search_stub, user, other_user, db_conn
):
    mine = await add_chat_message(db_conn, user.id, "The quokka photos from Rottnest island were great")
    theirs = await add_chat_message(db_conn, other_user.id, "Quokka sightings on Rottnest island today")
    await add_chat_message(db_conn, user.id, "Something about gardening and tomatoes")

    events = await collect(search_stub, user.md, query="quokkas on Rottnest")
    done = events[-1].completed.search
    assert list(done.providers) == ["history"]
    urls = [s.url for s in done.sources]
    assert urls == [f"everything:thread/{mine}"]
    assert f"everything:thread/{theirs}" not in urls
    source = done.sources[0]
    assert source.provider == "history" and source.title == "Trip planning"
    assert "quokka" in source.snippet.lower()


async def test_history_finds_past_searches(search_stub, user):
    first = await collect(search_stub, user.md, query="best sourdough starter hydration")
    first_id = first[-1].completed.search.id
    events = await collect(search_stub, user.md, query="sourdough hydration")
    urls = [s.url for s in events[-1].completed.search.sources]
    assert f"everything:search/{first_id}" in urls
    # The running search never finds itself.
    assert f"everything:search/{events[0].search_id}" not in urls


# -- disconnect and cancel ------------------------------------------------------------------------


async def test_client_disconnect_mid_summary_still_saves_the_completed_search(search_stub, user, db_conn):
    call = search_stub.Search(
        pb.SearchRequest(query="a long answer please [mock:tokens=30 rate=30]"), metadata=user.md, timeout=20
    )
    search_id, seen = None, ""
    async for event in call:
        search_id = event.search_id
        if event.WhichOneof("event") == "summary_delta":
            seen += event.summary_delta.text
            break
    call.cancel()
    row = await wait_for_row(db_conn, search_id, lambda r: r["status"] != "running", timeout=15)
    assert row["status"] == "completed"
    assert row["summary"].startswith(seen) and len(row["summary"]) > len(seen)
    assert row["completion_tokens"] == 30


async def test_cancel_closes_the_upstream_and_saves_the_partial_summary(
    search_stub, user, mock_model, db_conn
):
    aborts = len(mock_model.aborts)
    call = search_stub.Search(
        pb.SearchRequest(query="never ending [mock:tokens=400 rate=20]"), metadata=user.md, timeout=30
    )
    events = []
    async for event in call:
        events.append(event)
        if kinds(events).count("summary_delta") == 2:
            break
    search_id = events[0].search_id
    cancelled = await search_stub.CancelSearch(pb.CancelSearchRequest(search_id=search_id), metadata=user.md)
    assert cancelled.search.status == CANCELLED
    assert cancelled.search.summary.startswith(summary(events))
    assert 0 < len(cancelled.search.summary.split()) < 400

    async for event in call:  # the watcher gets the end of the story, then the stream ends OK
        events.append(event)
    assert events[-1].completed.search.status == CANCELLED
    assert events[-1].completed.search.summary == cancelled.search.summary
    assert await call.code() == grpc.StatusCode.OK
    await mock_model.wait_for_abort(timeout=5, count=aborts + 1)  # the upstream stream was closed
    row = await db_conn.fetchrow("SELECT * FROM search_queries WHERE id = $1", uuid.UUID(search_id))
    assert row["status"] == "cancelled" and row["summary"] == cancelled.search.summary
    assert row["usage_estimated"] and row["completion_tokens"] > 0


async def test_cancel_reaches_a_search_running_on_another_replica(web_stub, search_stub, user, engines):
    call = web_stub.Search(
        pb.SearchRequest(query="slow [mock:tokens=400 rate=20]", providers=["history"]),
        metadata=user.md,
        timeout=30,
    )
    events = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "summary_delta":
            break
    # search_stub talks to the other server process-wide: the cancel travels by NOTIFY.
    cancelled = await search_stub.CancelSearch(
        pb.CancelSearchRequest(search_id=events[0].search_id), metadata=user.md
    )
    assert cancelled.search.status == CANCELLED and cancelled.search.summary
    async for event in call:
        events.append(event)
    assert events[-1].completed.search.status == CANCELLED


async def test_cancelling_a_finished_search_is_a_failed_precondition(search_stub, user):
    events = await collect(search_stub, user.md, query="finished already")
    await expect_error(
        search_stub.CancelSearch(pb.CancelSearchRequest(search_id=events[0].search_id), metadata=user.md),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="GENERATION_NOT_ACTIVE",
    )


# -- model failures -------------------------------------------------------------------------------


async def test_an_upstream_rate_limit_fails_the_search_with_retry_info(search_stub, user, db_conn):
    events, err = await collect_until_error(
        search_stub, user.md, query="busy [mock:status=429 retry-after=2]"
    )
    d = details(err)
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED and d.reason == "UPSTREAM_RATE_LIMITED"
    assert d.retry_after == pytest.approx(2)
    assert kinds(events) == ["started", "sources_found"]
    row = await wait_for_row(db_conn, events[0].search_id, lambda r: r["status"] != "running")
    assert row["status"] == "failed" and row["error_reason"] == "UPSTREAM_RATE_LIMITED"


async def test_an_upstream_cut_mid_summary_keeps_the_partial_summary(search_stub, user, db_conn):
    events, err = await collect_until_error(search_stub, user.md, query="cut [mock:tokens=20 cut-after=4]")
    assert details(err).reason == "UPSTREAM_UNAVAILABLE"
    row = await wait_for_row(db_conn, events[0].search_id, lambda r: r["status"] != "running")
    assert row["status"] == "failed" and row["summary"] == summary(events) != ""


# -- preferences ----------------------------------------------------------------------------------


async def test_preferences_choose_the_providers_model_temperature_and_system_prompt(
    web_stub, user, engines, mock_model, db_conn
):
    await set_preferences(
        db_conn,
        user.id,
        {
            "search_providers": ["tavily"],
            "temperature": 0.2,
            "chat_model": "gpt-4o",
            "system_prompt": "Answer like a pirate.",
        },
    )
    word = marker()
    events = await collect(web_stub, user.md, query=f"rivers {word}")
    done = events[-1].completed.search
    assert list(done.providers) == ["tavily"] and done.model == "gpt-4o"
    assert len(engines["tavily"].requests) == 1 and not engines["searxng"].requests
    body = chat_request_with(mock_model, word)
    assert body["model"] == "gpt-4o" and body["temperature"] == 0.2
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][0]["content"].startswith("Answer like a pirate.")

    # The request overrides the preference.
    events = await collect(web_stub, user.md, query="rivers", providers=["brave"])
    assert list(events[-1].completed.search.providers) == ["brave"]


async def test_without_preferences_every_configured_web_provider_is_asked(web_stub, user, engines):
    events = await collect(web_stub, user.md, query="rivers")
    assert list(events[-1].completed.search.providers) == ["searxng", "brave", "tavily"]
    assert all(len(engines[n].requests) == 1 for n in ("searxng", "brave", "tavily"))


# -- idempotency, list, get, delete, export -------------------------------------------------------


async def test_a_retry_with_the_same_client_request_id_does_not_search_twice(search_stub, user, db_conn):
    request_id = str(uuid.uuid4())
    first = await collect(search_stub, user.md, query="idempotent please", client_request_id=request_id)
    again = await collect(search_stub, user.md, query="idempotent please", client_request_id=request_id)
    assert again[0].search_id == first[0].search_id
    assert summary(again) == summary(first)
    assert again[-1].completed.search == first[-1].completed.search
    count = await db_conn.fetchval(
        "SELECT count(*) FROM search_queries WHERE user_id = $1", uuid.UUID(user.id)
    )
    assert count == 1
    await expect_error(
        collect(search_stub, user.md, query="another query", client_request_id=request_id),
        grpc.StatusCode.ALREADY_EXISTS,
        reason="ALREADY_EXISTS",
    )


async def test_list_searches_pages_newest_first(search_stub, user):
    ids = []
    for q in ("first query", "second query", "third query"):
        ids.append((await collect(search_stub, user.md, query=q))[0].search_id)
    page = await search_stub.ListSearches(pb.ListSearchesRequest(page_size=2), metadata=user.md)
    assert [s.id for s in page.searches] == ids[::-1][:2] and page.next_page_token
    rest = await search_stub.ListSearches(
        pb.ListSearchesRequest(page_size=2, page_token=page.next_page_token), metadata=user.md
    )
    assert [s.id for s in rest.searches] == ids[:1] and not rest.next_page_token
    assert rest.searches[0].status == COMPLETED and rest.searches[0].query == "first query"


async def test_delete_search_removes_it(search_stub, user):
    search_id = (await collect(search_stub, user.md, query="delete me"))[0].search_id
    await search_stub.DeleteSearch(pb.DeleteSearchRequest(search_id=search_id), metadata=user.md)
    await expect_error(
        search_stub.GetSearch(pb.GetSearchRequest(search_id=search_id), metadata=user.md),
        grpc.StatusCode.NOT_FOUND,
        reason="NOT_FOUND",
    )


async def test_another_users_search_is_not_found(search_stub, user, other_user):
    search_id = (await collect(search_stub, user.md, query="private matters"))[0].search_id
    for call in (
        search_stub.GetSearch(pb.GetSearchRequest(search_id=search_id), metadata=other_user.md),
        search_stub.DeleteSearch(pb.DeleteSearchRequest(search_id=search_id), metadata=other_user.md),
        search_stub.CancelSearch(pb.CancelSearchRequest(search_id=search_id), metadata=other_user.md),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, reason="NOT_FOUND")
    listed = await search_stub.ListSearches(pb.ListSearchesRequest(), metadata=other_user.md)
    assert search_id not in [s.id for s in listed.searches]
    still = await search_stub.GetSearch(pb.GetSearchRequest(search_id=search_id), metadata=user.md)
    assert still.search.status == COMPLETED


async def test_export_includes_searches_with_their_sources(search_stub, auth_stub, user, db_conn):
    await add_chat_message(db_conn, user.id, "Notes on the walrus migration")
    done = (await collect(search_stub, user.md, query="walrus migration"))[-1].completed.search
    chunks = [
        c.data
        async for c in auth_stub.ExportUserData(auth_pb.ExportUserDataRequest(), metadata=user.md, timeout=20)
    ]
    exported = orjson.loads(b"".join(chunks))
    [record] = exported["searches"]
    assert record["id"] == done.id and record["summary"] == done.summary and record["status"] == "completed"
    assert [s["url"] for s in record["sources"]] == [s.url for s in done.sources]
    assert record["sources"][0]["index"] == 1


# -- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 2001}, "query"),
        ({"query": "ok", "providers": ["bing"]}, "providers"),
        ({"query": "ok", "providers": ["brave"]}, "providers"),  # not configured on this server
        ({"query": "ok", "max_sources": 21}, "max_sources"),
        ({"query": "ok", "max_sources": -1}, "max_sources"),
        ({"query": "ok", "client_request_id": "not-a-uuid"}, "client_request_id"),
    ],
)
async def test_bad_search_input_names_the_field_and_writes_nothing(
    search_stub, user, db_conn, request_fields, field
):
    await expect_error(
        collect(search_stub, user.md, **request_fields),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason="INVALID_ARGUMENT",
        field=field,
    )
    count = await db_conn.fetchval(
        "SELECT count(*) FROM search_queries WHERE user_id = $1", uuid.UUID(user.id)
    )
    assert count == 0


async def test_bad_ids_and_page_tokens_name_the_field(search_stub, user):
    for call, field in (
        (search_stub.GetSearch(pb.GetSearchRequest(search_id="nope"), metadata=user.md), "search_id"),
        (search_stub.DeleteSearch(pb.DeleteSearchRequest(search_id=""), metadata=user.md), "search_id"),
        (search_stub.CancelSearch(pb.CancelSearchRequest(search_id="1"), metadata=user.md), "search_id"),
        (
            search_stub.ListSearches(pb.ListSearchesRequest(page_token="garbage!"), metadata=user.md),
            "page_token",
        ),
        (search_stub.ListSearches(pb.ListSearchesRequest(page_size=101), metadata=user.md), "page_size"),
    ):
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field=field)


async def test_search_needs_a_signed_in_caller(search_stub):
    await expect_error(
        collect(search_stub, (), query="anonymous"), grpc.StatusCode.UNAUTHENTICATED, reason="TOKEN_MISSING"
    )


async def test_a_used_up_daily_search_quota_refuses_and_saves_nothing(search_stub, user, settings, db_conn):
    await db_conn.execute(
        "INSERT INTO usage_counters (user_id, day, kind, amount) "
        "VALUES ($1, (now() AT TIME ZONE 'utc')::date, 'searches', $2)",
        uuid.UUID(user.id),
        settings.quota_daily_searches,
    )
    d = await expect_error(
        collect(search_stub, user.md, query="one too many"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason="QUOTA_EXCEEDED",
    )
    assert d.retry_after is not None and d.retry_after > 0
    count = await db_conn.fetchval(
        "SELECT count(*) FROM search_queries WHERE user_id = $1", uuid.UUID(user.id)
    )
    assert count == 0


async def test_a_retry_on_another_replica_follows_the_running_search_to_its_end(web_stub, search_stub, user):
    request_id = str(uuid.uuid4())
    query = "follow me [mock:tokens=12 rate=20]"
    call = web_stub.Search(
        pb.SearchRequest(query=query, providers=["history"], client_request_id=request_id),
        metadata=user.md,
        timeout=20,
    )
    first = []
    async for event in call:
        first.append(event)
        if event.WhichOneof("event") == "summary_delta":
            break
    # The same request on the other server: not run again, replayed from the record once saved.
    again = await collect(search_stub, user.md, query=query, client_request_id=request_id)
    first += [e async for e in call]
    assert again[0].search_id == first[0].search_id
    assert_well_formed(again)
    assert again[-1].completed.search.status == COMPLETED
    assert summary(again) == summary(first) == again[-1].completed.search.summary


async def test_cancel_closes_a_search_whose_process_is_gone(search_stub, user, db_conn):
    search_id = uuid.uuid4()
    await db_conn.execute(
        "INSERT INTO search_queries (id, user_id, query, status) VALUES ($1, $2, 'orphan', 'running')",
        search_id,
        uuid.UUID(user.id),
    )
    cancelled = await search_stub.CancelSearch(
        pb.CancelSearchRequest(search_id=str(search_id)), metadata=user.md, timeout=20
    )
    assert cancelled.search.status == CANCELLED
    row = await db_conn.fetchrow("SELECT status FROM search_queries WHERE id = $1", search_id)
    assert row["status"] == "cancelled"
