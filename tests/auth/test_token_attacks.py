"""Tokens that must not get in: forged, altered, expired, misdirected or of the wrong kind."""

from __future__ import annotations

import base64
import time
import uuid

import grpc
import jwt
import orjson
import pytest

from everything.auth.v1 import auth_service_pb2 as pb
from everything_server.auth.tokens import TokenService
from everything_server.config import parse_jwt_keys
from tests.support import expect_error

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


@pytest.fixture
def signing(jwt_keys, settings):
    kid, secret = parse_jwt_keys(jwt_keys)[0]
    return kid, secret, settings


def claims_for(user, settings, **changes):
    tokens = jwt.decode(user.access_token, options={"verify_signature": False})
    now = int(time.time())
    base = {**tokens, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


async def rejected(auth_stub, token: str, reason: str = "TOKEN_INVALID"):
    await expect_error(
        auth_stub.GetCurrentUser(
            pb.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {token}"),)
        ),
        UNAUTH,
        reason,
    )


async def test_a_well_formed_forgery_with_the_real_key_is_accepted(auth_stub, user, signing):
    # The control: the same construction as the attacks below, with nothing wrong, gets in.
    kid, secret, settings = signing
    token = jwt.encode(claims_for(user, settings), secret, algorithm="HS256", headers={"kid": kid})
    resp = await auth_stub.GetCurrentUser(
        pb.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )
    assert resp.user.id == user.id


async def test_alg_none_is_rejected(auth_stub, user, signing):
    kid, _, settings = signing
    token = f"{b64({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}.{b64(claims_for(user, settings))}."
    await rejected(auth_stub, token)


async def test_a_token_signed_with_another_key_is_rejected(auth_stub, user, signing):
    kid, _, settings = signing
    token = jwt.encode(
        claims_for(user, settings),
        "another secret that is long enough!!",
        algorithm="HS256",
        headers={"kid": kid},
    )
    await rejected(auth_stub, token)


async def test_unknown_kid_is_rejected(auth_stub, user, signing):
    _, secret, settings = signing
    token = jwt.encode(claims_for(user, settings), secret, algorithm="HS256", headers={"kid": "someone-else"})
    await rejected(auth_stub, token)


async def test_other_algorithms_are_rejected(auth_stub, user, signing):
    kid, secret, settings = signing
    token = jwt.encode(claims_for(user, settings), secret, algorithm="HS512", headers={"kid": kid})
    await rejected(auth_stub, token)


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "someone-else"},
        {"iss": "evil"},
        {"typ": "refresh"},
        {"exp": None},
        {"sid": None},
        {"sub": "nobody"},
    ],
    ids=["wrong-aud", "wrong-iss", "wrong-typ", "missing-exp", "missing-sid", "bad-sub"],
)
async def test_wrong_or_missing_claims_are_rejected(auth_stub, user, signing, changes):
    kid, secret, settings = signing
    token = jwt.encode(claims_for(user, settings, **changes), secret, algorithm="HS256", headers={"kid": kid})
    await rejected(auth_stub, token)


async def test_an_expired_token_says_expired(auth_stub, user, signing):
    kid, secret, settings = signing
    now = int(time.time())
    token = jwt.encode(
        claims_for(user, settings, iat=now - 600, exp=now - 300),
        secret,
        algorithm="HS256",
        headers={"kid": kid},
    )
    await rejected(auth_stub, token, "TOKEN_EXPIRED")


async def test_a_refresh_token_is_not_an_access_token(auth_stub, user):
    await rejected(auth_stub, user.refresh_token)


async def test_garbage_and_missing_headers(auth_stub):
    await rejected(auth_stub, "x" * 5000)
    await rejected(auth_stub, "a.b.c")
    await expect_error(auth_stub.GetCurrentUser(pb.GetCurrentUserRequest()), UNAUTH, "TOKEN_MISSING")
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=(("authorization", "Basic abc"),)),
        UNAUTH,
        "TOKEN_INVALID",
    )


async def test_a_token_for_a_forged_session_is_rejected(auth_stub, user, signing):
    kid, secret, settings = signing
    token = jwt.encode(
        claims_for(user, settings, sid=str(uuid.uuid4())), secret, algorithm="HS256", headers={"kid": kid}
    )
    await rejected(auth_stub, token, "SESSION_REVOKED")


def test_keys_rotate_old_tokens_verify_new_ones_use_the_new_kid():
    old = [("k1", "a" * 40)]
    new = [("k2", "b" * 40), ("k1", "a" * 40)]
    from datetime import timedelta

    before = TokenService(old, issuer="i", audience="a", access_ttl=timedelta(minutes=5))
    after = TokenService(new, issuer="i", audience="a", access_ttl=timedelta(minutes=5))
    uid, sid = uuid.uuid4(), uuid.uuid4()
    old_token, _ = before.issue_access(uid, sid)
    assert after.verify_access(old_token).user_id == uid
    new_token, _ = after.issue_access(uid, sid)
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    retired = TokenService([("k2", "b" * 40)], issuer="i", audience="a", access_ttl=timedelta(minutes=5))
    with pytest.raises(Exception, match="not valid"):
        retired.verify_access(old_token)
