"""Prometheus metrics, served on their own port (EVERYTHING_METRICS_PORT) when enabled.

One registry per container, so several servers in one process (tests) keep separate counts.
Labels carry method names, status codes and reasons, never user ids, emails or prompts.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
LIMIT_REASONS = frozenset(
    {"RATE_LIMITED", "QUOTA_EXCEEDED", "SIGN_IN_THROTTLED", "TOO_MANY_STREAMS", "SERVER_OVERLOADED"}
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_total = Counter("everything_rpc_total", "RPCs handled", ["method", "code"], registry=r)
        self.rpc_seconds = Histogram(
            "everything_rpc_duration_seconds",
            "RPC duration (whole stream for streams)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("everything_active_streams", "Server streams open now", registry=r)
        self.limit_refusals = Counter(
            "everything_limit_refusals_total", "Calls refused by a limit or cap", ["reason"], registry=r
        )
        self.overload_refusals = Counter(
            "everything_overload_refusals_total",
            "New streams refused by admission control (SERVER_OVERLOADED), by cause: the process's "
            "configured stream cap (streams), its cap on streams not yet started (starting), its "
            "adaptive stream limit (load), a late event loop (loop_lag) or a standing queue for "
            "database connections (database)",
            ["cause"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "everything_event_loop_lag_seconds",
            "How late the event loop runs its timers, smoothed (admission control refuses new "
            "streams above EVERYTHING_MAX_LOOP_LAG_MS)",
            registry=r,
        )
        self.loop_load = Gauge(
            "everything_event_loop_load_ratio",
            "Share of wall time the event loop is not waiting for I/O (running callbacks, or waiting "
            "for a CPU), smoothed; admission control keeps it near EVERYTHING_ADMISSION_TARGET_LOAD",
            registry=r,
        )
        self.stream_limit = Gauge(
            "everything_stream_limit",
            "Open streams this process admits now (adaptive, at most EVERYTHING_MAX_STREAMS_PER_PROCESS)",
            registry=r,
        )
        self.call_backlog = Gauge(
            "everything_call_backlog",
            "Calls grpc core has received that no code of the server has taken yet (past capacity "
            "new calls wait there, before admission control can see them)",
            registry=r,
        )
        self.call_wait = Gauge(
            "everything_call_wait_seconds",
            "How long the oldest call waiting in grpc core has waited (to 50 ms)",
            registry=r,
        )
        self.loop_busy = Gauge(
            "everything_event_loop_busy_ratio",
            "Share of wall time the event loop's thread spends on the CPU, smoothed",
            registry=r,
        )
        self.upstream_ttft = Histogram(
            "everything_upstream_ttft_seconds",
            "Time to the model's first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_tokens = Counter(
            "everything_upstream_tokens_total", "Tokens reported by the model", ["model", "kind"], registry=r
        )
        self.upstream_errors = Counter(
            "everything_upstream_errors_total", "Failed model calls", ["reason"], registry=r
        )
        self.db_pool_in_use = Gauge(
            "everything_db_pool_in_use", "Database connections checked out", registry=r
        )
        self.db_pool_wait = Histogram(
            "everything_db_pool_wait_seconds",
            "Time waiting for a pooled connection",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._server = None
        # Labelled children by label values: `labels()` costs a lock and a lookup on every call.
        self._rpc_children: dict[tuple[str, str], tuple] = {}

    # -- hooks ------------------------------------------------------------------------------------

    def rpc_done(self, method: str, code: str, seconds: float, reason: str | None = None) -> None:
        children = self._rpc_children.get((method, code))
        if children is None:
            children = (self.rpc_total.labels(method, code), self.rpc_seconds.labels(method))
            self._rpc_children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)
        if reason in LIMIT_REASONS:
            self.limit_refusals.labels(reason).inc()

    def overload_refused(self, cause: str) -> None:
        self.overload_refusals.labels(cause).inc()

    def first_token(self, model: str, started: float) -> None:
        self.upstream_ttft.labels(model).observe(time.perf_counter() - started)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.upstream_tokens.labels(model, "prompt").inc(prompt)
        self.upstream_tokens.labels(model, "completion").inc(completion)

    def upstream_error(self, reason: str) -> None:
        self.upstream_errors.labels(reason).inc()

    # -- serving ----------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address[1]
        log.info("metrics listening", extra={"host": host, "port": bound})
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
