"""Cross-replica signals over PostgreSQL LISTEN/NOTIFY.

Each process keeps one dedicated asyncpg connection for LISTEN (never a pooled one: a pooled
connection would carry LISTENs to other users of the pool). Local subscribers register callbacks per
channel; the first subscriber issues LISTEN, the last one UNLISTEN. If the connection drops, the hub
reconnects and re-LISTENs, and subscribers are told (`on_reconnect`) so they can re-read from the
database what they may have missed. NOTIFY goes through any connection (`notify`), inside or
outside a transaction (inside, it is delivered at commit).

Payloads are limited by PostgreSQL to just under 8000 bytes; senders keep them small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

Callback = Callable[[str], None]
MAX_PAYLOAD = 7900


def plain_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def notify(session: AsyncSession, channel: str, payload: str) -> None:
    """Send a notification in the caller's transaction (delivered when it commits)."""
    await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


class PubSub:
    def __init__(self, url: str, *, reconnect_delay: float = 0.5):
        self._url = plain_url(url)
        self._conn: asyncpg.Connection | None = None
        self._subs: dict[str, set[Callback]] = defaultdict(set)
        self._reconnect_hooks: set[Callable[[], None]] = set()
        self._lock = asyncio.Lock()
        self._closed = False
        self._delay = reconnect_delay
        self._supervisor: asyncio.Task | None = None
        self._lost = asyncio.Event()

    def set_url(self, url: str) -> None:
        """Connect as someone else (start-up only)."""
        self._url = plain_url(url)

    async def start(self) -> None:
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="pubsub-supervisor")

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url, server_settings={"application_name": "everything-listen"})
        conn.add_termination_listener(lambda _c: self._lost.set())
        for channel in list(self._subs):
            await conn.add_listener(channel, self._dispatch)
        self._conn = conn

    async def _supervise(self) -> None:
        while not self._closed:
            await self._lost.wait()
            self._lost.clear()
            if self._closed:
                return
            log.warning("listen connection lost; reconnecting")
            self._conn = None
            while not self._closed:
                try:
                    async with self._lock:
                        await self._connect()
                    break
                except (OSError, asyncpg.PostgresError):
                    await asyncio.sleep(self._delay)
            for hook in list(self._reconnect_hooks):
                hook()

    def _dispatch(self, _conn, _pid, channel: str, payload: str) -> None:
        for cb in list(self._subs.get(channel, ())):
            try:
                cb(payload)
            except Exception:
                log.exception("pubsub callback failed", extra={"channel": channel})

    async def subscribe(self, channel: str, callback: Callback) -> None:
        async with self._lock:
            first = not self._subs[channel]
            self._subs[channel].add(callback)
            if first and self._conn is not None and not self._conn.is_closed():
                await self._conn.add_listener(channel, self._dispatch)

    async def unsubscribe(self, channel: str, callback: Callback) -> None:
        async with self._lock:
            subs = self._subs.get(channel)
            if not subs:
                return
            subs.discard(callback)
            if not subs:
                del self._subs[channel]
                if self._conn is not None and not self._conn.is_closed():
                    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        await self._conn.remove_listener(channel, self._dispatch)

    def on_reconnect(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Register a hook run after a reconnect; returns a function that removes it."""
        self._reconnect_hooks.add(hook)
        return lambda: self._reconnect_hooks.discard(hook)

    async def close(self) -> None:
        self._closed = True
        self._lost.set()
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
