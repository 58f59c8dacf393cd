"""SearXNG, the self-hosted metasearch engine: `GET {base}/search?q=...&format=json`.

The instance must allow the JSON format (`search.formats: [html, json]` in its settings.yml); when it
does not it answers 403, which is logged as such. Results are `results[].{title, url, content,
engine}`; SearXNG has no result-count parameter, so the list is cut here.
"""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.search.providers.base import Hit, ProviderError
from everything_server.search.providers.web import fetch_json, hits_from


class SearxngProvider:
    name = "searxng"
    uses_database = False

    def __init__(self, client: httpx.AsyncClient, base_url: str):
        self._client = client
        self._url = base_url.rstrip("/") + "/search"

    async def search(
        self, query: str, *, limit: int, user_id: uuid.UUID, session: AsyncSession | None
    ) -> list[Hit]:
        data = await fetch_json(
            self._client, self.name, "GET", self._url, params={"q": query, "format": "json", "pageno": "1"}
        )
        if not isinstance(data, dict):
            raise ProviderError(self.name, "unexpected response shape")
        return hits_from(data.get("results"), self.name, snippet_key="content", limit=limit)
