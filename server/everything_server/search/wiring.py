"""Builds the SearchService servicer from the container: providers from the settings, the export
section "searches" (with sources), and closing the providers' HTTP client at shutdown."""

from __future__ import annotations

from everything_server.search import convert, providers
from everything_server.search.service import SearchService
from everything_server.search.servicer import SearchServicer


def install(c) -> SearchServicer:
    registry = providers.build(c.settings)
    service = SearchService(c.db, c.ai, c.background, registry, c.settings, limits=c.limits)

    async def export_searches(p, include_bytes: bool):
        async for row in service.export(p, include_bytes):
            yield convert.search_export(row)

    c.exporter.add_section("searches", export_searches)
    c.shutdown_hooks.append(registry.aclose)
    return SearchServicer(service)
