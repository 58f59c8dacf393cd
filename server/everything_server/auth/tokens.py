"""Access tokens (JWT, HS256 pinned) and opaque refresh tokens.

Access tokens carry iss, aud, sub (user id), sid (session id), exp, iat, jti and typ="access", and
name their signing key in the `kid` header. Several keys verify, the first signs, so keys rotate by
adding a new key in front and dropping the old one once its tokens have expired.
Refresh tokens are 256 random bits; only their SHA-256 is stored.

Verifying an access token (two JSON parses and an HMAC in PyJWT) was the largest single cost of a
unary call, and a client sends the same token for up to its lifetime. So a verified token's result
is remembered, by the SHA-256 of the token (the token itself is not kept), until the token's `exp`:
verification is a pure function of the token, the keys and the clock, and the clock is checked on
every use. Revocation does not depend on this: every call's transaction checks that the session is
still live (db.Database.transaction).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta

import jwt

from everything_server import errors
from everything_server.rpc.context import Principal

ALGORITHM = "HS256"
ACCESS_TYPE = "access"
VERIFIED_CACHE_SIZE = 10_000


class TokenService:
    def __init__(
        self,
        keys: list[tuple[str, str]],
        *,
        issuer: str,
        audience: str,
        access_ttl: timedelta,
        cache_size: int = VERIFIED_CACHE_SIZE,
    ):
        if not keys:
            raise ValueError("at least one signing key is needed")
        # SHA-256 of a verified token -> (the caller, its exp); oldest entries go first when full.
        self._verified: dict[bytes, tuple[Principal, float]] = {}
        self._cache_size = cache_size
        self._keys = dict(keys)
        self._signing_kid = keys[0][0]
        self._issuer = issuer
        self._audience = audience
        self.access_ttl = access_ttl

    def issue_access(
        self, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime | None = None
    ) -> tuple[str, datetime]:
        now = now or datetime.now(UTC)
        exp = now + self.access_ttl
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "iat": int(now.timestamp()),
            "exp": int(exp.timestamp()),
            "jti": uuid.uuid4().hex,
            "typ": ACCESS_TYPE,
        }
        token = jwt.encode(
            claims,
            self._keys[self._signing_kid],
            algorithm=ALGORITHM,
            headers={"kid": self._signing_kid, "typ": "at+jwt"},
        )
        return token, datetime.fromtimestamp(claims["exp"], UTC)

    def verify_access(self, token: str) -> Principal:
        if len(token) > 4096:
            raise errors.Unauthenticated("the access token is not valid", reason="TOKEN_INVALID")
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._verified.get(digest)
        if hit is not None:
            if time.time() < hit[1]:
                return hit[0]
            del self._verified[digest]  # expired: the full check below says so
        principal, exp = self._verify(token)
        if len(self._verified) >= self._cache_size:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        invalid = errors.Unauthenticated("the access token is not valid", reason="TOKEN_INVALID")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str) or kid not in self._keys:
            raise invalid
        try:
            claims = jwt.decode(
                token,
                self._keys[kid],
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "sid", "jti", "typ"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.PyJWTError:
            raise invalid from None
        if claims.get("typ") != ACCESS_TYPE:
            raise invalid
        try:
            principal = Principal(user_id=uuid.UUID(claims["sub"]), session_id=uuid.UUID(claims["sid"]))
            return principal, float(claims["exp"])
        except (ValueError, TypeError, AttributeError):
            raise invalid from None


def new_refresh_token() -> str:
    return "rt_" + secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
