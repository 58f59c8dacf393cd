"""The gRPC server: services, health, reflection, interceptor, and a graceful stop.

Health (grpc.health.v1) is NOT_SERVING until the database answers and is migrated to head, again
whenever the database goes away, and for good once draining starts.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import text

from everything.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from everything.image.v1 import image_service_pb2, image_service_pb2_grpc
from everything.preferences.v1 import preferences_service_pb2, preferences_service_pb2_grpc
from everything.search.v1 import search_service_pb2, search_service_pb2_grpc
from everything_server.auth.servicer import AuthServicer
from everything_server.chat import wiring as chat_wiring
from everything_server.config import Settings
from everything_server.container import Container
from everything_server.db import migrate
from everything_server.image import wiring as image_wiring
from everything_server.preferences import wiring as preferences_wiring
from everything_server.rpc.acceptors import Acceptors, HandlerRecorder, drain_wakeups
from everything_server.rpc.admission import CallBacklog, LoopLagMonitor, StreamAdmission, calls_seen
from everything_server.rpc.interceptor import Caps, ServerInterceptor
from everything_server.search import wiring as search_wiring

log = logging.getLogger(__name__)

HEALTH_INTERVAL_SECONDS = 2.0
# Lame duck (`App._close_server`): over once no call has come for this long, looked at this often.
LAME_DUCK_QUIET_SECONDS = 0.1
LAME_DUCK_POLL_SECONDS = 0.02


def _services(c: Container) -> list[tuple[object, object, object]]:
    """(service descriptor, servicer, add function) for every service, wired by its domain."""
    return [
        (
            auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"],
            AuthServicer(c.auth, c.exporter, c.settings.trusted_proxy_networks),
            auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
        ),
        (
            chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"],
            chat_wiring.install(c),
            chat_service_pb2_grpc.add_ChatServiceServicer_to_server,
        ),
        (
            search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
            search_wiring.install(c),
            search_service_pb2_grpc.add_SearchServiceServicer_to_server,
        ),
        (
            image_service_pb2.DESCRIPTOR.services_by_name["ImageService"],
            image_wiring.install(c),
            image_service_pb2_grpc.add_ImageServiceServicer_to_server,
        ),
        (
            preferences_service_pb2.DESCRIPTOR.services_by_name["PreferencesService"],
            preferences_wiring.install(c),
            preferences_service_pb2_grpc.add_PreferencesServiceServicer_to_server,
        ),
    ]


def _async(fn):
    async def run() -> None:
        fn()

    return run


class App:
    def __init__(self, settings: Settings, container: Container | None = None):
        self.settings = settings
        self.container = container
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.db_ready = False
        # Read once: the migration files on disk may change under a running process.
        self._head = migrate.head_revision()
        self._known_revisions = migrate.known_revisions()
        self._service_names: list[str] = []
        self._draining = False
        self._watcher: asyncio.Task | None = None
        self._owns_container = container is None
        self.loop_lag: LoopLagMonitor | None = None
        self.acceptors: Acceptors | None = None

    async def start(self) -> int:
        s = self.settings
        if self.container is None:
            self.container = await Container.create(s)
        c = self.container
        if s.migrate_on_start:
            await migrate.upgrade_async(c.migration_url)
        await c.start()
        admission = StreamAdmission(
            s.max_streams_per_process,
            max_starting=s.max_starting_streams,
            target_load=s.admission_target_load,
            metrics=c.metrics,
        )
        self.loop_lag = LoopLagMonitor(
            metrics=c.metrics,
            warn_above=s.max_loop_lag_ms / 1000,
            admission=admission,
            # Read for its gauges only: not at all while no one can scrape them.
            backlog=CallBacklog() if s.metrics_port is not None else None,
        )
        interceptor = ServerInterceptor(
            c.tokens.verify_access,
            limits=c.limits,
            metrics=c.metrics,
            ready=lambda: self.db_ready,
            draining=lambda: self._draining,
            tracing=c.tracing,
            loop_lag=self.loop_lag,
            db_wait=c.db.queue.oldest_wait,
            admission=admission,
            caps=Caps(
                rate_limit_per_minute=s.rate_limit_per_minute,
                max_streams_per_user=s.max_streams_per_user,
                max_loop_lag_seconds=s.max_loop_lag_ms / 1000,
                max_db_wait_seconds=s.max_db_wait_ms / 1000,
                unary_timeout_seconds=s.unary_timeout_seconds,
            ),
        )
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 1 if s.reuse_port else 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        recorder = HandlerRecorder(self.server)
        for descriptor, servicer, add in _services(c):
            add(servicer, recorder)
            self._service_names.append(descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self._set_health(False)
        if s.metrics_port is not None:
            self.metrics_port = c.metrics.serve(s.metrics_host, s.metrics_port)
            c.shutdown_hooks.append(_async(c.metrics.close))
        self.port = self.server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {s.host}:{s.port}")
        self.loop_lag.start()
        await self.server.start()
        self.acceptors = Acceptors(self.server, recorder.handlers, [interceptor], s.accept_ahead_per_method)
        self.acceptors.start()
        drain_wakeups()
        await self._check_health()
        self._watcher = asyncio.create_task(self._watch_health(), name="health-watcher")
        log.info("listening", extra={"host": s.host, "port": self.port, "mock_model": s.uses_mock_model})
        return self.port

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def _check_health(self) -> bool:
        assert self.container is not None
        try:
            async with asyncio.timeout(HEALTH_INTERVAL_SECONDS * 2):
                revision = await self.container.db.current_revision()
            ok = migrate.is_current(revision, self._head, self._known_revisions)
            if not ok:
                log.warning("database is not migrated to head", extra={"revision": revision})
        except Exception as exc:  # any failure to reach the database means not serving
            log.warning("database is not reachable", extra={"error": type(exc).__name__})
            ok = False
        self.db_ready = ok
        if not self._draining:
            await self._set_health(ok)
        return ok

    async def _watch_health(self) -> None:
        beats = 0
        while not self._draining:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS)
            if await self._check_health() and beats % 30 == 0:  # about every minute
                try:
                    await self.sweep()
                except Exception:  # housekeeping only; the next round tries again
                    log.warning("housekeeping failed; trying again later")
            beats += 1

    async def sweep(self) -> None:
        """Housekeeping every replica may do (idempotent): old rate-limit windows go, and searches and
        images whose replica died are failed instead of running forever."""
        assert self.container is not None
        await self.container.limits.sweep()
        async with self.container.db.transaction() as session:
            failed = (
                await session.execute(
                    text("SELECT app_fail_stale_work(:age)"), {"age": self.settings.stale_work_seconds}
                )
            ).scalar_one()
        if failed:
            log.warning("failed searches and images whose replica died", extra={"count": failed})

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, give running ones `grace` seconds, then close."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._draining = True
        if self._watcher:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"grace_seconds": grace})
        # Calls in flight and detached generations get the same grace period, side by side.
        waits = [self.container.drain(grace)] if self.container is not None else []
        if self.server is not None:
            waits.append(self._close_server(grace))
        await asyncio.gather(*waits)
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        if self.container is not None and self._owns_container:
            await self.container.aclose()
        log.info("stopped")

    async def _close_server(self, grace: float) -> None:
        """Lame duck, then grpc's stop with what is left of the grace.

        While lame, the port stays open and every new call is refused by the interceptor
        (UNAVAILABLE, SHUTTING_DOWN, RetryInfo), until no call has come for LAME_DUCK_QUIET_SECONDS
        or `shutdown_lame_duck_seconds` have passed. grpc's stop alone answers racing calls less
        well: one that reaches grpc core as grpc.aio stops taking calls can be taken by core and
        never handed to a handler, and then waits for the end of the grace (the SIGTERM fault test
        saw one hit its 2 s deadline). Refused here, callers move on before that moment comes."""
        assert self.server is not None
        loop = asyncio.get_running_loop()
        start = quiet_since = loop.time()
        lame = min(self.settings.shutdown_lame_duck_seconds, grace)
        seen = calls_seen()
        while (now := loop.time()) - start < lame and now - quiet_since < LAME_DUCK_QUIET_SECONDS:
            await asyncio.sleep(LAME_DUCK_POLL_SECONDS)
            if (n := calls_seen()) != seen:
                seen, quiet_since = n, loop.time()
        await self.server.stop(max(0.0, grace - (loop.time() - start)))
        if self.acceptors is not None:
            await self.acceptors.stop()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
