"""Argon2id password hashing, off the event loop, with the same cost for unknown accounts."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from everything_server.errors import FieldViolation, InvalidArgument

MIN_LENGTH = 10
MAX_LENGTH = 256
_COMMON = frozenset(
    {
        "password12",
        "password123",
        "1234567890",
        "qwertyuiop",
        "letmein123",
        "iloveyou12",
        "0123456789",
        "passw0rd123",
        "administrator",
        "welcome123",
        "password1234",
        "abcdefghij",
        "qwerty1234",
    }
)


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, parallelism: int):
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        # Verified against when the account does not exist, so both paths cost the same.
        self._dummy = self._hasher.hash("not a real password, only burns the same time")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        return await asyncio.to_thread(self._verify, stored_hash, password)

    def _verify(self, stored_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash or self._dummy, password) and stored_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True


def check_policy(password: str, *, email: str = "", field: str = "password") -> None:
    problems = []
    if len(password) < MIN_LENGTH:
        problems.append(f"must be at least {MIN_LENGTH} characters")
    elif len(password) > MAX_LENGTH:
        problems.append(f"must be at most {MAX_LENGTH} characters")
    elif len(set(password)) < 4:
        problems.append("must use at least 4 different characters")
    elif password.lower() in _COMMON:
        problems.append("is too common")
    elif email and password.strip().lower() == email.lower():
        problems.append("must not be the email address")
    if "\x00" in password:
        problems.append("must not contain NUL characters")
    if problems:
        raise InvalidArgument.many([FieldViolation(field, p) for p in problems], reason="WEAK_PASSWORD")
