"""Auth rules: accounts, sessions with rotating refresh tokens, password changes, account deletion."""

from __future__ import annotations

import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from everything_server import errors
from everything_server.auth import repository as repo
from everything_server.auth.models import Session, User
from everything_server.auth.passwords import Passwords, check_policy
from everything_server.auth.tokens import TokenService, hash_refresh_token, new_refresh_token
from everything_server.db import Database
from everything_server.limits import Limits
from everything_server.rpc import paging
from everything_server.rpc.context import Principal

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")
BAD_CREDENTIALS = "email or password is wrong"


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    access_expires_at: datetime
    refresh_token: str
    refresh_expires_at: datetime


@dataclass(frozen=True)
class SignedIn:
    user: User
    tokens: IssuedTokens


def normalise_email(raw: str) -> str:
    email = unicodedata.normalize("NFKC", raw).strip().lower()
    if not email:
        raise errors.InvalidArgument("email", "is required")
    if len(email) > 254 or not _EMAIL.match(email):
        raise errors.InvalidArgument("email", "is not a valid email address")
    return email


class AuthService:
    def __init__(
        self,
        db: Database,
        passwords: Passwords,
        tokens: TokenService,
        limits: Limits,
        *,
        refresh_ttl: timedelta,
        sign_ups_per_hour: int = 20,
    ):
        self._db = db
        self._passwords = passwords
        self._tokens = tokens
        self._limits = limits
        self._refresh_ttl = refresh_ttl
        self._sign_ups_per_hour = sign_ups_per_hour

    # -- sessions ---------------------------------------------------------------------------------

    async def _start_session(self, db, user_id: uuid.UUID, user_agent: str) -> IssuedTokens:
        session_id = uuid.uuid4()
        now = datetime.now(UTC)
        refresh_expires = now + self._refresh_ttl
        await repo.insert_session(
            db,
            session_id=session_id,
            user_id=user_id,
            user_agent=user_agent[:300],
            expires_at=refresh_expires,
        )
        return await self._issue(db, user_id, session_id, now)

    async def _issue(self, db, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime) -> IssuedTokens:
        refresh = new_refresh_token()
        refresh_expires = now + self._refresh_ttl
        await repo.insert_refresh_token(
            db,
            token_hash=hash_refresh_token(refresh),
            session_id=session_id,
            user_id=user_id,
            expires_at=refresh_expires,
        )
        access, access_expires = self._tokens.issue_access(user_id, session_id, now)
        return IssuedTokens(access, access_expires, refresh, refresh_expires)

    # -- public calls -----------------------------------------------------------------------------

    async def sign_up(
        self,
        *,
        email: str,
        password: str,
        display_name: str,
        user_agent: str = "",
        address: str | None = None,
    ) -> SignedIn:
        email = normalise_email(email)
        check_policy(password, email=email)
        display_name = display_name.strip()
        if len(display_name) > 100:
            raise errors.InvalidArgument("display_name", "must be at most 100 characters")
        if address:
            await self._limits.hit(
                f"signup:address:{address}",
                limit=self._sign_ups_per_hour,
                window_seconds=3600,
                subject=f"address:{address}",
                what="sign-ups",
            )
        password_hash = await self._passwords.hash(password)
        user_id = uuid.uuid4()
        async with self._db.transaction(user_id) as db:
            user = await repo.insert_user(
                db, user_id=user_id, email=email, password_hash=password_hash, display_name=display_name
            )
            if user is None:
                raise errors.AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")
            tokens = await self._start_session(db, user.id, user_agent)
        return SignedIn(user, tokens)

    async def sign_in(
        self, *, email: str, password: str, user_agent: str = "", address: str | None = None
    ) -> SignedIn:
        try:
            email = normalise_email(email)
        except errors.InvalidArgument:
            email = ""
        password = password[:1024]
        # Throttled per account (known or not, so the answer tells nothing) and per address.
        await self._limits.check_sign_in(email, address)
        user = None
        if email:
            async with self._db.transaction() as db:
                owner = await repo.owner_of_email(db, email)
            if owner is not None:
                async with self._db.transaction(owner) as db:
                    user = await repo.user_by_id(db, owner)
        # Same work and the same answer whether or not the account exists.
        ok = await self._passwords.verify(user.password_hash if user else None, password)
        if not ok or user is None:
            await self._limits.sign_in_failed(email, address)
            raise errors.Unauthenticated(BAD_CREDENTIALS, reason="INVALID_CREDENTIALS")
        await self._limits.sign_in_succeeded(email)
        new_hash = (
            await self._passwords.hash(password) if self._passwords.needs_rehash(user.password_hash) else None
        )
        async with self._db.transaction(user.id) as db:
            if new_hash:
                await repo.set_password_hash(db, user.id, new_hash)
            tokens = await self._start_session(db, user.id, user_agent)
        return SignedIn(user, tokens)

    async def refresh(self, refresh_token: str) -> IssuedTokens:
        invalid = errors.Unauthenticated("the refresh token is not valid", reason="TOKEN_INVALID")
        if not refresh_token or len(refresh_token) > 200:
            raise invalid
        token_hash = hash_refresh_token(refresh_token)
        outcome: errors.DomainError | IssuedTokens
        async with self._db.transaction() as db:
            owner = await repo.owner_of_refresh_token(db, token_hash)
        if owner is None:
            raise invalid
        async with self._db.transaction(owner) as db:
            found = await repo.lock_refresh_token(db, token_hash)
            if found is None:
                raise invalid
            token, session = found
            now = datetime.now(UTC)
            if token.used_at is not None:
                # Reuse of a spent token means it leaked: end the whole family. Committed, then raised.
                await repo.revoke_session(
                    db, user_id=session.user_id, session_id=session.id, reason="refresh_token_reused"
                )
                outcome = errors.Unauthenticated(
                    "this refresh token was already used; the session is revoked",
                    reason="REFRESH_TOKEN_REUSED",
                )
            elif session.revoked_at is not None:
                outcome = errors.Unauthenticated(
                    "the session has ended; sign in again", reason="SESSION_REVOKED"
                )
            elif token.expires_at <= now or session.expires_at <= now:
                outcome = errors.Unauthenticated("the refresh token has expired", reason="TOKEN_EXPIRED")
            else:
                await repo.mark_refresh_token_used(db, token_hash)
                await repo.extend_session(db, session.id, now + self._refresh_ttl)
                outcome = await self._issue(db, session.user_id, session.id, now)
        if isinstance(outcome, errors.DomainError):
            raise outcome
        return outcome

    # -- signed-in calls --------------------------------------------------------------------------

    async def sign_out(self, p: Principal) -> None:
        async with self._db.transaction(p.user_id, p.session_id) as db:
            await repo.revoke_session(db, user_id=p.user_id, session_id=p.session_id, reason="signed_out")

    async def current_user(self, p: Principal) -> User:
        async with self._db.driver_transaction(p.user_id, p.session_id) as db:
            user = await repo.user_by_id(db, p.user_id)
        if user is None:
            raise errors.Unauthenticated("the account no longer exists", reason="SESSION_REVOKED")
        return user

    async def list_sessions(
        self, p: Principal, *, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        after = paging.decode(page_token)
        async with self._db.transaction(p.user_id, p.session_id) as db:
            rows = await repo.list_live_sessions(db, user_id=p.user_id, limit=page_size + 1, after=after)
        return paging.page(rows, page_size, lambda s: (s.created_at, s.id))

    async def revoke_session(self, p: Principal, session_id: uuid.UUID) -> None:
        async with self._db.transaction(p.user_id, p.session_id) as db:
            if not await repo.session_exists(db, user_id=p.user_id, session_id=session_id):
                raise errors.NotFound("session", str(session_id))
            await repo.revoke_session(db, user_id=p.user_id, session_id=session_id, reason="revoked_by_user")

    async def _check_password(self, p: Principal, password: str, field: str) -> User:
        user = await self.current_user(p)
        if not password:
            raise errors.InvalidArgument(field, "is required")
        if not await self._passwords.verify(user.password_hash, password[:1024]):
            raise errors.PermissionDenied("the password is wrong", reason="INVALID_CREDENTIALS")
        return user

    async def change_password(self, p: Principal, *, current_password: str, new_password: str) -> None:
        user = await self._check_password(p, current_password, "current_password")
        check_policy(new_password, email=user.email, field="new_password")
        if new_password == current_password:
            raise errors.InvalidArgument("new_password", "must differ from the current password")
        new_hash = await self._passwords.hash(new_password)
        async with self._db.transaction(p.user_id, p.session_id) as db:
            await repo.set_password_hash(db, p.user_id, new_hash)
            await repo.revoke_other_sessions(
                db, user_id=p.user_id, keep=p.session_id, reason="password_changed"
            )

    async def delete_account(self, p: Principal, *, password: str) -> None:
        await self._check_password(p, password, "password")
        async with self._db.transaction(p.user_id, p.session_id) as db:
            # Every user-owned table references users with ON DELETE CASCADE.
            await repo.delete_user(db, p.user_id)
            await self._limits.forget_user(db, p.user_id)
