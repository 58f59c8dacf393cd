"""Brave Search API: `GET https://api.search.brave.com/res/v1/web/search?q=...&count=N` with the
`X-Subscription-Token` header. Results are `web.results[].{title, url, description}`; descriptions
carry `<strong>` markup, removed here. `count` is at most 20."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.search.providers.base import Hit, ProviderError
from everything_server.search.providers.web import fetch_json, hits_from

MAX_COUNT = 20


class BraveProvider:
    name = "brave"
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
            "GET",
            self._url,
            params={"q": query, "count": str(min(limit, MAX_COUNT))},
            headers={"X-Subscription-Token": self._key},
        )
        if not isinstance(data, dict):
            raise ProviderError(self.name, "unexpected response shape")
        web = data.get("web")
        if web is None:  # no web results at all (for example only news or videos matched)
            return []
        if not isinstance(web, dict):
            raise ProviderError(self.name, "unexpected response shape")
        return hits_from(web.get("results", []), self.name, snippet_key="description", limit=limit)
