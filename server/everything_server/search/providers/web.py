"""What the web providers share: one bounded JSON request, and cleaning of what engines send back.

Engines return HTML fragments in snippets (`<strong>` around matches, entities) and, now and then,
odd URLs. Hits keep plain text and only absolute http(s) URLs, so a client can render a source as a
link without trusting the engine.
"""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from everything_server.search.providers.base import Hit, ProviderError

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TITLE = 300
MAX_SNIPPET = 600
MAX_URL = 2048
USER_AGENT = "everything-search/1"

_TAG = re.compile(r"<[^>]{0,500}>")
_SPACE = re.compile(r"\s+")


def clean_text(value: Any, limit: int, *, markup: bool = True) -> str:
    """One line of plain text, at most `limit` characters. With `markup` (an engine's HTML fragment)
    tags are dropped and entities decoded; without (the user's own text) only spaces are collapsed."""
    if not isinstance(value, str):
        return ""
    if markup:
        value = html.unescape(_TAG.sub("", value))
    text = _SPACE.sub(" ", value).strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def web_url(value: Any) -> str | None:
    """The URL if it is an absolute http(s) URL of sane length, else None."""
    if not isinstance(value, str) or not value or len(value) > MAX_URL:
        return None
    value = value.strip()
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        return None
    return value


def hits_from(items: Any, provider: str, *, snippet_key: str, limit: int) -> list[Hit]:
    """Hits from a list of result objects with `title`, `url` and `snippet_key`; bad items skipped."""
    if not isinstance(items, list):
        raise ProviderError(provider, "unexpected response shape")
    hits: list[Hit] = []
    for item in items:
        if len(hits) >= limit:
            break
        if not isinstance(item, dict):
            continue
        url = web_url(item.get("url"))
        if url is None:
            continue
        title = clean_text(item.get("title"), MAX_TITLE) or url
        hits.append(Hit(title, url, clean_text(item.get(snippet_key), MAX_SNIPPET), provider))
    return hits


async def fetch_json(client: httpx.AsyncClient, provider: str, method: str, url: str, **kwargs: Any) -> Any:
    """One request; the parsed JSON body of a 200 answer, else ProviderError. The body is capped."""
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    try:
        async with client.stream(method, url, headers=headers, **kwargs) as response:
            if response.status_code != 200:
                raise ProviderError(provider, f"HTTP {response.status_code}", status=response.status_code)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ProviderError(provider, "response too large")
    except httpx.TimeoutException:
        raise ProviderError(provider, "timed out") from None
    except httpx.HTTPError as exc:
        # The exception text can hold the URL (and so the query); only its class is kept.
        raise ProviderError(provider, f"request failed ({type(exc).__name__})") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProviderError(provider, "response is not JSON") from None
