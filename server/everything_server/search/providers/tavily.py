"""Tavily search API: `POST https://api.tavily.com/search` with `Authorization: Bearer <key>` and
`{"query": ..., "max_results": N}`. Results are `results[].{title, url, content, score}`, already
ranked. `max_results` is at most 20."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.search.providers.base import Hit, ProviderError
from everything_server.search.providers.web import fetch_json, hits_from

MAX_RESULTS = 20


class TavilyProvider:
    name = "tavily"
    uses_database = False

    def __init__(self, client: httpx.AsyncClient, url: str, api_key: str):
        self._client = client
        self._url = url
        self._key = api_key

    async def search(
        self, query: str, *, limit: int, user_id: uuid.UUID, session: AsyncSession | None
    ) -> list[Hit]:
        data = await fetch_json(
            self._client,
            self.name,
            "POST",
            self._url,
            json={"query": query, "max_results": min(limit, MAX_RESULTS), "search_depth": "basic"},
            headers={"Authorization": f"Bearer {self._key}"},
        )
        if not isinstance(data, dict):
            raise ProviderError(self.name, "unexpected response shape")
        return hits_from(data.get("results"), self.name, snippet_key="content", limit=limit)
