"""A verified access token is remembered until its exp, and nothing else gets in because of that."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest

from everything.auth.v1 import auth_service_pb2 as pb
from everything_server import errors
from everything_server.auth.tokens import TokenService
from tests.support import expect_error

KEY = ("k1", "a" * 40)


def service(**kw) -> TokenService:
    return TokenService([KEY], issuer="i", audience="a", access_ttl=timedelta(minutes=5), **kw)


async def test_a_remembered_token_still_expires_at_its_exp():
    tokens = service()
    uid, sid = uuid.uuid4(), uuid.uuid4()
    # Issued so that it expires about 1.5 s from now.
    token, exp = tokens.issue_access(
        uid, sid, now=datetime.now(UTC) - timedelta(minutes=5) + timedelta(seconds=1.5)
    )
    assert tokens.verify_access(token).user_id == uid
    assert tokens.verify_access(token).session_id == sid  # from the cache
    await asyncio.sleep(max(0.0, exp.timestamp() - time.time()) + 0.05)
    with pytest.raises(errors.Unauthenticated) as err:
        tokens.verify_access(token)
    assert err.value.reason == "TOKEN_EXPIRED"


def test_an_altered_token_is_checked_on_its_own():
    tokens = service()
    uid = uuid.uuid4()
    token, _ = tokens.issue_access(uid, uuid.uuid4())
    assert tokens.verify_access(token).user_id == uid
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    other = jwt.encode(
        {**claims, "sub": str(uuid.uuid4())}, "b" * 40, algorithm="HS256", headers={"kid": "k1"}
    )
    for forged in (f"{header}.{other.split('.')[1]}.{signature}", other, token + "x"):
        with pytest.raises(errors.Unauthenticated):
            tokens.verify_access(forged)
    assert tokens.verify_access(token).user_id == uid


def test_the_cache_is_bounded_and_keeps_no_token():
    tokens = service(cache_size=3)
    issued = [tokens.issue_access(uuid.uuid4(), uuid.uuid4())[0] for _ in range(5)]
    for t in issued:
        tokens.verify_access(t)
    assert len(tokens._verified) == 3
    assert not any(t.encode() in key or key == t for t in issued for key in tokens._verified)
    # The oldest entries went; they still verify (again, in full).
    assert tokens.verify_access(issued[0])


async def test_a_signed_out_session_is_refused_although_its_token_was_verified_before(auth_stub, user):
    await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)  # remembered now
    await auth_stub.SignOut(pb.SignOutRequest(), metadata=user.md)
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md),
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )
