"""Explicit wiring: settings in, every long-lived object out. No module-level engines or clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.engine import make_url

from everything_server import keys
from everything_server.ai.provider import ChatProvider
from everything_server.auth import repository as auth_repo
from everything_server.auth.convert import session_export, user_export
from everything_server.auth.export import Exporter
from everything_server.auth.passwords import Passwords
from everything_server.auth.service import AuthService
from everything_server.auth.tokens import TokenService
from everything_server.background import Background
from everything_server.config import Environment, Settings, parse_jwt_keys
from everything_server.db import Database
from everything_server.db.embedded import start_embedded
from everything_server.db.pubsub import PubSub
from everything_server.limits import Limits, SignInPolicy
from everything_server.metrics import Metrics
from everything_server.rpc.context import Principal
from everything_server.tracing import Tracing

log = logging.getLogger(__name__)


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL, else the embedded PostgreSQL (started if needed; blocking)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    url = start_embedded(settings.data_dir)
    log.warning(
        "DATABASE_URL is not set: using the embedded PostgreSQL", extra={"data_dir": str(settings.data_dir)}
    )
    return url


def migration_url(settings: Settings, database_url: str) -> str:
    """MIGRATION_DATABASE_URL (the schema owner), else the database URL itself."""
    m = settings.migration_database_url
    return m.get_secret_value() if m is not None else database_url


def signing_keys(settings: Settings) -> tuple[list[tuple[str, str]], bytes]:
    """The JWT keys and the URL-signing key: configured, else development keys kept in the data
    folder (created once, so every process and restart signs alike)."""
    if settings.jwt_keys is not None:
        jwt_keys = parse_jwt_keys(settings.jwt_keys.get_secret_value())
    else:
        jwt_keys = [("local-dev", keys.load_or_create(settings.data_dir, "jwt"))]
        log.warning("EVERYTHING_JWT_KEYS is not set: using a generated development key from the data folder")
    if settings.url_signing_key is not None:
        url_key = settings.url_signing_key.get_secret_value().encode()
    else:
        url_key = keys.load_or_create(settings.data_dir, "url-signing").encode()
    return jwt_keys, url_key


@dataclass
class Container:
    settings: Settings
    database_url: str
    db: Database
    tokens: TokenService
    passwords: Passwords
    auth: AuthService
    exporter: Exporter
    url_signing_key: bytes
    pubsub: PubSub
    background: Background
    ai: ChatProvider
    limits: Limits
    metrics: Metrics
    tracing: Tracing
    mock_model: object | None = None  # the built-in mock model, when no upstream is configured
    # Called at shutdown in reverse order of registration, after draining.
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @classmethod
    async def create(cls, settings: Settings) -> Container:
        url = await asyncio.to_thread(resolve_database_url, settings)
        jwt_keys, url_key = signing_keys(settings)

        db = Database(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
        tokens = TokenService(
            jwt_keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            access_ttl=timedelta(minutes=settings.access_token_ttl_minutes),
        )
        passwords = Passwords(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        limits = Limits(
            db,
            sign_in=SignInPolicy(
                account_threshold=settings.sign_in_account_threshold,
                address_threshold=settings.sign_in_address_threshold,
                base_seconds=settings.sign_in_backoff_base_seconds,
                cap_seconds=settings.sign_in_backoff_cap_seconds,
            ),
        )
        auth = AuthService(
            db,
            passwords,
            tokens,
            limits,
            refresh_ttl=timedelta(days=settings.refresh_token_ttl_days),
            sign_ups_per_hour=settings.sign_up_per_address_per_hour,
        )

        async def export_header(p: Principal) -> dict:
            return user_export(await auth.current_user(p))

        async def export_sessions(p: Principal, include_bytes: bool):
            async with db.transaction(p.user_id, p.session_id) as s:
                rows = await auth_repo.all_sessions(s, p.user_id)
            for row in rows:
                yield session_export(row)

        exporter = Exporter(export_header)
        exporter.add_section("sessions", export_sessions)
        mock_model = None
        base_url = None
        if settings.uses_mock_model:
            from everything_server.ai.mock import MockModelServer

            mock_model = MockModelServer()
            base_url = await mock_model.start(host="127.0.0.1", port=0)
            log.warning(
                "NO OPENAI_API_KEY OR OPENAI_BASE_URL: replies come from the built-in MOCK MODEL, not a real one",
                extra={"mock_base_url": base_url},
            )
        ai = ChatProvider.from_settings(settings, base_url_override=base_url)
        metrics = Metrics()
        db.metrics = metrics
        ai.metrics = metrics
        tracing = Tracing(
            enabled=settings.otel_enabled,
            exporter=settings.otel_exporter,
            endpoint=settings.otel_endpoint,
            service_name=settings.otel_service_name,
        )
        db.tracer = ai.tracer = tracing.tracer
        pubsub = PubSub(url)
        container = cls(
            settings=settings,
            database_url=url,
            db=db,
            tokens=tokens,
            passwords=passwords,
            auth=auth,
            exporter=exporter,
            url_signing_key=url_key,
            pubsub=pubsub,
            background=Background(db, pubsub),
            ai=ai,
            limits=limits,
            metrics=metrics,
            tracing=tracing,
            mock_model=mock_model,
        )
        container.shutdown_hooks.append(db.dispose)
        container.shutdown_hooks.append(tracing.close)
        if mock_model is not None:
            container.shutdown_hooks.append(mock_model.stop)
        container.shutdown_hooks.append(ai.aclose)
        return container

    @property
    def migration_url(self) -> str:
        return migration_url(self.settings, self.database_url)

    async def start(self) -> None:
        """Open what needs a live database (the LISTEN connection). Called after migrations."""
        await self._become_app_role()
        await self.pubsub.start()
        self.shutdown_hooks.append(self.pubsub.close)
        await self.background.start()

    async def _become_app_role(self) -> None:
        """Serve requests as the application role, never as a role that bypasses row-level security."""
        role, privileged = await self.db.role()
        if not privileged:
            log.info("requests run as a role without RLS bypass", extra={"role": role})
            return
        if self.settings.environment is Environment.PRODUCTION:
            raise RuntimeError(
                f"DATABASE_URL logs in as {role!r}, which bypasses row-level security; in production it must "
                f"be the application role ({self.settings.db_app_role!r}); migrations use MIGRATION_DATABASE_URL"
            )
        app_role = self.settings.db_app_role
        async with self.db.engine.connect() as conn:
            # The role is per cluster, its grants per database: both must be there.
            ready = (
                await conn.execute(
                    text(
                        "SELECT 1 FROM pg_roles WHERE rolname = :r "
                        "AND to_regprocedure('app_grant_application_role()') IS NOT NULL"
                    ),
                    {"r": app_role},
                )
            ).first()
            if ready is None:
                log.error(
                    "the application role does not exist yet (database not migrated?): requests run as a "
                    "privileged role until restarted after migrating",
                    extra={"role": role},
                )
                return
            # Development convenience on a trusted local server: let the app role log in. Replicas
            # starting together take turns (concurrent ALTER ROLE fails: "tuple concurrently updated").
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('everything_app_role_login'))"))
            await conn.execute(text(f'ALTER ROLE "{app_role}" LOGIN'))
            await conn.commit()
        app_url = (
            make_url(self.db.url).set(username=app_role, password=None).render_as_string(hide_password=False)
        )
        await self.db.switch_url(app_url)
        self.pubsub.set_url(app_url)
        role, privileged = await self.db.role()
        if privileged:
            raise RuntimeError(f"the application role {role!r} bypasses row-level security")
        log.warning(
            "DATABASE_URL is a privileged role: development mode switched requests to the application role",
            extra={"role": role},
        )

    async def drain(self, grace: float) -> None:
        """Let running generations finish within `grace`, then cancel (their partial work is saved)."""
        await self.background.drain(grace)

    async def aclose(self) -> None:
        for hook in reversed(self.shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
