"""Pacing of streamed text (`EVERYTHING_STREAM_INTERVAL_MS`), for chat replies and search summaries.

After a follower sends a text delta it waits for the next tick of a clock shared by every stream of
the process (the multiples of `interval` of loop time), then sends, as one message, every delta
that came meanwhile. So a stream costs one message (one write, one wake-up of the client) per
interval instead of one per token, and the streams' messages go out together, in one wake-up of the
loop instead of one each. The first delta is never held (time to first token is unchanged), nor is
the end: whatever is not a delta (usage, a title, the end) calls `wake`, and waiting followers go on
at once.
"""

from __future__ import annotations

import asyncio


class Pacer:
    """The followers of one stream that are waiting for the next tick (`pause`), so that `wake` can
    end their wait early."""

    def __init__(self) -> None:
        self._pausing: set[asyncio.Future] = set()

    async def pause(self, sent: float, interval: float) -> None:
        """Wait for the first tick of the shared clock after loop time `sent` (when the last delta
        went out), or less if `wake` is called meanwhile."""
        loop = asyncio.get_running_loop()
        seconds = (sent // interval + 1) * interval - loop.time()
        if seconds <= 0:
            return
        waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        self._pausing.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._pausing.discard(waiter)

    @property
    def waiting(self) -> int:
        """How many followers wait for a tick now."""
        return len(self._pausing)

    def wake(self) -> None:
        """Something other than text came: no follower waits for the tick."""
        for waiter in self._pausing:
            _wake(waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
