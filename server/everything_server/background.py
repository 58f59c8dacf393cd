"""Generations that outlive the RPC that started them, and cancels that reach them on any replica.

A client that disconnects does not stop a generation: the work runs as a detached task registered
here under a key (for example "message:<uuid>"). `request_cancel` sends a NOTIFY on CANCEL_CHANNEL;
every replica's registry receives it and cancels the task if it runs there, which closes the
upstream HTTP stream (the task's `finally` blocks save the partial result).

On shutdown, `drain` gives running generations the grace period to finish and then cancels the
rest, so their `finally` blocks save what they have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine

from everything_server.db.database import Database
from everything_server.db.pubsub import PubSub, notify

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "everything_cancel"


class Background:
    def __init__(self, db: Database, pubsub: PubSub):
        self._db = db
        self._pubsub = pubsub
        self._tasks: dict[str, asyncio.Task] = {}
        self.cancel_requested: set[str] = set()

    async def start(self) -> None:
        await self._pubsub.subscribe(CANCEL_CHANNEL, self._on_cancel)

    def spawn(self, key: str, coro: Coroutine) -> asyncio.Task:
        """Run `coro` detached from the caller. A second spawn under a running key is refused."""
        if key in self._tasks:
            coro.close()
            raise RuntimeError(f"{key} is already running here")
        task = asyncio.create_task(coro, name=key)
        self._tasks[key] = task

        def done(t: asyncio.Task) -> None:
            self._tasks.pop(key, None)
            self.cancel_requested.discard(key)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception(), extra={"key": key})

        task.add_done_callback(done)
        return task

    def running(self, key: str) -> asyncio.Task | None:
        return self._tasks.get(key)

    def cancel_local(self, key: str) -> bool:
        task = self._tasks.get(key)
        if task is None or task.done():
            return False
        self.cancel_requested.add(key)
        task.cancel()
        return True

    async def request_cancel(self, key: str) -> None:
        """Cancel wherever it runs: here directly, elsewhere through NOTIFY."""
        if self.cancel_local(key):
            return
        async with self._db.transaction() as session:
            await notify(session, CANCEL_CHANNEL, key)

    def _on_cancel(self, key: str) -> None:
        self.cancel_local(key)

    async def drain(self, grace: float) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        if not tasks:
            return
        log.info("waiting for running generations", extra={"count": len(tasks), "grace_seconds": grace})
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(pending, timeout=5)
