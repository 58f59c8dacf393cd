"""Helpers for the load, soak and fault tests: server processes watched from outside (/proc, their
Prometheus port, pg_stat_activity), bounded waits, and a PostgreSQL cluster of the test's own.

Every wait here is bounded; nothing reaches beyond loopback.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.auth.v1 import auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.chat.v1 import chat_service_pb2_grpc
from everything.image.v1 import image_service_pb2_grpc
from everything.preferences.v1 import preferences_service_pb2 as prefs_pb
from everything.preferences.v1 import preferences_service_pb2_grpc
from everything.search.v1 import search_service_pb2_grpc
from tests.support import ServerProcess, SignedUpUser, start_server_process

# The load tests sign up, send and search far more than a person would.
LOAD_ENV = {
    "EVERYTHING_QUOTA_DAILY_CHAT_TOKENS": "100000000",
    "EVERYTHING_QUOTA_DAILY_SEARCHES": "100000",
    "EVERYTHING_QUOTA_DAILY_IMAGES": "100000",
    "EVERYTHING_MAX_STREAMS_PER_USER": "200",
    "EVERYTHING_METRICS_PORT": "0",
}


async def eventually(
    probe: Callable[[], object], *, timeout: float, interval: float = 0.1, what: str = "condition"
):
    """Call `probe` (sync or async) until it returns something truthy (returned), at most `timeout`
    seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = probe()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout:.0f}s (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class Stubs:
    """Every service's stub on one channel (one server process)."""

    channel: grpc.aio.Channel

    def __post_init__(self) -> None:
        self.auth = auth_service_pb2_grpc.AuthServiceStub(self.channel)
        self.chat = chat_service_pb2_grpc.ChatServiceStub(self.channel)
        self.search = search_service_pb2_grpc.SearchServiceStub(self.channel)
        self.image = image_service_pb2_grpc.ImageServiceStub(self.channel)
        self.prefs = preferences_service_pb2_grpc.PreferencesServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


def unary_call(s: Stubs, user: SignedUpUser, n: int, *, timeout: float) -> tuple[str, Awaitable]:
    """The n-th of a round of cheap unary calls a client makes all the time: (method, call)."""
    kw = {"metadata": user.md, "timeout": timeout}
    match n % 3:
        case 0:
            return "GetCurrentUser", s.auth.GetCurrentUser(auth_pb.GetCurrentUserRequest(), **kw)
        case 1:
            return "ListThreads", s.chat.ListThreads(chat_pb.ListThreadsRequest(page_size=5), **kw)
        case _:
            return "GetPreferences", s.prefs.GetPreferences(prefs_pb.GetPreferencesRequest(), **kw)


@asynccontextmanager
async def replicas(env: dict[str, str], logs: Path, count: int = 2) -> AsyncIterator[list[ServerProcess]]:
    """`count` server processes on one database, started at the same time (as an orchestrator
    would); all of them stopped at the end, whatever happens."""
    started = await asyncio.gather(
        *(start_server_process(env, logs / f"replica-{i}.log") for i in range(count)), return_exceptions=True
    )
    procs = [p for p in started if isinstance(p, ServerProcess)]
    try:
        for p in started:
            if isinstance(p, BaseException):
                raise p
        yield procs
    finally:
        for p in procs:
            p.terminate()


# -- a server process seen from outside -------------------------------------------------------------


def metrics_port(proc: ServerProcess) -> int:
    """The Prometheus port the server logged (EVERYTHING_METRICS_PORT=0 picks a free one)."""
    for line in proc.logs().splitlines():
        if '"message":"metrics listening"' in line:
            return int(orjson.loads(line)["port"])
    raise AssertionError("the server did not log its metrics port")


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


async def scrape(port: int) -> dict[str, float]:
    """Unlabelled samples of a /metrics page (gauges such as everything_active_streams)."""
    return await asyncio.to_thread(_scrape, port)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Footprint:
    fds: int
    rss_mb: float

    @classmethod
    def of(cls, proc: ServerProcess) -> Footprint:
        return cls(fd_count(proc.proc.pid), rss_mb(proc.proc.pid))


async def server_backends(conn: asyncpg.Connection) -> dict[str, int]:
    """The servers' pooled connections to this database by state ('idle', 'active', 'idle in
    transaction', ...), our own connection left out."""
    rows = await conn.fetch(
        "SELECT coalesce(state, '') AS state, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'everything-server' "
        "AND pid <> pg_backend_pid() GROUP BY 1"
    )
    return {r["state"]: r["n"] for r in rows}


async def no_open_transactions(conn: asyncpg.Connection) -> tuple[str, dict[str, int]] | None:
    """Every server connection idle: none 'idle in transaction', no query still running."""
    backends = await server_backends(conn)
    busy = {state: n for state, n in backends.items() if state != "idle"}
    return None if busy else ("idle", backends)


# -- a PostgreSQL cluster of the test's own ----------------------------------------------------------


class OwnPostgres:
    """An embedded (pgserver) cluster in a fresh folder that a test may stop and start at will; never
    the machine's shared server. Stopped and started with the pg_ctl shipped in the pgserver wheel,
    on the same unix socket, so URLs stay valid across a restart."""

    def __init__(self) -> None:
        import pgserver

        self.pgdata = Path(tempfile.mkdtemp(prefix="everything-load-pg-"))
        self.server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"

    def url(self, database: str = "postgres") -> str:
        return self.server.get_uri(database)

    def _pg_ctl(self, *args: str) -> None:
        log = self.pgdata / "log"
        cmd = [str(self.pg_ctl), "-D", str(self.pgdata), *args]
        if self.server.system_user is not None:
            # Under root pgserver runs the cluster as its own user. runuser rather than
            # subprocess(user=...): that forks this multi-threaded (gRPC) process and runs gRPC's
            # fork handlers in the child, which crashed it now and then (SIGSEGV before exec).
            cmd = ["runuser", "-u", self.server.system_user, "--", *cmd]
        with tempfile.TemporaryFile() as out:  # pg_ctl start can keep pipes open: never capture
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False)
            if result.returncode != 0:
                out.seek(0)
                raise AssertionError(
                    f"pg_ctl {' '.join(args)} failed ({result.returncode}): {out.read().decode(errors='replace')}\n"
                    f"{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
                )

    def stop(self) -> None:
        self._pg_ctl("-w", "-t", "30", "stop", "-m", "fast")

    def start(self) -> None:
        self._pg_ctl(
            "-w",
            "-t",
            "30",
            "-o",
            '-h ""',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def close(self) -> None:
        from pgserver.utils import PostmasterInfo

        # pgserver's cleanup stops the postmaster it started (not one started again by `start`),
        # with subprocess(user=...), then deletes the folder. Stop whatever runs here first and
        # leave it only the folder; if that fails, point it at the running postmaster instead.
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        try:
            if info is not None:
                self.stop()
            self.server._postmaster_info = None
        except AssertionError:
            self.server._postmaster_info = info
        self.server.cleanup()


@pytest.fixture
def own_postgres():
    pg = OwnPostgres()
    try:
        yield pg
    finally:
        pg.close()


def unique_db_name() -> str:
    return f"everything_load_{uuid.uuid4().hex[:10]}"
