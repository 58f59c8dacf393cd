"""The engine and the one way to run a unit of work: a short transaction with the caller set.

Every unit of work on behalf of a user starts with `set_config('app.user_id', <id>, true)`: the
setting is transaction-local, so it can never leak to the next user of a pooled connection, and
row-level security policies can rely on it. The same round trip checks that the caller's session is
still live, so a revoked session's access token stops working at once, on every replica. BEGIN
goes out in that same round trip (`_begin_as_caller`): a unary call's transaction costs BEGIN+caller,
its statements and COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import cache, partial
from typing import Any, TypeVar

import asyncpg
from opentelemetry import trace
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.instrumentation import ClassManager, manager_of_class
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from everything_server import errors

T = TypeVar("T")

_SET_CALLER = text(
    "SELECT set_config('app.user_id', :uid, true) AS uid, "
    "       app_session_is_live(CAST(:sid AS uuid), CAST(:uid AS uuid)) AS live"
)
_SET_USER = text("SELECT set_config('app.user_id', :uid, true)")
_BEGIN = {None: "BEGIN", "read_committed": "BEGIN ISOLATION LEVEL READ COMMITTED"}


def _session_ended() -> errors.Unauthenticated:
    return errors.Unauthenticated("the session has ended; sign in again", reason="SESSION_REVOKED")


_UNREAD = object()

# What `Database.patiently` tries again.
_RETRIED = ("DATABASE_UNAVAILABLE", "DATABASE_BUSY")


def _database_unavailable() -> errors.Unavailable:
    return errors.Unavailable("the database is unavailable", reason="DATABASE_UNAVAILABLE")


async def _after_driver_error(
    invalidate: Callable[[], Awaitable[object]], driver: asyncpg.Connection, exc: BaseException
) -> None:
    """A statement sent on the driver connection (past SQLAlchemy, which would otherwise judge the
    connection) failed or was cancelled. A connection that is gone, or that may still be busy with
    a cancelled statement, leaves the pool (the next user would get "another operation is in
    progress"), and a connection problem becomes DATABASE_UNAVAILABLE, as on the SQLAlchemy path
    (which wraps asyncpg's InterfaceError as a connection error too)."""
    broken = is_connection_error(exc) or isinstance(exc, asyncpg.InterfaceError) or driver.is_closed()
    if broken or not isinstance(exc, Exception):
        with contextlib.suppress(Exception):
            await invalidate()
    if broken and isinstance(exc, Exception):
        raise _database_unavailable() from exc


M = TypeVar("M")


def columns(model: type, prefix: str = "") -> str:
    """The column list of `model`'s table for a driver statement (`prefix`: a table alias)."""
    return ", ".join(f"{prefix}{c.name}" for c in model.__table__.columns)


@cache
def _manager(model: type) -> ClassManager:
    configure_mappers()  # what a model's first constructor call would do
    return manager_of_class(model)


@cache
def _names(model: type, prefix: str) -> tuple[tuple[str, str], ...]:
    """(attribute, column label in a driver row) for each of `model`'s columns."""
    return tuple((c.key, f"{prefix}{c.name}") for c in model.__table__.columns)


def detached(model: type[M], values: dict[str, Any]) -> M:
    """An ORM object outside any session holding `values` (attribute: value), built as the ORM
    builds the rows it loads: no constructor, no attribute events. Measured for a message: 1 µs
    instead of 18 µs through `Message(**values)`, on the path of every reply (its rows, snapshots
    and events)."""
    obj = _manager(model).new_instance()
    obj.__dict__.update(values)
    return obj


def from_row(model: type[M], row: asyncpg.Record | None, prefix: str = "") -> M | None:
    """An ORM object (detached: no session) from a driver row whose columns are `model`'s, each
    named `prefix` + its name; None for no row."""
    if row is None:
        return None
    return detached(model, {attr: row[label] for attr, label in _names(model, prefix)})


async def driver_of(db: AsyncSession | asyncpg.Connection) -> asyncpg.Connection:
    """The asyncpg connection of a unit of work: a session's, or one from `driver_transaction`
    (repository functions written for the driver take either)."""
    if isinstance(db, asyncpg.Connection):
        return db
    conn = await db.connection()
    return (await conn.get_raw_connection()).driver_connection


class _Begun:
    """Stands, for SQLAlchemy's asyncpg adapter, for a transaction begun by `_begin_as_caller`:
    the adapter ends a transaction by calling commit() or rollback() on it."""

    __slots__ = ("_conn",)

    def __init__(self, conn: asyncpg.Connection):
        self._conn = conn

    async def commit(self) -> None:
        await self._conn.execute("COMMIT")

    async def rollback(self) -> None:
        await self._conn.execute("ROLLBACK")


async def _begin_as_caller(
    raw: PoolProxiedConnection,
    invalidate: Callable[[], Awaitable[object]],
    user_id: uuid.UUID,
    session_id: uuid.UUID | None,
) -> bool:
    """BEGIN, set the caller and check the session in one round trip instead of two.

    SQLAlchemy's asyncpg adapter sends BEGIN by itself before a transaction's first statement, so
    setting the caller used to cost a round trip for BEGIN and one for set_config. Here both go in
    one simple-protocol query; the ids are inlined, which is safe because they are UUIDs written by
    uuid.UUID (hex digits and dashes only). `SELECT ... WHERE live` answers "SELECT 1" for a live
    session and "SELECT 0" for an ended one. The adapter is then told that its transaction has begun
    (its private `_transaction`), so COMMIT and ROLLBACK go out as usual, on success or error.

    False (nothing done) when the adapter is not the one this was written for, or already in a
    transaction: the caller then takes the SQLAlchemy path. `raw` is the pooled connection, and
    `invalidate` drops it from the pool after a failure."""
    adapter = raw.dbapi_connection
    # The adapter's own BEGIN for its isolation level: None (the server's default) on a new
    # connection, "read_committed" (SQLAlchemy's default, set back on a connection returned to the
    # pool after an AUTOCOMMIT use) on one that was.
    begin = _BEGIN.get(getattr(adapter, "isolation_level", "?"))
    if (
        begin is None
        or getattr(adapter, "_transaction", False) is not None
        or getattr(adapter, "readonly", True)
        or getattr(adapter, "deferrable", True)
        or not isinstance(user_id, uuid.UUID)
        or not isinstance(session_id, uuid.UUID | None)
    ):
        return False
    driver: asyncpg.Connection = adapter._connection
    uid = str(user_id)
    if session_id is None:
        query = f"{begin}; SELECT set_config('app.user_id', '{uid}', true)"
    else:
        query = (
            f"{begin}; SELECT set_config('app.user_id', '{uid}', true) "
            f"WHERE app_session_is_live('{session_id}'::uuid, '{uid}'::uuid)"
        )
    # From here on the transaction is the adapter's to end (ROLLBACK is harmless if BEGIN failed).
    adapter._transaction = _Begun(driver)
    try:
        status = await driver.execute(query)
    except BaseException as exc:
        await _after_driver_error(invalidate, driver, exc)
        raise
    if session_id is not None and status != "SELECT 1":
        raise _session_ended()
    return True


def asyncpg_url(url: str) -> str:
    """Accept plain postgres:// URLs and point SQLAlchemy at asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


# SQLSTATEs about the connection, not the statement: class 08 (asyncpg's "connection was closed in the
# middle of operation" is 08003) and 57P01-57P03 (the server is shutting down, crashed, or is not
# accepting connections yet: a restart). asyncpg raises them while connecting too, where SQLAlchemy
# has no connection to mark invalidated.
_DISCONNECT_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    # asyncpg's own errors, from statements run on the driver connection (`Database.driver`).
    if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (getattr(exc, "sqlstate", None) or "").startswith(_DISCONNECT_SQLSTATES)
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return exc.connection_invalidated or sqlstate.startswith(_DISCONNECT_SQLSTATES)
    if isinstance(exc, FileNotFoundError):
        # connect() to a unix socket that is gone (PostgreSQL restarting) names no file; a missing
        # file that someone opened does.
        return exc.filename is None
    return isinstance(exc, (ConnectionError, OSError))


@contextmanager
def _unavailable_on_disconnect() -> Iterator[None]:
    try:
        yield
    except errors.DomainError:
        raise
    except Exception as exc:
        if is_connection_error(exc):
            raise _database_unavailable() from exc
        if isinstance(exc, PoolTimeoutError):
            # Every connection stayed busy for the pool's whole timeout: the process is past what
            # its database connections serve. Retryable, like a database that is away.
            raise errors.Unavailable(
                "the database is busy; try again", reason="DATABASE_BUSY", retry_after=1.0
            ) from exc
        raise


class PoolQueue:
    """The callers waiting for a pooled connection now, and how long the oldest has waited: a
    standing queue there means the process is past what its connections serve (admission control
    refuses new streams while the oldest wait is long, see rpc/admission.py)."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._waiting: dict[object, float] = {}  # insertion-ordered: the first is the oldest

    @contextmanager
    def waiting(self) -> Iterator[float]:
        token, since = object(), self._clock()
        self._waiting[token] = since
        try:
            yield since
        finally:
            del self._waiting[token]

    def __len__(self) -> int:
        return len(self._waiting)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting caller has waited so far (0 with no one waiting)."""
        for since in self._waiting.values():
            return self._clock() - since
        return 0.0


class Database:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        pool_timeout: float = 10.0,
        echo: bool = False,
    ):
        self._pool = {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": pool_timeout,
            "echo": echo,
        }
        self.queue = PoolQueue()  # callers waiting for a connection
        self._revision: str | None | object = _UNREAD  # current_revision's last answer
        self.metrics = None  # a metrics.Metrics, set by the container
        self.tracer: trace.Tracer = trace.NoOpTracer()  # set by the container when tracing is on
        self._open(url)

    def _open(self, url: str) -> None:
        self.url = asyncpg_url(url)
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            pool_size=self._pool["pool_size"],
            max_overflow=self._pool["max_overflow"],
            pool_timeout=self._pool["pool_timeout"],
            pool_recycle=1800,
            echo=self._pool["echo"],
            connect_args={"server_settings": {"application_name": "everything-server"}},
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        pool = self.engine.sync_engine.pool
        event.listen(pool, "checkout", lambda *_: self.metrics and self.metrics.db_pool_in_use.inc())
        event.listen(pool, "checkin", lambda *_: self.metrics and self.metrics.db_pool_in_use.dec())

    async def switch_url(self, url: str) -> None:
        """Reconnect as someone else (start-up only, before any request)."""
        await self.dispose()
        self._open(url)

    async def role(self) -> tuple[str, bool]:
        """(current role, whether it bypasses row-level security: superuser or BYPASSRLS)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT current_user, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
                    )
                )
            ).one()
        return row[0], bool(row[1])

    @asynccontextmanager
    async def _unit(self) -> AsyncIterator[None]:
        """Around every transaction: its span (when tracing) and DATABASE_UNAVAILABLE for a lost
        connection."""
        span = (
            contextlib.nullcontext()
            if isinstance(self.tracer, trace.NoOpTracer)
            else self.tracer.start_as_current_span("db.transaction")
        )
        with _unavailable_on_disconnect(), span:
            yield

    def _waited(self, since: float) -> None:
        if self.metrics is not None:
            self.metrics.db_pool_wait.observe(time.perf_counter() - since)

    @asynccontextmanager
    async def transaction(
        self, user_id: uuid.UUID | None = None, session_id: uuid.UUID | None = None
    ) -> AsyncIterator[AsyncSession]:
        """A short transaction. With `user_id`, the caller is set for RLS; with `session_id` too,
        the caller's sign-in session must still be live or `Unauthenticated` is raised."""
        async with self._unit(), self.sessionmaker.begin() as session:
            with self.queue.waiting() as waited:
                conn = await session.connection()
            self._waited(waited)
            if user_id is not None and not await _begin_as_caller(
                await conn.get_raw_connection(), conn.invalidate, user_id, session_id
            ):
                # The driver path was not available: the same statements through SQLAlchemy.
                if session_id is not None:
                    row = (
                        await conn.execute(_SET_CALLER, {"uid": str(user_id), "sid": str(session_id)})
                    ).one()
                    if not row.live:
                        raise _session_ended()
                else:
                    await conn.execute(_SET_USER, {"uid": str(user_id)})
            yield session

    @asynccontextmanager
    async def _checkout(self) -> AsyncIterator[tuple[PoolProxiedConnection, Callable[[], Awaitable[object]]]]:
        """A pooled connection itself, without SQLAlchemy's Connection around it (30 µs less per
        checkout and return, measured), and how to drop it from the pool. At exit it goes back to
        the pool, whose reset rolls back whatever transaction is still open on it (`_Begun`)."""
        try:
            with self.queue.waiting() as waited:
                raw = await self.engine.raw_connection()
        except Exception as exc:
            # engine.connect() would wrap a failed connect in OperationalError; this path does not.
            if is_connection_error(exc) or is_connection_error(exc.__cause__ or exc):
                raise _database_unavailable() from exc
            raise
        self._waited(waited)
        try:
            yield raw, partial(greenlet_spawn, raw.invalidate)
        finally:
            await greenlet_spawn(raw.close)

    @asynccontextmanager
    async def driver_transaction(
        self, user_id: uuid.UUID, session_id: uuid.UUID | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """`transaction`, for a hot path whose statements are all written for the driver: the same
        BEGIN-as-caller round trip, then the pooled connection's own asyncpg connection, then
        COMMIT (ROLLBACK on any error), without SQLAlchemy's session around them (measured: 0.17 ms
        less per transaction of three round trips)."""
        async with self._unit(), self._checkout() as (raw, invalidate):
            if not await _begin_as_caller(raw, invalidate, user_id, session_id):
                raise RuntimeError("SQLAlchemy's asyncpg adapter is not the one this was written for")
            adapter, driver = raw.dbapi_connection, raw.driver_connection
            try:
                yield driver
                await adapter._transaction.commit()
                adapter._transaction = None
            except BaseException as exc:
                # Returning the connection to the pool rolls back what is still open.
                await _after_driver_error(invalidate, driver, exc)
                raise

    async def patiently(self, work: Callable[[], Awaitable[T]], *, patience: float) -> T:
        """`work()` (a unit of work with its own transaction), tried again while the database is
        unavailable (a restart, a failover) or busy (no connection free for the pool's timeout) for
        up to `patience` seconds, then its error. For the
        final save of work that outlives its RPC (a reply, a search, an image): a blip must not
        leave it unfinished for good. `work` must be safe to repeat (a commit whose answer was lost
        runs again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.1
        while True:
            try:
                return await work()
            except errors.Unavailable as exc:
                if exc.reason not in _RETRIED or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """One statement, one round trip, no BEGIN/COMMIT: for counters that touch no user rows."""
        with _unavailable_on_disconnect():
            async with contextlib.AsyncExitStack() as stack:
                with self.queue.waiting():
                    conn = await stack.enter_async_context(self.engine.connect())
                yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection's own asyncpg connection, outside any transaction (each statement
        commits by itself), for hot single statements that touch no user rows (rate-limit counters):
        none of SQLAlchemy's per-statement work, and the statement stays prepared on the connection.
        A connection that failed is dropped from the pool."""
        with _unavailable_on_disconnect():
            async with self._checkout() as (raw, invalidate):
                driver = raw.driver_connection
                try:
                    yield driver
                except BaseException as exc:
                    await _after_driver_error(invalidate, driver, exc)
                    raise

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def current_revision(self) -> str | None:
        """The schema's migration revision (None: not migrated). While callers queue for a
        connection, the one read last: every connection is in use, so the database is there, and
        waiting in that queue would read a loaded process as a database that is away (health
        NOT_SERVING would then refuse every call). Another connection just for health checks was
        tried: where the database's connection slots run out (the embedded one in a long test run),
        it read a database that is there as away."""
        if len(self.queue) and self._revision is not _UNREAD:
            return self._revision
        async with self.engine.connect() as conn:
            exists = (
                await conn.execute(text("SELECT to_regclass('public.alembic_version') IS NOT NULL"))
            ).scalar()
            revision = None
            if exists:
                revision = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        self._revision = revision
        return revision

    async def dispose(self) -> None:
        await self.engine.dispose()
