"""Search providers by name, built from the settings: a web provider exists only when configured."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from everything_server.config import Settings
from everything_server.search.providers.base import Hit, ProviderError, SearchProvider
from everything_server.search.providers.brave import BraveProvider
from everything_server.search.providers.history import HistoryProvider
from everything_server.search.providers.searxng import SearxngProvider
from everything_server.search.providers.tavily import TavilyProvider

WEB = ("searxng", "brave", "tavily")
KNOWN = (*WEB, "history")

__all__ = ["KNOWN", "WEB", "Hit", "ProviderError", "Providers", "SearchProvider", "build"]


@dataclass
class Providers:
    by_name: dict[str, SearchProvider]
    client: httpx.AsyncClient | None = None  # shared by the web providers

    @property
    def web(self) -> tuple[str, ...]:
        """The configured web providers, in the default order."""
        return tuple(name for name in WEB if name in self.by_name)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def build(settings: Settings) -> Providers:
    by_name: dict[str, SearchProvider] = {}
    client = None
    if settings.searxng_url or settings.brave_api_key or settings.tavily_api_key:
        # The service bounds each call as a whole too; these stop a slow connect or a trickling body.
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.search_timeout_seconds),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            follow_redirects=False,
        )
        if settings.searxng_url:
            by_name["searxng"] = SearxngProvider(client, settings.searxng_url)
        if settings.brave_api_key:
            by_name["brave"] = BraveProvider(
                client, settings.brave_url, settings.brave_api_key.get_secret_value()
            )
        if settings.tavily_api_key:
            by_name["tavily"] = TavilyProvider(
                client, settings.tavily_url, settings.tavily_api_key.get_secret_value()
            )
    by_name["history"] = HistoryProvider()
    return Providers(by_name, client)
