"""`make bench`: everything's streaming and unary RPCs measured side by side with the mock model
itself and with the LiteLLM proxy, on this machine, over loopback.

    make bench                                # the full run (1, 16, 64, 256, 1000 streams)
    make bench BENCH_ARGS=--quick             # 1, 16, 64 streams, shorter windows
    .venv/bin/python -m tests.bench.run --help

Systems (each in its own processes; the mock model always is `python -m everything_server.ai.mock`):

- ``direct``    the openai SDK streaming from the mock itself: the floor.
- ``grpc-1``    authenticated SendMessage through ONE everything-server process, saving to PostgreSQL.
- ``grpc-1-admit`` the same with the opt-in adaptive admission control on
               (EVERYTHING_ADMISSION_TARGET_LOAD=0.85): past capacity, refusals instead of waits.
- ``grpc-N``    the same through N processes (one per core), each on its own port; the client
               round-robins over them (the server does not set SO_REUSEPORT, see the report).
- ``grpcweb``   gRPC-Web through Envoy (`everything-gateway`) in front of the N processes.
- ``litellm``   the LiteLLM proxy (own venv under .build/, 1 worker, no DB, callbacks off, offline).

Per system and concurrency: TTFT (and added over direct), inter-token delay, completed streams/s,
tokens/s, CPU seconds per 1,000 relayed tokens of each process group (server, PostgreSQL, gateway,
mock, load generators; utime+stime from /proc), peak RSS and KB per open stream, errors and refusals.
Plus unary RPCs at fixed concurrency, a no-delay run (rate 0) for maximum throughput, database
writes per reply for two reply lengths, and optionally a py-spy profile of a server under load.

Two scenarios answer the issue's "1,000 concurrent streams" target, because one run cannot: at the
default 50 tokens/s per stream, 1,000 streams offer 50,000 tokens/s, far past what 2 cores relay.
- The 1,000-stream LEVEL is therefore an overload run: the "Overload and admission control" table
  shows the offered load, the refusals (RESOURCE_EXHAUSTED, counted apart from errors) and how fast
  they came back (p50/p99), and the TTFT of the streams that were admitted.
- The CONCURRENCY scenario (`--concurrency-streams`, default 1,000) opens that many streams at once
  at a low rate (default 2 tokens/s, 40-token replies: 20 s each, one per client, all started within
  5 s), so they are all open together at a load the machine can carry: errors, peak open streams,
  peak RSS and KB per open stream, for grpc-1, grpc-1-admit and LiteLLM (`--concurrency-systems`).
  A refused client asks again as its RetryInfo says, for up to half a reply after the ramp.

Database writes per reply (`--writes-tokens`, `--writes-rates`): transactions (pg_stat_database)
and rows written (pg_stat_user_tables) per reply, for short and long replies at the mock's rate and
with no delay, and how much more a long reply costs than a short one (0 = independent of length).

Output: a table on stdout, test-artifacts/bench/results.json and results.md. Every process the run
starts is stopped at the end (SIGTERM, then SIGKILL), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # we spawn; never fork a grpc process

from tests.bench import loadgen, procs, report, systems  # noqa: E402
from tests.bench import profile as pyspy  # noqa: E402

ROOT = systems.ROOT
PROMPT = "Tell me a short story about a quiet river and the light on the water."
ALL_SYSTEMS = ("direct", "litellm", "grpc-1", "grpc-1-admit", "grpc-N", "grpcweb")
SERVER_SYSTEMS = ("litellm", "grpc-1", "grpc-1-admit", "grpc-N", "grpcweb")  # memory is measured
# grpc-1-admit: grpc-1 with the adaptive admission control on (off by default, see rpc/admission.py);
# a --server-env of the same name wins.
ADMIT_ENV = {"EVERYTHING_ADMISSION_TARGET_LOAD": "0.85"}
UNARY_METHODS = ("GetPreferences", "ListThreads", "GetCurrentUser")
TTFT_DIRECTIVE = "[mock:tokens=3]"  # the TTFT run's replies: over in about 60 ms at the mock's rate


RUNS = ROOT / ".build" / "bench"  # one folder of logs per run; the newest KEEP_RUNS are kept
KEEP_RUNS = 5


def _prune_runs() -> None:
    """Remove old run folders (never one touched in the last 6 hours: it may belong to a run in progress)."""
    runs = sorted(p for p in RUNS.iterdir() if p.is_dir() and p.name[:8].isdigit())
    for old in runs[:-KEEP_RUNS]:
        if time.time() - old.stat().st_mtime > 6 * 3600:
            shutil.rmtree(old, ignore_errors=True)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1, 16, 64 streams and shorter windows")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny: 1 stream, few tokens, direct + grpc-1 only (the pytest smoke)",
    )
    p.add_argument("--systems", help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--levels", help="comma-separated concurrencies (default 1,16,64,256,1000)")
    p.add_argument("--duration", type=float, help="seconds of load per run (default 20; quick 8)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per reply (default 200)")
    p.add_argument("--rate", type=float, default=50.0, help="mock tokens per second per stream (default 50)")
    p.add_argument("--stream-timeout", type=float, help="deadline of one stream (default 60; quick 30)")
    p.add_argument("--servers", type=int, default=os.cpu_count() or 2, help="processes of grpc-N (cores)")
    p.add_argument("--loadgen-procs", type=int, default=2, help="load generator processes from 64 streams on")
    p.add_argument("--mock-procs", type=int, default=1, help="mock model processes (SO_REUSEPORT)")
    p.add_argument("--users", type=int, default=256, help="at most this many users (streams share them)")
    p.add_argument("--unary-concurrency", type=int, default=32)
    p.add_argument("--unary-duration", type=float, help="seconds per unary method (default 8; quick 4)")
    p.add_argument("--max-concurrency", type=int, default=64, help="concurrency of the no-delay run")
    p.add_argument(
        "--ttft-duration",
        type=float,
        help="seconds of back-to-back short replies on one stream, for TTFT alone (default 10; quick 5; 0 skips)",
    )
    p.add_argument("--no-unary", action="store_true")
    p.add_argument("--no-max", action="store_true", help="skip the no-delay (rate 0) run")
    p.add_argument("--no-writes", action="store_true", help="skip database writes per reply")
    p.add_argument(
        "--writes-tokens", default="50,400", help="reply lengths of the writes runs (default 50,400)"
    )
    p.add_argument(
        "--writes-rates", help="mock rates of the writes runs, 0 = no delay (default: --rate and 0)"
    )
    p.add_argument("--writes-replies", type=int, help="replies per writes run (default 20; quick 8)")
    p.add_argument(
        "--refusal-backoff",
        type=float,
        default=1.0,
        help="seconds a client waits after RESOURCE_EXHAUSTED without a RetryInfo (default 1)",
    )
    p.add_argument("--no-concurrency", action="store_true", help="skip the concurrency scenario")
    p.add_argument(
        "--concurrency-streams", type=int, default=1000, help="streams open at once (default 1000)"
    )
    p.add_argument(
        "--concurrency-rate", type=float, default=2.0, help="tokens/s per stream there (default 2)"
    )
    p.add_argument(
        "--concurrency-tokens", type=int, default=40, help="tokens per reply there (default 40: 20 s)"
    )
    p.add_argument("--concurrency-ramp", type=float, default=5.0, help="streams start within (default 5 s)")
    p.add_argument(
        "--concurrency-systems",
        default="grpc-1,grpc-1-admit,litellm",
        help="systems of the concurrency scenario, among those run (default grpc-1,grpc-1-admit,litellm)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy profile of one server under stream load")
    p.add_argument("--profile-concurrency", type=int, default=64, help="streams during the profile")
    p.add_argument(
        "--profile-method",
        choices=UNARY_METHODS,
        help="profile this unary method at --unary-concurrency instead of streams",
    )
    p.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL"), help="admin URL (default: embedded)"
    )
    p.add_argument(
        "--server-cpus",
        type=lambda v: sorted({int(c) for c in v.split(",")}),
        help="comma-separated CPUs for the systems under test (servers, Envoy, LiteLLM); the mock, the "
        "load generators and an embedded PostgreSQL get the others (default: no pinning)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "bench")
    p.add_argument(
        "--server-env", action="append", default=[], metavar="K=V", help="extra env for everything-server"
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.systems = a.systems or "direct,grpc-1"
        a.levels = a.levels or "1"
        a.duration = a.duration or 3.0
        a.tokens = 20 if a.tokens == 200 else a.tokens
        a.rate = 100.0 if a.rate == 50.0 else a.rate
        a.stream_timeout = a.stream_timeout or 15.0
        a.no_unary = a.no_max = True
        a.ttft_duration = 1.0 if a.ttft_duration is None else a.ttft_duration
        a.users = min(a.users, 2)
        # Tiny but complete: a concurrency run and the writes table (short and long, two rates).
        a.concurrency_streams = 8 if a.concurrency_streams == 1000 else a.concurrency_streams
        a.concurrency_rate = 5.0 if a.concurrency_rate == 2.0 else a.concurrency_rate
        a.concurrency_tokens = 10 if a.concurrency_tokens == 40 else a.concurrency_tokens
        a.concurrency_ramp = 0.5 if a.concurrency_ramp == 5.0 else a.concurrency_ramp
        a.writes_tokens = "10,80" if a.writes_tokens == "50,400" else a.writes_tokens
        a.writes_rates = a.writes_rates or "200,0"
        a.writes_replies = a.writes_replies or 2
    elif a.quick:
        a.levels = a.levels or "1,16,64"
        a.duration = a.duration or 8.0
        a.stream_timeout = a.stream_timeout or 30.0
        a.unary_duration = a.unary_duration or 4.0
        a.ttft_duration = 5.0 if a.ttft_duration is None else a.ttft_duration
    a.ttft_duration = 10.0 if a.ttft_duration is None else a.ttft_duration
    a.levels = [int(x) for x in (a.levels or "1,16,64,256,1000").split(",")]
    a.duration = a.duration or 20.0
    a.stream_timeout = a.stream_timeout or 60.0
    a.unary_duration = a.unary_duration or 8.0
    a.writes_tokens = [int(x) for x in a.writes_tokens.split(",")]
    a.writes_rates = [float(x) for x in (a.writes_rates or f"{a.rate:g},0").split(",")]
    a.writes_replies = a.writes_replies or (8 if a.quick else 20)
    a.concurrency_systems = [s.strip() for s in a.concurrency_systems.split(",") if s.strip()]
    a.systems = [s.strip() for s in (a.systems or ",".join(ALL_SYSTEMS)).split(",") if s.strip()]
    for s in a.systems:
        if s not in ALL_SYSTEMS:
            p.error(f"unknown system {s!r}")
    return a


async def _scrape(read, source):
    """`read(source)` in a thread: counters of a system's processes; None when it has no such
    source or the source does not answer."""
    if not source:
        return None
    try:
        return await asyncio.to_thread(read, source)
    except OSError:
        return None


@dataclass
class System:
    name: str
    kind: str  # loadgen kind: openai / grpc / grpcweb
    target: str
    server_pids: list[int] = field(default_factory=list)
    gateway_pids: list[int] = field(default_factory=list)
    api_key: str = ""
    ports: list[int] = field(default_factory=list)
    admin_url: str = ""  # Envoy's admin (grpcweb): what it did with the upstreams
    metrics_ports: list[int] = field(default_factory=list)  # everything-servers': refusals by cause


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir = RUNS / time.strftime("%Y%m%d-%H%M%S")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _prune_runs()
        self.sampler = procs.Sampler()
        self.procs: list[procs.Proc] = []
        self.failed = False  # a system could not start: the exit status says so
        self.all_pids: list[int] = []  # every process the run started (the smoke test checks they are gone)
        self.db: systems.Database | None = None
        self.mock_url = ""
        self.senv: systems.ServerEnv | None = None
        self.tokens: list[str] = []
        self._system: System | None = None
        self.results: dict[str, Any] = {
            "meta": {},
            "ttft": [],
            "streams": {},
            "max_throughput": {},
            "concurrency": [],
            "unary": [],
            "db_writes_per_reply": [],
            "db_writes_length_dependence": [],
            "profile": None,
            "problems": [],
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def _track(self, *ps: procs.Proc) -> None:
        self.procs.extend(ps)
        self.all_pids.extend(p.pid for p in ps)

    def _stop(self, ps: list[procs.Proc]) -> None:
        for p in ps:
            p.stop()
            if p in self.procs:
                self.procs.remove(p)

    async def setup(self) -> None:
        a = self.args
        log(f"run folder {self.run_dir}")
        others = procs.pin_servers(a.server_cpus) if a.server_cpus else None
        if others is not None:
            log(f"systems under test on CPUs {a.server_cpus}, the rest of the run on {sorted(others)}")
        self.db = await systems.Database.create(a.database_url)
        await self.db.migrate()
        self.db.start_watching()
        if self.db.embedded is not None:
            self.all_pids.extend(self.db.pids())
        log(f"database {self.db.name} ({'embedded' if self.db.embedded else 'on DATABASE_URL'}) migrated")
        mocks, self.mock_url = await systems.start_mock(
            self.run_dir, tokens=a.tokens, rate=a.rate, processes=a.mock_procs
        )
        self._track(*mocks)
        extra = dict(kv.split("=", 1) for kv in a.server_env)
        self.senv = systems.ServerEnv(self.db.url, self.mock_url, self.run_dir / "data", extra=extra)
        self.sampler.add(procs.Group("mock", lambda: [p.pid for p in mocks]))
        self.sampler.add(procs.Group("postgres", self.db.pids))
        self.sampler.add(procs.Group("server", lambda: self._system.server_pids if self._system else []))
        self.sampler.add(procs.Group("gateway", lambda: self._system.gateway_pids if self._system else []))
        self.sampler.start()
        self.results["meta"] = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "tokens": a.tokens,
            "rate": a.rate,
            "duration_s": a.duration,
            "stream_timeout_s": a.stream_timeout,
            "levels": a.levels,
            "systems": a.systems,
            "servers_in_grpc_N": a.servers,
            "server_cpus": a.server_cpus,  # None: not pinned
            "other_cpus": sorted(others) if others is not None else None,
            "server_affinity": {},  # by system: the CPUs its processes were seen allowed on
            "refusal_backoff_s": a.refusal_backoff,
            "concurrency_scenario": None
            if a.no_concurrency
            else {
                "streams": a.concurrency_streams,
                "rate": a.concurrency_rate,
                "tokens": a.concurrency_tokens,
                "ramp_s": a.concurrency_ramp,
                "systems": [s for s in a.concurrency_systems if s in a.systems],
            },
            "database": "embedded pgserver (own cluster)" if self.db.embedded else "DATABASE_URL server",
            "litellm_version": systems.LITELLM_VERSION,
            "mode": "smoke" if a.smoke else "quick" if a.quick else "full",
            "python": sys.version.split()[0],
            "server_env_extra": list(extra),
        }

    async def teardown(self) -> None:
        await self.sampler.stop()
        for p in list(self.procs):
            p.stop()
        self.procs.clear()
        if self.db is not None:
            await self.db.close()

    # -- systems --------------------------------------------------------------------------------

    async def start_system(self, name: str) -> tuple[System, list[procs.Proc]]:
        a = self.args
        assert self.senv is not None
        if name == "direct":
            return System(name, "openai", self.mock_url, api_key=systems.MOCK_API_KEY), []
        if name == "litellm":
            p, url = await systems.start_litellm(self.run_dir, self.mock_url, log)
            self._track(p)
            return (
                System(name, "openai", url, api_key=systems.LITELLM_MASTER_KEY, server_pids=[]),
                [p],
            )
        n = a.servers if name in ("grpc-N", "grpcweb") else 1
        senv = self.senv
        if name == "grpc-1-admit":
            senv = dataclasses.replace(senv, extra={**ADMIT_ENV, **senv.extra})
        started = await systems.start_servers(self.run_dir, senv, n, name)
        ps = [p for p, _ in started]
        self._track(*ps)
        ports = [port for _, port in started]
        metrics = [port for port in map(systems.metrics_port, ps) if port]
        if name == "grpcweb":
            gw, url, admin = await systems.start_gateway(self.run_dir, ports)
            self._track(gw)
            return System(name, "grpcweb", url, ports=ports, admin_url=admin, metrics_ports=metrics), [
                *ps,
                gw,
            ]
        return System(name, "grpc", systems.grpc_target(ports), ports=ports, metrics_ports=metrics), ps

    def _pids_of(self, system: System, ps: list[procs.Proc]) -> None:
        kids = procs.children_map()
        for p in ps:
            pids = procs.tree(p.pid, kids)
            if p.name == "envoy":
                system.gateway_pids = pids
            else:
                system.server_pids.extend(pids)
        if self.args.server_cpus and (system.server_pids or system.gateway_pids):
            self.results["meta"]["server_affinity"][system.name] = procs.affinity(
                [*system.server_pids, *system.gateway_pids]
            )

    async def ensure_users(self, target: str) -> None:
        """Sign up the users once (Argon2 work, outside every measured window)."""
        a = self.args
        wanted = [
            *a.levels,
            1 if a.no_unary else a.unary_concurrency,
            1 if a.no_writes else a.writes_replies,
            1 if a.no_concurrency else a.concurrency_streams,
        ]
        need = min(a.users, max(wanted))
        if len(self.tokens) >= need:
            return
        import grpc

        from everything.auth.v1 import auth_service_pb2_grpc
        from tests import support

        t0 = time.monotonic()
        log(f"signing up {need - len(self.tokens)} users")
        async with grpc.aio.insecure_channel(target) as ch:
            stub = auth_service_pb2_grpc.AuthServiceStub(ch)
            sem = asyncio.Semaphore(4)

            async def one() -> str:
                async with sem:
                    return (await support.sign_up(stub)).access_token

            self.tokens += await asyncio.gather(*(one() for _ in range(need - len(self.tokens))))
        log(f"signed up in {time.monotonic() - t0:.1f}s")

    async def quiesce(self, timeout: float = 90.0) -> None:
        """Wait (bounded) until no reply is still generating: an abandoned stream keeps generating
        on the server (disconnect is not cancel) and would load the next run."""
        assert self.db is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = await self.db.count("SELECT count(*) FROM messages WHERE status = 'generating'")
            if left == 0:
                return
            await asyncio.sleep(0.5)
        self.results["problems"].append(f"{left} replies still generating {timeout:.0f}s after a run")

    # -- one run ----------------------------------------------------------------------------------

    async def load(
        self,
        system: System,
        concurrency: int,
        *,
        kind: str | None = None,
        prompt: str = PROMPT,
        duration: float | None = None,
        method: str | None = None,
        per_slot: int | None = None,
        ramp: float | None = None,
        warmup: bool = True,
    ) -> tuple[dict[str, Any], dict[str, float | None], dict[str, Any], float]:
        """Run `concurrency` client slots against `system` for `duration` seconds in load generator
        processes; returns (merged worker results, CPU seconds by group, memory, wall seconds)."""
        a = self.args
        duration = duration or a.duration
        kind = kind or system.kind
        nprocs = 1 if concurrency < 64 else max(1, a.loadgen_procs)
        nprocs = min(nprocs, concurrency)
        slots = [
            {"token": self.tokens[i % len(self.tokens)] if self.tokens else ""} for i in range(concurrency)
        ]
        base = {
            "kind": kind,
            "target": system.target,
            "api_key": system.api_key,
            "model": systems.MODEL,
            "prompt": prompt,
            "stream_timeout": a.stream_timeout,
            "method": method,
            "per_slot": per_slot,
            "ramp": self.ramp(duration) if ramp is None else ramp,
            "warmup": warmup,
            "refusal_backoff": a.refusal_backoff,
        }
        ctx = multiprocessing.get_context("spawn")
        workers = []
        for w in range(nprocs):
            parent, child = ctx.Pipe()
            spec = dict(base, slots=slots[w::nprocs])
            proc = ctx.Process(target=loadgen.worker, args=(spec, child), daemon=True, name=f"loadgen-{w}")
            proc.start()
            self.all_pids.append(proc.pid)
            child.close()
            workers.append((proc, parent))
        try:
            for proc, conn in workers:
                if not await asyncio.to_thread(conn.poll, 60):
                    raise RuntimeError(f"load generator {proc.name} did not start")
                msg = conn.recv()
                if not msg.get("ready"):
                    raise RuntimeError(f"load generator failed: {msg.get('error')}")
            self.sampler.sample()
            self.sampler.begin()
            envoy0 = await self._envoy_stats(system)
            refusals0 = await self._refusals(system)
            busy0 = procs.machine_busy_seconds()
            t_begin = time.time()
            start_at = t_begin + (1.0 if concurrency >= 256 else 0.3)
            stop_at = start_at + duration
            hard_stop = stop_at + a.stream_timeout + 5
            for _, conn in workers:
                conn.send({"start_at": start_at, "stop_at": stop_at, "hard_stop": hard_stop})
            results = []
            for proc, conn in workers:
                left = hard_stop + 20 - time.time()
                if not await asyncio.to_thread(conn.poll, max(left, 1)):
                    raise RuntimeError(f"load generator {proc.name} did not answer in time")
                msg = conn.recv()
                if not msg["ok"]:
                    raise RuntimeError(f"load generator failed:\n{msg['error']}")
                results.append(msg["result"])
            t_end = time.time()
            busy1 = procs.machine_busy_seconds()
            self.sampler.sample()
            envoy1 = await self._envoy_stats(system)
            refusals1 = await self._refusals(system)
        finally:
            for proc, conn in workers:
                conn.close()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        merged = report.merge(results)
        g = self.sampler.groups
        cpu: dict[str, float | None] = {
            name: g[name].cpu() for name in ("server", "postgres", "gateway", "mock")
        }
        cpu["loadgen"] = sum(r["cpu_s"] for r in results)
        # Everything else the machine did meanwhile (other users of these cores, this orchestrator).
        cpu["other"] = max(0.0, (busy1 - busy0) - sum(v for v in cpu.values() if v))
        if not system.server_pids:
            cpu["server"] = None
        if not system.gateway_pids:
            cpu["gateway"] = None
        if system.kind == "openai":
            cpu["postgres"] = None  # nothing of these systems uses the database
        srv = g["server"]
        peak_open = merged.get("peak_open") or 0
        mem: dict[str, Any] = {
            "server_processes": len(system.server_pids),
            "server_rss_before_mb": round(srv.rss_base / 1024, 1),
            "server_peak_rss_mb": round(srv.rss_peak / 1024, 1),
            "server_vmhwm_mb": round(sum(srv.hwm.get(p, 0) for p in system.server_pids) / 1024, 1),
            "server_kb_per_stream": round((srv.rss_peak - srv.rss_base) / concurrency, 1)
            if concurrency
            else None,
            # The same over the streams that were open at the peak (refused ones hold no memory).
            "server_kb_per_open_stream": round((srv.rss_peak - srv.rss_base) / peak_open, 1)
            if peak_open
            else None,
            "gateway_peak_rss_mb": round(g["gateway"].rss_peak / 1024, 1),
        }
        if not system.server_pids:
            mem = {k: None for k in mem}
        if envoy0 is not None and envoy1 is not None:
            # What Envoy did with the upstreams meanwhile: retries, ejections, failed health checks,
            # calls answered "no healthy upstream" (counters: the window's increase).
            keys = (
                "upstream_rq_retry",
                "upstream_rq_retry_overflow",
                "outlier_detection.ejections_enforced_total",
                "health_check.failure",
                "health_check.network_failure",
                "upstream_cx_none_healthy",
                "upstream_rq_pending_overflow",
            )
            merged["envoy"] = {k: envoy1.get(k, 0) - envoy0.get(k, 0) for k in keys}
        if refusals0 is not None and refusals1 is not None:
            # Why the servers refused (admission control's causes), the window's increase.
            merged["refused_by_cause"] = {
                k: v - refusals0.get(k, 0) for k, v in sorted(refusals1.items()) if v > refusals0.get(k, 0)
            }
        return merged, cpu, mem, t_end - t_begin

    async def _refusals(self, system: System) -> dict[str, int] | None:
        return await _scrape(systems.refusals_by_cause, system.metrics_ports)

    async def _envoy_stats(self, system: System) -> dict[str, int] | None:
        from everything_server import gateway

        return await _scrape(gateway.cluster_stats, system.admin_url)

    def ramp(self, duration: float, rate: float | None = None) -> float:
        """Slots start spread over about one reply's duration (at most a quarter of the window), so
        they do not arrive in lockstep, reply after reply."""
        a = self.args
        rate = a.rate if rate is None else rate
        reply = a.tokens / rate if rate > 0 else 0.5
        return round(min(reply, duration / 4), 3)

    async def stream_run(
        self, system: System, concurrency: int, *, prompt: str = PROMPT, rate: float | None = None
    ) -> dict[str, Any]:
        a = self.args
        ramp = self.ramp(a.duration, rate)
        merged, cpu, mem, wall = await self.load(system, concurrency, prompt=prompt, ramp=ramp)
        fig = report.stream_figures(
            merged, concurrency=concurrency, steady_s=a.duration - ramp, cpu=cpu, mem=mem
        )
        total = sum(cpu[k] or 0.0 for k in ("server", "postgres", "gateway"))
        tokens = merged["tokens"]
        fig["total_cpu_s_per_1k_tokens"] = (
            round(total / tokens * 1000, 4) if tokens and cpu["server"] else None
        )
        fig["system"] = system.name
        fig["wall_s"] = round(wall, 2)
        rate = a.rate if rate is None else rate
        fig["offered_tokens_per_s"] = round(concurrency * rate, 1) if rate else None
        for key in ("envoy", "refused_by_cause"):
            if key in merged:
                fig[key] = merged[key]
        # Cores busy with other work during the run (other engineers' processes, this orchestrator):
        # the noise next to the figures; CPU per token holds, throughput and latency may not.
        fig["other_cores_busy"] = round((cpu["other"] or 0.0) / wall, 2) if wall > 0 else None
        fig["loadgen_cores_busy"] = round((cpu["loadgen"] or 0.0) / wall, 2) if wall > 0 else None
        if system.kind != "openai":
            await self.quiesce()
        return fig

    def _print_run(self, fig: dict[str, Any]) -> None:
        log(
            f"  {fig['system']:8} x{fig['concurrency']:<5} tok/s={fig['tokens_per_s']}"
            f" ttft p50={fig['ttft_ms']['p50']}ms p99={fig['ttft_ms']['p99']}ms"
            f" cpu/1k={fig['cpu_s_per_1k_tokens']} pg/1k={fig['cpu_s_per_1k_tokens_by_process'].get('postgres')}"
            f" errors={fig['errors']} refused={fig['refused_resource_exhausted']}"
            f" refusal p99={fig['refusal_ms']['p99']}ms"
        )

    # -- phases -------------------------------------------------------------------------------------

    async def run_system(self, name: str) -> None:
        a = self.args
        log(f"system {name}: starting")
        try:
            await self._migrated()
            system, ps = await self.start_system(name)
        except Exception as exc:  # noqa: BLE001 - reported, the other systems still run
            msg = f"{name}: could not start: {exc}"
            log(msg)
            self.results["problems"].append(msg[:2000])
            self.failed = True
            return
        self._pids_of(system, ps)
        self._system = system
        try:
            if system.kind != "openai":
                await self.ensure_users(f"127.0.0.1:{system.ports[0]}")
            # Warm-up (not measured): connections, pools, caches.
            await self.load(system, min(4, max(a.levels)), duration=2.0, prompt=f"{PROMPT} [mock:tokens=20]")
            if system.kind != "openai":
                await self.quiesce()
            if a.ttft_duration > 0:
                # One stream, short replies back to back: many first tokens, so TTFT stands on
                # hundreds of replies instead of the few long ones of the 1-stream level.
                merged, _cpu, _mem, _wall = await self.load(
                    system, 1, prompt=f"{PROMPT} {TTFT_DIRECTIVE}", duration=a.ttft_duration, ramp=0.0
                )
                fig = report.ttft_figures(merged, system=name)
                self.results["ttft"].append(fig)
                log(
                    f"  {name:8} ttft x{fig['replies']} replies: p50={fig['ttft_ms']['p50']}ms p99={fig['ttft_ms']['p99']}ms"
                )
                if system.kind != "openai":
                    await self.quiesce()
            runs = self.results["streams"].setdefault(name, [])
            for c in a.levels:
                fig = await self.stream_run(system, c)
                runs.append(fig)
                self._print_run(fig)
                self._save()
            if not a.no_concurrency and name in a.concurrency_systems:
                fig = await self.concurrency_run(system)
                self.results["concurrency"].append(fig)
                log(
                    f"  concurrency {name} x{fig['concurrency']}: peak open={fig['peak_open_streams']}"
                    f" completed={fig['streams_completed']} errors={fig['errors']}"
                    f" refused={fig['refused_resource_exhausted']}"
                    f" rss {fig['memory']['server_rss_before_mb']}->{fig['memory']['server_peak_rss_mb']} MB"
                    f" ({fig['memory']['server_kb_per_open_stream']} KB/open stream)"
                )
                self._save()
            if not a.no_max:
                fig = await self.stream_run(
                    system, a.max_concurrency, prompt=f"{PROMPT} [mock:rate=0]", rate=0.0
                )
                fig["rate"] = 0
                self.results["max_throughput"].setdefault(name, []).append(fig)
                self._print_run(fig)
            if not a.no_unary and name in ("grpc-1", "grpc-N"):
                for method in UNARY_METHODS:
                    merged, cpu, _mem, _wall = await self.load(
                        system,
                        a.unary_concurrency,
                        kind="unary",
                        method=method,
                        duration=a.unary_duration,
                        ramp=0.0,
                    )
                    fig = report.unary_figures(merged, duration=a.unary_duration, cpu=cpu)
                    fig.update(system=name, method=method, concurrency=a.unary_concurrency)
                    self.results["unary"].append(fig)
                    log(
                        f"  unary {name} {method}: {fig['requests_per_s']} req/s p99={fig['latency_ms']['p99']}ms"
                    )
            self._save()
        except Exception as exc:  # noqa: BLE001 - reported; the other systems still run
            msg = f"{name}: run failed: {type(exc).__name__}: {exc}"
            log(msg)
            self.results["problems"].append(msg[:4000])
            self.failed = True
        finally:
            self._system = None
            self._stop(ps)
            log(f"system {name}: stopped")

    async def concurrency_run(self, system: System) -> dict[str, Any]:
        """Many streams open together at a low rate: one reply per client, all started within the
        ramp, each lasting tokens/rate seconds, so they overlap for most of a reply."""
        a = self.args
        n, rate, tokens, ramp = (
            a.concurrency_streams,
            a.concurrency_rate,
            a.concurrency_tokens,
            a.concurrency_ramp,
        )
        reply_s = tokens / rate
        merged, cpu, mem, wall = await self.load(
            system,
            n,
            prompt=f"{PROMPT} [mock:tokens={tokens} rate={rate:g}]",
            per_slot=1,
            # Every slot starts its one stream within the ramp; a refused one asks again, as its
            # RetryInfo says, for up to half a reply more (all would still be open together).
            duration=ramp + 0.5 + reply_s / 2,
            ramp=ramp,
        )
        fig = report.stream_figures(merged, concurrency=n, steady_s=0.0, cpu=cpu, mem=mem)
        fig.update(
            system=system.name,
            rate=rate,
            reply_tokens=tokens,
            reply_seconds=round(reply_s, 2),
            ramp_s=ramp,
            wall_s=round(wall, 2),
            other_cores_busy=round((cpu["other"] or 0.0) / wall, 2) if wall > 0 else None,
            loadgen_cores_busy=round((cpu["loadgen"] or 0.0) / wall, 2) if wall > 0 else None,
        )
        for key in ("envoy", "refused_by_cause"):
            if key in merged:
                fig[key] = merged[key]
        if system.kind != "openai":
            await self.quiesce()
        return fig

    async def db_writes(self) -> None:
        """Writes per reply for each reply length and rate (`--writes-tokens`, `--writes-rates`).

        Each configuration is a window: statistics snapshot with no server connected, a fresh
        server, `replies` clients making one CreateThread and one SendMessage each, the server
        stopped (its backends flush their statistics as they exit), snapshot. The same window with
        an idle server, as long, is subtracted: the server's own start-up, health checks and
        housekeeping are not the replies'. Transactions are the run's database's commits +
        rollbacks (pg_stat_database) minus the monitor's own (Database.snapshot); rows written are
        inserts + updates (pg_stat_user_tables; the deletes, of housekeeping, are in the JSON). WAL
        is cluster-wide, so only reported on an embedded cluster of the run's own. Autovacuum is off
        on the run's tables meanwhile (`Database.autovacuum`)."""
        assert self.db is not None and self.senv is not None
        await self._migrated()
        await self.db.autovacuum(False)
        try:
            await self._db_writes()
        finally:
            await self.db.autovacuum(True)

    async def _db_writes(self) -> None:
        a = self.args
        assert self.db is not None and self.senv is not None
        replies = a.writes_replies
        await self.quiesce()
        if len(self.tokens) < min(a.users, replies):  # sign-ups are not part of any window
            started = await systems.start_servers(self.run_dir, self.senv, 1, "writes-users")
            self._track(*(p for p, _ in started))
            try:
                await self.ensure_users(f"127.0.0.1:{started[0][1]}")
            finally:
                self._stop([p for p, _ in started])
        for rate in a.writes_rates:
            for n in a.writes_tokens:
                prompt = f"{PROMPT} [mock:tokens={n} rate={rate:g}]"

                async def replies_in(system: System, prompt=prompt) -> dict[str, Any]:
                    merged, *_ = await self.load(
                        system, replies, prompt=prompt, per_slot=1, duration=1.0, ramp=0.0, warmup=False
                    )
                    return merged

                loaded = await self._writes_window(f"writes-{n}-{rate:g}", replies_in)
                merged = loaded["merged"]
                idle_for = loaded["serving_s"]

                async def idle(system: System, seconds=idle_for) -> None:
                    await asyncio.sleep(seconds)

                base = await self._writes_window(f"writes-idle-{n}-{rate:g}", idle)
                done = merged["completed"]
                tables = sorted(set(loaded["tables"]) | set(base["tables"]))
                diff = {
                    tbl: {
                        k: loaded["tables"].get(tbl, {}).get(k, 0) - base["tables"].get(tbl, {}).get(k, 0)
                        for k in ("ins", "upd", "del")
                    }
                    for tbl in tables
                }
                diff = {tbl: d for tbl, d in diff.items() if any(d.values())}
                xacts = loaded["xacts"] - base["xacts"]

                def rows(tbl: str, diff=diff) -> int:
                    d = diff.get(tbl, {})
                    return d.get("ins", 0) + d.get("upd", 0)

                total = sum(rows(tbl) for tbl in diff)

                def per(v: float, done=done) -> float | None:
                    return round(v / done, 2) if done else None

                wal = loaded["wal"] - base["wal"]
                row = {
                    "reply_tokens": n,
                    "rate": rate,
                    "replies": done,
                    "replies_tried": replies,
                    "errors": merged["errors"],
                    "refused": merged.get("refused", 0),
                    "reply_seconds": round(n / rate, 2) if rate else None,
                    "transactions_per_reply": per(xacts),
                    "rows_written_per_reply": per(total),
                    "writes_per_reply": per(total),  # the name in older results
                    "messages_writes_per_reply": per(rows("messages")),
                    "message_events_writes_per_reply": per(rows("message_events")),
                    "other_rows_per_reply": per(total - rows("messages") - rows("message_events")),
                    "wal_kb_per_reply": round(wal / 1024 / done, 2) if done and self.db.embedded else None,
                    "transactions": xacts,
                    "idle_server_transactions_excluded": base["xacts"],
                    "tables": diff,
                    "seconds": round(loaded["serving_s"], 1),
                    "note": "per reply: one CreateThread and one SendMessage (the user's message, the "
                    "reply and its checkpoints, rate-limit counters); an idle server's writes over as "
                    "long are subtracted",
                }
                self.results["db_writes_per_reply"].append(row)
                if done < replies:
                    self.results["problems"].append(
                        f"writes {n} tokens at {rate:g}/s: {done} of {replies} replies completed "
                        f"{merged['errors']} {merged['error_samples']}"[:2000]
                    )
                log(
                    f"  writes: {n} tokens at rate {rate:g}: {row['transactions_per_reply']} xacts/reply,"
                    f" {row['rows_written_per_reply']} rows/reply (idle server: {base['xacts']} xacts) {diff}"
                )
                self._save()
        self.results["db_writes_length_dependence"] = report.length_dependence(
            self.results["db_writes_per_reply"]
        )

    async def _writes_window(self, tag: str, work) -> dict[str, Any]:
        """Snapshot, a fresh server, `await work(system)`, the server stopped, snapshot: what the
        run's database recorded in between (the monitor's own transactions taken out)."""
        assert self.db is not None and self.senv is not None
        await self._backends_gone()
        before = await self.db.snapshot()
        wal0 = await self.db.wal_bytes()
        started = await systems.start_servers(self.run_dir, self.senv, 1, tag)
        ps = [p for p, _ in started]
        self._track(*ps)
        t0 = time.monotonic()
        try:
            port = started[0][1]
            result = await work(System("grpc-1", "grpc", systems.grpc_target([port]), ports=[port]))
            serving = time.monotonic() - t0
        finally:
            self._stop(ps)  # SIGTERM: a graceful stop saves whatever is still in flight
        await self._backends_gone()
        after = await self.db.snapshot()
        wal1 = await self.db.wal_bytes()
        tables = {
            tbl: {
                k: after["tables"][tbl][k] - before["tables"].get(tbl, {}).get(k, 0)
                for k in ("ins", "upd", "del")
            }
            for tbl in after["tables"]
        }
        return {
            "merged": result,
            "serving_s": serving,
            "xacts": after["xacts"] - before["xacts"] - (after["monitor"] - before["monitor"]),
            "tables": tables,
            "wal": wal1 - wal0,
        }

    async def _migrated(self) -> None:
        """Upgrade to head again: in a checkout where someone adds a migration during a long run,
        servers started from the new code would otherwise report NOT_SERVING."""
        assert self.db is not None
        from everything_server.db import migrate

        if (
            await self.db.count(
                f"SELECT count(*) FROM alembic_version WHERE version_num = '{migrate.head_revision()}'"
            )
            == 0
        ):
            log("the migrations changed during the run: upgrading the database to the new head")
            self.results["problems"].append("migrations changed during the run (database upgraded)")
            await self.db.migrate()

    async def _backends_gone(self, timeout: float = 15.0) -> None:
        """Wait (bounded) until no client is connected to the run's database but the monitor
        (asked on the admin database, so the waiting adds no transaction to the run's)."""
        assert self.db is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.db.client_backends() == 0:
                return
            await asyncio.sleep(0.2)
        self.results["problems"].append(f"server connections still open {timeout:.0f}s after it stopped")

    async def profile(self) -> None:
        """One server under py-spy (started by py-spy: attaching is not allowed in every container)
        while 64 streams run for the run's duration. `--gil`: only samples holding the GIL, so idle
        threads (thread pool, metrics HTTP server) and waits in the event loop's select() are not
        counted; the server's start-up (imports) is left out of the summary."""
        a = self.args
        assert self.senv is not None
        spy = systems.VENV_BIN / "py-spy"
        if not spy.exists():
            self.results["problems"].append(
                "py-spy is not installed in .venv: no profile (pip install py-spy)"
            )
            return
        out = self.run_dir / "profile.raw"
        env = self.senv.env()
        rate_hz = 200
        args = [
            str(spy), "record", "--gil", "-r", str(rate_hz), "-f", "raw", "-o", str(out), "--",
            str(systems.VENV_BIN / "everything-server"), "--host", "127.0.0.1", "--port", "0",
        ]  # fmt: skip
        p = procs.spawn(
            "server-profiled", args, env, self.run_dir / "logs" / "server-profiled.log", cwd=ROOT, server=True
        )
        self._track(p)
        try:
            port = await procs.wait_for(
                lambda: systems._listening_port(p), "starting the profiled server", p, 90
            )
            kids = procs.children_map()
            server_pid = next((c for c in procs.tree(p.pid, kids) if c != p.pid), None)
            system = System("grpc-1", "grpc", f"127.0.0.1:{port}", ports=[int(port)])
            system.server_pids = [server_pid] if server_pid else []
            self._system = system
            await self.ensure_users(system.target)
            if a.profile_method:
                concurrency, unit = a.unary_concurrency, "request"
                merged, cpu, *_ = await self.load(
                    system, concurrency, kind="unary", method=a.profile_method, ramp=0.0
                )
                units = len(merged["latency"])
            else:
                concurrency, unit = a.profile_concurrency, "token"
                merged, cpu, *_ = await self.load(system, concurrency)
                units = merged["tokens"]
            await self.quiesce()
            self._system = None
            if server_pid:  # stop the server only: py-spy writes its file once its child exits
                os.kill(server_pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(30)
        finally:
            self._system = None
            self._stop([p])
        if not out.exists():
            self.results["problems"].append(f"py-spy wrote no profile; see {p.log_path}")
            return
        summary = pyspy.summarize(out, rate_hz=rate_hz, units=units, unit=unit)
        summary.update(
            concurrency=concurrency,
            method=a.profile_method,
            server_cpu_s=round(cpu["server"], 3),
            raw=str(out),
        )
        self.results["profile"] = summary
        text = pyspy.render(summary)
        (a.out / "profile.txt").write_text(text + "\n")
        print(text)

    # -- output ----------------------------------------------------------------------------------------

    def _save(self) -> None:
        a = self.args
        a.out.mkdir(parents=True, exist_ok=True)
        report.add_ratios(self.results)
        (a.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def finish(self) -> str:
        a = self.args
        self.results["meta"]["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["meta"]["run_dir"] = str(self.run_dir)
        self.results["meta"]["pids"] = self.all_pids
        self._save()
        text = report.render(self.results)
        md = report.render(self.results, table=report.md_table)
        if self.results["problems"]:
            text += "\n\nProblems:\n" + "\n".join(f"- {p}" for p in self.results["problems"])
            md += "\n\nProblems:\n" + "\n".join(f"- {p}" for p in self.results["problems"])
        (a.out / "results.md").write_text(md + "\n")
        return text


async def main_async(args: argparse.Namespace) -> int:
    bench = Bench(args)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await bench.setup()
        for name in args.systems:
            await bench.run_system(name)
        if not args.no_writes:
            await bench.db_writes()
        if args.profile:
            await bench.profile()
    finally:
        await bench.teardown()
        # Whatever was measured is written, also after an error or Ctrl-C.
        print(bench.finish())
        print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if bench.failed else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
