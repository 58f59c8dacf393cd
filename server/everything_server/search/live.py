"""The event log of a search running in this process, for the RPCs that watch it.

The search runs as a detached task and appends events here; each watcher reads the log from the
start at its own pace (so a watcher that attaches late, like an idempotent retry, sees everything)
and waits for more. Nothing is dropped and nothing blocks the writer: a log holds one search's
events (the summary is bounded by the model's max_tokens) and goes away when the search ends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from everything_server.search.models import Body, Event


class LiveSearch:
    def __init__(self, search_id: uuid.UUID):
        self.search_id = search_id
        self.events: list[Event] = []
        self.done = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    def emit(self, body: Body) -> Event:
        event = Event(self.search_id, len(self.events) + 1, body)
        self.events.append(event)
        self._wake()
        return event

    def end(self, error: BaseException | None = None) -> None:
        """No more events. Watchers raise `error` (a domain error) once they have read the log."""
        self.done = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self) -> AsyncIterator[Event]:
        seen = 0
        while True:
            while seen < len(self.events):
                seen += 1
                yield self.events[seen - 1]
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await self._changed.wait()
