"""Per-RPC context: the authenticated caller and the request id, in ContextVars set by the
interceptor. Handlers read the caller through `principal()`."""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from everything_server import errors


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    session_id: uuid.UUID


_principal: ContextVar[Principal | None] = ContextVar("principal", default=None)
_request_id: ContextVar[str] = ContextVar("request_id", default="-")


def principal() -> Principal:
    p = _principal.get()
    if p is None:  # only reachable if a public method calls a handler meant for signed-in users
        raise errors.Unauthenticated("sign in first", reason="TOKEN_MISSING")
    return p


def optional_principal() -> Principal | None:
    return _principal.get()


def request_id() -> str:
    return _request_id.get()


def set_principal(p: Principal | None):
    return _principal.set(p)


def set_request_id(rid: str):
    return _request_id.set(rid)
