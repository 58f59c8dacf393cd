"""The event log of a search running in this process, for the RPCs that watch it.

The search runs as a detached task and appends events here; each watcher reads the log from the
start at its own pace (so a watcher that attaches late, like an idempotent retry, sees everything)
and waits for more. Nothing is dropped and nothing blocks the writer: a log holds one search's
events (the summary is bounded by the model's max_tokens) and goes away when the search ends.

Summary deltas that are ready together go out as one, and with an `interval` they are paced as a
chat reply's text is (`pacing`). A watcher numbers the events it sends, so its stream's seq still
counts 1, 2, 3, ...
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from everything_server.pacing import Pacer
from everything_server.search.models import Body, Event, SummaryDelta


class LiveSearch:
    def __init__(self, search_id: uuid.UUID):
        self.search_id = search_id
        self.events: list[Event] = []
        self.done = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._pacer = Pacer()  # watchers pacing the summary (`watch`)

    def emit(self, body: Body) -> Event:
        event = Event(self.search_id, len(self.events) + 1, body)
        self.events.append(event)
        if not isinstance(body, SummaryDelta):
            self._pacer.wake()
        self._wake()
        return event

    def end(self, error: BaseException | None = None) -> None:
        """No more events. Watchers raise `error` (a domain error) once they have read the log."""
        self.done = True
        self.error = error
        self._pacer.wake()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _ending(self, seen: int) -> bool:
        """The end, or an event other than text, is there past the first `seen` events."""
        return self.done or any(not isinstance(e.body, SummaryDelta) for e in self.events[seen:])

    async def watch(self, interval: float = 0.0) -> AsyncIterator[Event]:
        """The events from the first, then live ones, until the end (a domain error is raised
        there, if the search failed)."""
        loop = asyncio.get_running_loop()
        seen = sent_count = 0
        while True:
            if seen < len(self.events):
                sent = loop.time()
                ready = self.events[seen:]
                seen += len(ready)
                for body in coalesce(ready):
                    sent_count += 1
                    yield Event(self.search_id, sent_count, body)
                if interval > 0 and isinstance(ready[-1].body, SummaryDelta) and not self._ending(seen):
                    await self._pacer.pause(sent, interval)
                continue
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await self._changed.wait()


def coalesce(events: list[Event]) -> list[Body]:
    """The bodies of `events`, consecutive summary deltas as one."""
    out: list[Body] = []
    run: list[str] = []
    for ev in events:
        if isinstance(ev.body, SummaryDelta):
            run.append(ev.body.text)
            continue
        if run:
            out.append(SummaryDelta("".join(run)))
            run.clear()
        out.append(ev.body)
    if run:
        out.append(SummaryDelta("".join(run)))
    return out
