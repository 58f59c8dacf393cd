"""What the async and the sync client share: the RPC table, tokens, the refresh rule and channel setup.

The refresh rule is written once, as a plan (a generator) that yields steps — `Call` (make the
call; the runner sends back the response, or throws the EverythingError into the plan) and
`Refresh` (rotate the tokens). `aio.Client` runs plans with `await`, `sync.SyncClient` with
blocking calls; neither knows when to refresh, only how.

The rule: a call that needs a token and fails with UNAUTHENTICATED / TOKEN_EXPIRED gets one
RefreshToken and one retry. Refresh tokens are single-use and a reused one revokes the session, so
a refresh only happens if the access token that failed is still the current one (another call may
have rotated it meanwhile; then the retry just uses the new one). Streams are refreshed before they
start when the access token is about to expire, and retried like unary calls when the first read
says TOKEN_EXPIRED (the server refuses before the handler runs, so nothing happened yet).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory

from everything.auth.v1 import auth_pb2, auth_service_pb2, auth_service_pb2_grpc
from everything.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from everything.client.errors import EverythingError, UnauthenticatedError
from everything.image.v1 import image_service_pb2, image_service_pb2_grpc
from everything.preferences.v1 import preferences_service_pb2, preferences_service_pb2_grpc
from everything.search.v1 import search_service_pb2, search_service_pb2_grpc

__all__ = ["Rpc", "Tokens", "TokenHook"]

# Calls that must not carry a token (the server treats them as public).
_PUBLIC = {
    "everything.auth.v1.AuthService.SignUp",
    "everything.auth.v1.AuthService.SignIn",
    "everything.auth.v1.AuthService.RefreshToken",
    "everything.image.v1.ImageService.DownloadImage",
}

# Refresh a little before the access token's expiry, so a call does not race the clock.
EXPIRY_SKEW = timedelta(seconds=30)


@dataclass(frozen=True)
class Rpc:
    """One method of one service, from the generated descriptors."""

    service: str  # full name, "everything.chat.v1.ChatService"
    name: str  # "SendMessage"
    request: type
    response: type
    streaming: bool
    public: bool
    stub: type  # the generated stub class of the service

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _table(pb2: ModuleType, pb2_grpc: ModuleType, service: str) -> dict[str, Rpc]:
    desc = pb2.DESCRIPTOR.services_by_name[service]
    stub = getattr(pb2_grpc, f"{service}Stub")
    out = {}
    for m in desc.methods:
        assert not m.client_streaming, "gRPC-Web friendly contracts have no client streams"
        out[m.name] = Rpc(
            service=desc.full_name,
            name=m.name,
            request=message_factory.GetMessageClass(m.input_type),
            response=message_factory.GetMessageClass(m.output_type),
            streaming=m.server_streaming,
            public=f"{desc.full_name}.{m.name}" in _PUBLIC,
            stub=stub,
        )
    return out


AUTH = _table(auth_service_pb2, auth_service_pb2_grpc, "AuthService")
CHAT = _table(chat_service_pb2, chat_service_pb2_grpc, "ChatService")
SEARCH = _table(search_service_pb2, search_service_pb2_grpc, "SearchService")
IMAGE = _table(image_service_pb2, image_service_pb2_grpc, "ImageService")
PREFERENCES = _table(preferences_service_pb2, preferences_service_pb2_grpc, "PreferencesService")
ALL: dict[str, Rpc] = {r.path: r for t in (AUTH, CHAT, SEARCH, IMAGE, PREFERENCES) for r in t.values()}


# -- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """A session's tokens. Expiry times are the server's, in UTC (None when unknown)."""

    access_token: str
    refresh_token: str = ""
    access_expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None

    @classmethod
    def from_proto(cls, t: auth_pb2.Tokens) -> Tokens:
        return cls(
            access_token=t.access_token,
            refresh_token=t.refresh_token,
            access_expires_at=t.access_token_expire_time.ToDatetime(UTC)
            if t.HasField("access_token_expire_time")
            else None,
            refresh_expires_at=t.refresh_token_expire_time.ToDatetime(UTC)
            if t.HasField("refresh_token_expire_time")
            else None,
        )

    def to_dict(self) -> dict[str, str | None]:
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "access_expires_at": self.access_expires_at.isoformat() if self.access_expires_at else None,
            "refresh_expires_at": self.refresh_expires_at.isoformat() if self.refresh_expires_at else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokens:
        def when(key: str) -> datetime | None:
            v = d.get(key)
            return datetime.fromisoformat(v) if v else None

        return cls(
            access_token=str(d.get("access_token") or ""),
            refresh_token=str(d.get("refresh_token") or ""),
            access_expires_at=when("access_expires_at"),
            refresh_expires_at=when("refresh_expires_at"),
        )

    def expiring(self, now: datetime | None = None) -> bool:
        """True when the access token is known to expire within EXPIRY_SKEW."""
        if self.access_expires_at is None:
            return False
        return (now or datetime.now(UTC)) + EXPIRY_SKEW >= self.access_expires_at


# Called with the new tokens whenever they change (sign-in, refresh), and with None when they are
# dropped (sign-out, account deleted, the session revoked). Persist the refresh token here: the old
# one is spent.
TokenHook = Callable[[Tokens | None], None]


class Credentials:
    """The client's current tokens and the hook to tell when they rotate. Thread-safe."""

    def __init__(self, tokens: Tokens | None = None, on_tokens: TokenHook | None = None):
        self._tokens = tokens
        self._hook = on_tokens
        self._lock = threading.Lock()

    @property
    def tokens(self) -> Tokens | None:
        return self._tokens

    def set(self, tokens: Tokens | None) -> None:
        with self._lock:
            self._tokens = tokens
        if self._hook is not None:
            self._hook(tokens)

    def access_token(self) -> str | None:
        t = self._tokens
        return t.access_token if t and t.access_token else None

    def metadata(self, rpc: Rpc, extra: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        token = None if rpc.public else self.access_token()
        if token is None:
            return extra
        return (("authorization", f"Bearer {token}"), *extra)

    def can_refresh(self) -> bool:
        t = self._tokens
        return bool(t and t.refresh_token)

    def refresh_due(self, used: str | None) -> bool:
        """Whether a refresh is still needed after `used` failed (or was about to expire)."""
        t = self._tokens
        return bool(t and t.refresh_token and t.access_token == used)

    def refresh_request(self) -> auth_service_pb2.RefreshTokenRequest:
        t = self._tokens
        return auth_service_pb2.RefreshTokenRequest(refresh_token=t.refresh_token if t else "")

    def refreshed(self, response: auth_service_pb2.RefreshTokenResponse) -> None:
        self.set(Tokens.from_proto(response.tokens))

    def refresh_failed(self, err: EverythingError) -> None:
        # A refresh token the server refuses (spent, revoked, expired) will never work again.
        if isinstance(err, UnauthenticatedError):
            self.set(None)


# -- plans ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Make the call (a unary call, or open a stream and read its first event)."""

    rpc: Rpc
    request: Any
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Refresh:
    """Rotate the tokens, unless `used` is no longer the current access token."""

    used: str | None


Plan = Generator[Call | Refresh, Any, Any]


def plan(creds: Credentials, rpc: Rpc, request: Any, extra: tuple[tuple[str, str], ...] = ()) -> Plan:
    """The steps of one call with the refresh rule of the module docstring."""
    if not rpc.public and creds.can_refresh() and creds.tokens and creds.tokens.expiring():
        yield Refresh(creds.access_token())
    metadata = creds.metadata(rpc, extra)
    try:
        return (yield Call(rpc, request, metadata))
    except UnauthenticatedError as err:
        if rpc.public or err.reason != "TOKEN_EXPIRED" or not creds.can_refresh():
            raise
        used = _bearer(metadata)
    yield Refresh(used)
    return (yield Call(rpc, request, creds.metadata(rpc, extra)))


def _bearer(metadata: tuple[tuple[str, str], ...]) -> str | None:
    for k, v in metadata:
        if k == "authorization":
            return v.removeprefix("Bearer ")
    return None


def refresh_rpc() -> Rpc:
    return AUTH["RefreshToken"]


# -- requests with defaults that make retries safe --------------------------------------------------


def idempotency_key(given: str) -> str:
    """The caller's idempotency key, else a fresh one, so a retried streaming call is not doubled."""
    return given or str(uuid.uuid4())


# -- channels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the server. `target` is "host:port"; "https://host[:port]" means TLS (port 443)."""

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    # Client pings no more often than the server's default ping policy accepts (5 minutes without
    # data); the server pings idle clients itself every minute.
    keepalive_seconds: float = 300.0
    keepalive_timeout_seconds: float = 20.0
    max_message_bytes: int = 32 * 1024 * 1024
    user_agent: str = "everything-python-client/0.1"
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def normalized(self) -> ChannelConfig:
        target, tls = self.target, self.tls
        for scheme, is_tls, port in (
            ("https://", True, 443),
            ("grpcs://", True, 443),
            ("http://", False, 80),
        ):
            if target.startswith(scheme):
                target, tls = target[len(scheme) :].rstrip("/"), is_tls
                if ":" not in target.rsplit("]", 1)[-1]:
                    target = f"{target}:{port}"
        return replace(self, target=target, tls=tls)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.primary_user_agent", self.user_agent),
            *self.options,
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)


def make_channel(config: ChannelConfig, aio: bool) -> grpc.Channel | grpc.aio.Channel:
    cfg = config.normalized()
    creds = cfg.credentials()
    opts = cfg.channel_options()
    mod: Any = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(cfg.target, options=opts)
    return mod.secure_channel(cfg.target, creds, options=opts)
