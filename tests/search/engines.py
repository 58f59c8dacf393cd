"""Fake web search engines over loopback: SearXNG's JSON API, Brave's web search API and Tavily's
search API, each on its own port so one can be taken down (connection refused) while the others run.

Each engine answers like the real one (the response shapes of the public APIs), checks the auth
header the real one wants, records every request, and can be switched to fail: `status` (an HTTP
error), `stall` (no answer until released or 10 s), `garbage` (a 200 that is not JSON) or `down`
(the port is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SHARED_URL = "https://shared.example/page"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Engine:
    name: str
    key: str | None = None  # the credential this engine accepts
    mode: str = "ok"  # ok | status | stall | garbage | down
    status: int = 500
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None
    site: web.TCPSite | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def searxng_results(q: str) -> dict:
    return {
        "query": q,
        "number_of_results": 4,
        "results": [
            {
                "title": f"SearX result {i}",
                "url": f"https://searx.example/{i}",
                "content": f"<b>Rivers</b> are long &amp; searx snippet {i}",
                "engine": "duckduckgo",
                "engines": ["duckduckgo"],
                "score": 1.0 / i,
            }
            for i in (1, 2, 3)
        ]
        + [
            {
                "title": "Shared page",
                "url": SHARED_URL,
                "content": "found by several engines",
                "engine": "bing",
            },
            {"title": "Not a web link", "url": "javascript:alert(1)", "content": "dropped", "engine": "x"},
        ],
        "answers": [],
        "suggestions": [],
        "unresponsive_engines": [],
    }


def brave_results(q: str) -> dict:
    return {
        "type": "search",
        "query": {"original": q},
        "web": {
            "type": "search",
            "results": [
                {
                    "title": "Brave result 1",
                    "url": "https://brave.example/1",
                    "description": "A <strong>bold</strong> claim about rivers",
                    "type": "search_result",
                },
                {"title": "Shared page", "url": SHARED_URL + "/", "description": "the same page again"},
            ],
        },
    }


def tavily_results(q: str, n: int) -> dict:
    return {
        "query": q,
        "answer": None,
        "results": [
            {
                "title": f"Tavily result {i}",
                "url": f"https://tavily.example/{i}",
                "content": f"Tavily content {i} about rivers",
                "score": 0.9 - i / 10,
            }
            for i in range(1, min(n, 3) + 1)
        ],
        "response_time": 0.12,
    }


class FakeEngines:
    def __init__(self, *, brave_key: str, tavily_key: str):
        self.engines = {
            "searxng": Engine("searxng"),
            "brave": Engine("brave", key=brave_key),
            "tavily": Engine("tavily", key=tavily_key),
        }
        self._release = asyncio.Event()

    def __getitem__(self, name: str) -> Engine:
        return self.engines[name]

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        routes = {
            "searxng": [web.get("/search", self._searxng)],
            "brave": [web.get("/res/v1/web/search", self._brave)],
            "tavily": [web.post("/search", self._tavily)],
        }
        for name, engine in self.engines.items():
            app = web.Application()
            app.add_routes(routes[name])
            engine.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await engine.runner.setup()
            await self._listen(engine)

    async def _listen(self, engine: Engine) -> None:
        assert engine.runner is not None
        engine.site = web.TCPSite(engine.runner, "127.0.0.1", engine.port, reuse_address=True)
        await engine.site.start()
        if engine.port == 0:
            engine.port = engine.site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        for engine in self.engines.values():
            if engine.runner is not None:
                await engine.runner.cleanup()

    async def set_mode(self, name: str, mode: str, status: int = 500) -> None:
        engine = self.engines[name]
        if mode == "down" and engine.mode != "down":
            assert engine.site is not None and engine.runner is not None and engine.runner.server is not None
            await engine.site.stop()
            # Kept-alive connections would still reach it: a down engine has none.
            for conn in engine.runner.server.connections:
                conn.force_close()
        elif mode != "down" and engine.mode == "down":
            await self._listen(engine)
        engine.mode, engine.status = mode, status

    async def reset(self, *, brave_key: str, tavily_key: str) -> None:
        self._release.set()
        self._release = asyncio.Event()
        for engine in self.engines.values():
            await self.set_mode(engine.name, "ok")
            engine.requests.clear()
        self.engines["brave"].key = brave_key
        self.engines["tavily"].key = tavily_key

    # -- handlers -----------------------------------------------------------------------------------

    async def _record(self, engine: Engine, request: web.Request) -> web.Response | None:
        body = None
        if request.can_read_body:
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(await request.read())
        engine.requests.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if engine.mode == "status":
            return web.json_response({"error": f"fake {engine.name} failure"}, status=engine.status)
        if engine.mode == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), 10)
            return web.json_response({"results": []})
        if engine.mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        return None

    async def _searxng(self, request: web.Request) -> web.Response:
        engine = self.engines["searxng"]
        if (failed := await self._record(engine, request)) is not None:
            return failed
        if request.query.get("format") != "json":
            return web.Response(status=403, text="format not allowed")
        return web.json_response(searxng_results(request.query.get("q", "")))

    async def _brave(self, request: web.Request) -> web.Response:
        engine = self.engines["brave"]
        if (failed := await self._record(engine, request)) is not None:
            return failed
        if request.headers.get("X-Subscription-Token") != engine.key:
            return web.json_response({"type": "ErrorResponse", "error": {"status": 401}}, status=401)
        return web.json_response(brave_results(request.query.get("q", "")))

    async def _tavily(self, request: web.Request) -> web.Response:
        engine = self.engines["tavily"]
        if (failed := await self._record(engine, request)) is not None:
            return failed
        if request.headers.get("Authorization") != f"Bearer {engine.key}":
            return web.json_response(
                {"detail": {"error": "Unauthorized: missing or invalid API key."}}, status=401
            )
        body = engine.requests[-1].body or {}
        return web.json_response(tavily_results(body.get("query", ""), int(body.get("max_results", 5))))
