"""Auth rows ↔ protos."""

from __future__ import annotations

import uuid

from everything.auth.v1 import auth_pb2
from everything_server.auth.models import Session, User
from everything_server.auth.service import IssuedTokens
from everything_server.rpc.convert import ts


def user_to_proto(user: User) -> auth_pb2.User:
    return auth_pb2.User(
        id=str(user.id), email=user.email, display_name=user.display_name, create_time=ts(user.created_at)
    )


def tokens_to_proto(t: IssuedTokens) -> auth_pb2.Tokens:
    return auth_pb2.Tokens(
        access_token=t.access_token,
        access_token_expire_time=ts(t.access_expires_at),
        refresh_token=t.refresh_token,
        refresh_token_expire_time=ts(t.refresh_expires_at),
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
    )


def session_to_proto(s: Session, current: uuid.UUID) -> auth_pb2.Session:
    return auth_pb2.Session(
        id=str(s.id),
        create_time=ts(s.created_at),
        last_used_time=ts(s.last_used_at),
        expire_time=ts(s.expires_at),
        user_agent=s.user_agent,
        current=s.id == current,
    )


def user_export(user: User) -> dict:
    return {
        "id": str(user.id),
        "email": user.email,
        "display_name": user.display_name,
        "created_at": user.created_at.isoformat(),
    }


def session_export(s: Session) -> dict:
    return {
        "id": str(s.id),
        "user_agent": s.user_agent,
        "created_at": s.created_at.isoformat(),
        "last_used_at": s.last_used_at.isoformat(),
        "expires_at": s.expires_at.isoformat(),
        "revoked_at": s.revoked_at.isoformat() if s.revoked_at else None,
    }
