"""The search provider interface: every source of hits (web engines, the user's own history) is one
`SearchProvider`. Providers raise `ProviderError` for anything that went wrong on their side; the
service decides what a failure means (another provider, a fallback, or UNAVAILABLE)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class Hit:
    """One result: `url` is a web URL or an `everything:` URI for the user's own history."""

    title: str
    url: str
    snippet: str
    provider: str


class ProviderError(Exception):
    """A provider failed: unreachable, timed out, refused us, or answered something unusable.

    `detail` is safe to log (a status code or an error class, never the query or a key)."""

    def __init__(self, provider: str, detail: str, *, status: int | None = None):
        super().__init__(f"{provider}: {detail}")
        self.provider = provider
        self.detail = detail
        self.status = status


class SearchProvider(Protocol):
    # The name clients use ("searxng", "brave", "tavily", "history").
    name: str
    # True when `search` needs the caller's database session (the service opens a short
    # transaction for it); web providers get `session=None` so no connection waits on the network.
    uses_database: bool

    async def search(
        self, query: str, *, limit: int, user_id: uuid.UUID, session: AsyncSession | None
    ) -> list[Hit]: ...
