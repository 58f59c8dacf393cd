"""Settings, parsed once from the environment (and an optional `.env`) and validated at start-up.

Most variables carry the `EVERYTHING_` prefix; the well-known ones (`DATABASE_URL`, `OPENAI_API_KEY`,
`OPENAI_BASE_URL`) are read under their usual names too.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "everything"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EVERYTHING_", env_file=".env", extra="ignore", populate_by_name=True
    )

    environment: Environment = Environment.DEVELOPMENT

    # Network
    host: str = "[::]"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; off when unset"
    )
    metrics_host: str = "127.0.0.1"
    # A search or image still running this long after its last change lost its replica: it is failed.
    stale_work_seconds: float = Field(600.0, ge=60, le=86400)
    # Worker processes on one port (SO_REUSEPORT), so a machine's every core serves; 1 = this process.
    workers: int = Field(1, ge=1, le=64)
    reuse_port: bool = False
    shutdown_grace_seconds: float = Field(20.0, ge=0, le=600)
    # The first part of that grace: the port stays open and new calls are refused (UNAVAILABLE,
    # SHUTTING_DOWN) until none has come for a moment, at most this long; then grpc's own stop.
    shutdown_lame_duck_seconds: float = Field(1.0, ge=0, le=600)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    # Storage
    database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "EVERYTHING_DATABASE_URL")
    )
    migration_database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("MIGRATION_DATABASE_URL", "EVERYTHING_MIGRATION_DATABASE_URL")
    )
    data_dir: Path = Field(default_factory=_default_data_dir)
    db_pool_size: int = Field(10, ge=1, le=200)
    db_max_overflow: int = Field(10, ge=0, le=200)
    migrate_on_start: bool = False
    # The role requests run as (no superuser, no BYPASSRLS, owns nothing). When DATABASE_URL logs in
    # as a privileged role (the embedded default, a laptop's postgres), development mode switches to
    # this role on the same server by itself; production refuses to start that way.
    db_app_role: str = Field("everything_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    # Auth
    jwt_issuer: str = "everything"
    jwt_audience: str = "everything-api"
    # Signing keys as "kid:secret" pairs, comma separated. The first one signs; all of them verify.
    jwt_keys: SecretStr | None = None
    access_token_ttl_minutes: int = Field(15, ge=1, le=24 * 60)
    refresh_token_ttl_days: int = Field(30, ge=1, le=365)
    argon2_time_cost: int = Field(2, ge=2, le=20)
    argon2_memory_kib: int = Field(19 * 1024, ge=19 * 1024, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(1, ge=1, le=16)
    # Key for signed URLs and page cursors; generated and kept in the data folder when unset.
    url_signing_key: SecretStr | None = None
    image_url_base: str = "http://localhost:8080"
    image_url_ttl_seconds: int = Field(3600, ge=10, le=7 * 24 * 3600)

    # AI upstream (any OpenAI-compatible server). No key: the built-in mock model is started.
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "EVERYTHING_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "EVERYTHING_OPENAI_BASE_URL")
    )
    chat_model: str = "gpt-4o-mini"
    title_model: str | None = None
    image_model: str = "gpt-image-1"
    openai_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    openai_connect_timeout_seconds: float = Field(10.0, gt=0, le=600)
    # A stream that sends nothing for this long is treated as stalled.
    openai_stall_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    openai_max_retries: int = Field(2, ge=0, le=10)
    # How chat streams reach the upstream: "native" (http1, the default: each chunk parsed where it
    # is read), or the SDK's own "aiohttp"/"httpx" transports for everything (see ai/provider.py).
    openai_transport: Literal["native", "aiohttp", "httpx"] = "native"
    default_system_prompt: str = "You are a helpful assistant."
    default_temperature: float = Field(0.7, ge=0, le=2)
    history_budget_chars: int = Field(24_000, ge=1_000, le=2_000_000)
    # The text of a chat reply or a search summary goes to a stream at most once per this many
    # milliseconds: the tokens that come meanwhile travel together in one message (the first token and
    # the end are never held). 0 sends every token as its own message. Each message costs the server a
    # socket write and a wake-up, so this is most of the CPU a stream costs (see the README's benchmark).
    stream_interval_ms: int = Field(40, ge=0, le=1000)

    # Web search providers: each is on when its URL (SearXNG) or API key (Brave, Tavily) is set.
    searxng_url: str | None = Field(None, pattern=r"^https?://\S+$")
    brave_api_key: SecretStr | None = None
    brave_url: str = Field("https://api.search.brave.com/res/v1/web/search", pattern=r"^https?://\S+$")
    tavily_api_key: SecretStr | None = None
    tavily_url: str = Field("https://api.tavily.com/search", pattern=r"^https?://\S+$")
    search_timeout_seconds: float = Field(8.0, gt=0, le=120)

    # Limits (counted in PostgreSQL, so they hold across replicas)
    rate_limit_per_minute: int = Field(600, ge=1, description="calls per user, per service, per minute")
    sign_up_per_address_per_hour: int = Field(20, ge=1)
    sign_in_account_threshold: int = Field(5, ge=1, description="failed sign-ins before back-off starts")
    sign_in_address_threshold: int = Field(20, ge=1)
    sign_in_backoff_base_seconds: float = Field(1.0, gt=0, le=3600)
    sign_in_backoff_cap_seconds: float = Field(900.0, gt=0, le=86400)
    quota_daily_chat_tokens: int = Field(1_000_000, ge=1)
    quota_daily_searches: int = Field(500, ge=1)
    quota_daily_images: int = Field(100, ge=1)
    # Server-side caps, per process: refused at once (RESOURCE_EXHAUSTED), never queued.
    max_streams_per_user: int = Field(8, ge=1, le=10_000)
    # Admission control (rpc.admission): a new stream is refused (SERVER_OVERLOADED, RetryInfo) while
    # the process holds max_streams_per_process open streams, or while its event loop runs more than
    # max_loop_lag_ms late (smoothed; 0 turns the lag check off), or, with admission_target_load
    # above 0, while it holds as many streams as an adaptive limit that keeps the event loop's load
    # near that target (0.85 measured best on 2 cores; off by default: it trades a third to half the
    # throughput past capacity for refusals in milliseconds). Unary calls are not refused by it.
    max_streams_per_process: int = Field(2000, ge=1, le=1_000_000)
    max_starting_streams: int = Field(256, ge=1, le=1_000_000)
    max_db_wait_ms: float = Field(250.0, ge=0, le=60_000)
    admission_target_load: float = Field(0.0, ge=0, lt=1)
    max_loop_lag_ms: float = Field(100.0, ge=0, le=60_000)
    # Calls of each method requested from grpc core ahead of grpc.aio's own one (rpc/acceptors.py):
    # a busy server takes a burst of new calls this many at a time, instead of one every few event
    # loop iterations, so that admission control sees them (and can refuse them) at once.
    accept_ahead_per_method: int = Field(16, ge=0, le=1024)
    unary_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # Comma-separated CIDRs of proxies (Envoy) whose X-Forwarded-For is believed.
    trusted_proxies: str = ""

    # Tracing (OpenTelemetry); off by default.
    otel_enabled: bool = False
    otel_exporter: str = Field("otlp", pattern=r"^(otlp|console|memory)$")
    otel_endpoint: str | None = None
    otel_service_name: str = "everything-server"

    # Logging
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v

    @field_validator("jwt_keys")
    @classmethod
    def _jwt_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_jwt_keys(v.get_secret_value())
        return v

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            problems = []
            if self.jwt_keys is None:
                problems.append("EVERYTHING_JWT_KEYS must be set (a generated key is for development only)")
            if self.url_signing_key is None:
                problems.append("EVERYTHING_URL_SIGNING_KEY must be set")
            elif len(self.url_signing_key.get_secret_value().encode()) < 32:
                problems.append("EVERYTHING_URL_SIGNING_KEY must be at least 32 bytes")
            if self.database_url is None:
                problems.append("DATABASE_URL must be set (the embedded PostgreSQL is for development only)")
            elif not _has_password(self.database_url.get_secret_value()):
                problems.append("DATABASE_URL must carry the application role's password")
            if self.openai_api_key is None and self.openai_base_url is None:
                problems.append(
                    "OPENAI_API_KEY or OPENAI_BASE_URL must be set (the mock model is for development only)"
                )
            if problems:
                raise ValueError("production settings are incomplete: " + "; ".join(problems))
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, v: str) -> str:
        parse_networks(v)
        return v

    @property
    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return parse_networks(self.trusted_proxies)

    @property
    def uses_mock_model(self) -> bool:
        return self.openai_api_key is None and self.openai_base_url is None


def parse_jwt_keys(raw: str) -> list[tuple[str, str]]:
    """Parse "kid:secret,kid2:secret2". Secrets must be at least 32 bytes (HS256 wants 256 bits)."""
    keys: list[tuple[str, str]] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, secret = part.partition(":")
        if not sep or not kid or not secret:
            raise ValueError("each key must look like kid:secret")
        if len(secret.encode()) < 32:
            raise ValueError(f"key {kid!r} is shorter than 32 bytes")
        if any(k == kid for k, _ in keys):
            raise ValueError(f"key id {kid!r} appears twice")
        keys.append((kid, secret))
    if not keys:
        raise ValueError("no keys given")
    return keys


def parse_networks(raw: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"not a list of CIDRs: {exc}") from None


def _has_password(url: str) -> bool:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    return bool(parts.password) or bool(parse_qs(parts.query).get("password"))
