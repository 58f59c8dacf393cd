"""Limits that hold across replicas, counted atomically in PostgreSQL (migrations/0006_limits).

- `hit`: fixed-window rate limits (per user and service, sign-ups per address).
- `reserve` / `check` / `add_sql`: daily quotas per user (chat tokens, searches, images), UTC days.
- sign-in throttling per account and per client address with exponential back-off.

Every refusal is `ResourceExhausted` with RetryInfo (when to retry) and QuotaFailure (which limit).
Account keys are hashed, so the table never holds an email address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
import uuid
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server import errors
from everything_server.db import Database
from everything_server.db.database import driver_of

# Run on the driver connection (asyncpg placeholders): one statement per call of every user.
_HIT = """
    INSERT INTO rate_limit_windows AS w (key, window_start, hits)
    VALUES ($1, to_timestamp(floor(extract(epoch FROM now()) / $2) * $2), 1)
    ON CONFLICT (key, window_start) DO UPDATE SET hits = w.hits + 1
    RETURNING w.hits, extract(epoch FROM (w.window_start + make_interval(secs => $2) - now()))::float8 AS left
    """
_RESERVE = text(
    """
    INSERT INTO usage_counters AS u (user_id, day, kind, amount)
    VALUES (:uid, (now() AT TIME ZONE 'utc')::date, :kind, :amount)
    ON CONFLICT (user_id, day, kind) DO UPDATE SET amount = u.amount + EXCLUDED.amount
      WHERE u.amount + EXCLUDED.amount <= :limit
    RETURNING u.amount
    """
)


def add_sql(user: str, kind: str, amount: str, source: str = "") -> str:
    """SQL that adds `amount` to the user `user`'s quota `kind` used today (nothing for 0), for each
    row of `source` (a FROM clause; none: once); the arguments are SQL expressions (placeholders,
    or columns of `source`), so another statement can do it in the same round trip."""
    return f"""
        INSERT INTO usage_counters AS u (user_id, day, kind, amount)
        SELECT {user}, (now() AT TIME ZONE 'utc')::date, {kind}, {amount} {source}
         WHERE {amount} > 0
        ON CONFLICT (user_id, day, kind) DO UPDATE SET amount = u.amount + EXCLUDED.amount
    """  # noqa: S608


def used_today_sql(user: str, kind: str) -> str:
    """SQL for how much of quota `kind` the user `user` used today (NULL: none); the arguments are
    SQL expressions (placeholders), so another statement can read it in the same round trip."""
    return (
        f"SELECT amount FROM usage_counters WHERE user_id = {user} AND kind = {kind} "  # noqa: S608
        "AND day = (now() AT TIME ZONE 'utc')::date"
    )


DAY_SECONDS = 86_400
_USED = f"SELECT coalesce(({used_today_sql('$1', '$2')}), 0)"
_BLOCKED = text(
    "SELECT extract(epoch FROM max(blocked_until) - now())::float8 FROM auth_throttle "
    "WHERE key = ANY(:keys) AND blocked_until > now()"
)
# A failure counts up (a quiet hour resets the count); from `threshold` failures on, the key is
# blocked for base * 2^(failures - threshold) seconds, at most `cap`.
_FAIL = text(
    """
    INSERT INTO auth_throttle AS t (key, failures, blocked_until, updated_at)
    VALUES (:key, 1, CASE WHEN :threshold <= 1 THEN now() + make_interval(secs => :base) END, now())
    ON CONFLICT (key) DO UPDATE SET
      failures = CASE WHEN t.updated_at < now() - interval '1 hour' THEN 1 ELSE t.failures + 1 END,
      blocked_until = CASE
        WHEN (CASE WHEN t.updated_at < now() - interval '1 hour' THEN 1 ELSE t.failures + 1 END) >= :threshold
        THEN now() + make_interval(secs => least(:cap, :base * power(2, greatest(0,
             (CASE WHEN t.updated_at < now() - interval '1 hour' THEN 1 ELSE t.failures + 1 END) - :threshold))))
        END,
      updated_at = now()
    """
)
_CLEAR = text("DELETE FROM auth_throttle WHERE key = :key")
_FORGET = text("DELETE FROM rate_limit_windows WHERE key LIKE :pattern")
_SWEEP = text("DELETE FROM rate_limit_windows WHERE window_start < now() - interval '1 day'")


@dataclass(frozen=True)
class SignInPolicy:
    account_threshold: int = 5
    address_threshold: int = 20
    base_seconds: float = 1.0
    cap_seconds: float = 900.0


def account_key(email: str) -> str:
    return "signin:account:" + hashlib.sha256(email.encode()).hexdigest()[:32]


def address_key(address: str) -> str:
    return "signin:address:" + address


class Limits:
    def __init__(self, db: Database, *, sign_in: SignInPolicy | None = None):
        self._db = db
        self.sign_in = sign_in or SignInPolicy()

    # -- rate limits ------------------------------------------------------------------------------

    async def hit(self, key: str, *, limit: int, window_seconds: int, subject: str, what: str) -> None:
        """Count one request against `key`; refuse when the window already holds `limit`."""
        async with self._db.driver() as conn:
            hits, left = await conn.fetchrow(_HIT, key, window_seconds)
        if hits > limit:
            raise errors.ResourceExhausted(
                f"too many requests: at most {limit} {what} per {window_seconds} s",
                reason="RATE_LIMITED",
                retry_after=max(left, 0.001),
                violations=[errors.QuotaViolation(subject, f"{limit} {what} per {window_seconds} s")],
            )

    async def forget_user(self, session: AsyncSession, user_id: uuid.UUID) -> None:
        """Drop the user's rate-limit windows (their keys hold the user id) with the account."""
        await session.execute(_FORGET, {"pattern": f"rpc:{user_id}:%"})

    async def sweep(self) -> None:
        async with self._db.transaction() as session:
            await session.execute(_SWEEP)

    # -- daily quotas -----------------------------------------------------------------------------

    @staticmethod
    def _exceeded(user_id: uuid.UUID, kind: str, limit: int) -> errors.ResourceExhausted:
        # The quota day ends at midnight UTC (`used_today_sql`); POSIX time counts 86,400 s a day.
        left = DAY_SECONDS - time.time() % DAY_SECONDS
        return errors.ResourceExhausted(
            f"daily {kind} quota of {limit} is used up",
            reason="QUOTA_EXCEEDED",
            retry_after=left,
            violations=[errors.QuotaViolation(f"user:{user_id}", f"{limit} {kind} per day")],
        )

    async def reserve(
        self, session: AsyncSession, user_id: uuid.UUID, kind: str, amount: int, limit: int
    ) -> None:
        """Take `amount` from today's quota in the caller's transaction, or refuse atomically."""
        row = None
        if amount <= limit:
            row = (
                await session.execute(
                    _RESERVE, {"uid": user_id, "kind": kind, "amount": amount, "limit": limit}
                )
            ).first()
        if row is None:
            raise self._exceeded(user_id, kind, limit)

    async def used_today(self, db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, kind: str) -> int:
        return await (await driver_of(db)).fetchval(_USED, user_id, kind)

    def check(self, user_id: uuid.UUID, kind: str, limit: int, *, used: int) -> None:
        """Refuse when today's quota is already used up (for costs known only afterwards); `used`
        comes from `used_today`, or from `used_today_sql` in the caller's own statement."""
        if used >= limit:
            raise self._exceeded(user_id, kind, limit)

    # -- sign-in throttling -----------------------------------------------------------------------

    def _keys(self, email: str, address: str | None) -> list[tuple[str, int]]:
        keys = [(account_key(email), self.sign_in.account_threshold)]
        if address:
            keys.append((address_key(address), self.sign_in.address_threshold))
        return keys

    async def check_sign_in(self, email: str, address: str | None) -> None:
        keys = [k for k, _ in self._keys(email, address)]
        async with self._db.transaction() as session:
            left = (await session.execute(_BLOCKED, {"keys": keys})).scalar_one()
        if left is not None:
            raise errors.ResourceExhausted(
                "too many failed sign-ins; wait before trying again",
                reason="SIGN_IN_THROTTLED",
                retry_after=max(left, 0.001),
                violations=[errors.QuotaViolation("sign-in", "failed sign-ins per account and per address")],
            )

    async def sign_in_failed(self, email: str, address: str | None) -> None:
        async with self._db.transaction() as session:
            for key, threshold in self._keys(email, address):
                await session.execute(
                    _FAIL,
                    {
                        "key": key,
                        "threshold": threshold,
                        "base": self.sign_in.base_seconds,
                        "cap": self.sign_in.cap_seconds,
                    },
                )

    async def sign_in_succeeded(self, email: str) -> None:
        async with self._db.transaction() as session:
            await session.execute(_CLEAR, {"key": account_key(email)})


def client_address(
    peer: str, forwarded_for: str, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The caller's address: the gRPC peer, or the last X-Forwarded-For hop when the peer is a
    trusted proxy (Envoy appends the address it saw)."""
    address = peer
    if peer.startswith("ipv4:"):
        address = peer[5:].rsplit(":", 1)[0]
    elif peer.startswith("ipv6:"):
        address = peer[5:].rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if forwarded_for and any(ip in net for net in trusted):
        hop = forwarded_for.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:
            pass
    return str(ip)
