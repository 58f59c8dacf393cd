"""Preferences rules: what each field accepts, and partial updates that never lose a concurrent one.

Every named field is checked before anything is written; all violations are reported together, each
as "preferences.<field>". A field set to its proto default (empty text, unset temperature, empty
list, THEME_UNSPECIFIED, empty client_settings) goes back to the server default: its key is removed.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

from everything.preferences.v1 import preferences_pb2
from everything_server import errors
from everything_server.db import Database
from everything_server.errors import FieldViolation
from everything_server.preferences import effective
from everything_server.preferences import repository as repo
from everything_server.preferences.repository import StoredPreferences
from everything_server.rpc.context import Principal

MAX_LOCALE_CHARS = 35
# BCP 47 in the shape clients send: a 2-3 letter language, then subtags of 1-8 letters or digits
# ("en", "en-GB", "zh-Hant-TW", "de-CH-1996"). Not a registry check: the client renders it.
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")


def _has_control(value: str) -> bool:
    return any(unicodedata.category(ch).startswith("C") for ch in value)


def _model(value: str) -> tuple[str | None, str | None]:
    value = value.strip()
    if len(value) > effective.MAX_MODEL_CHARS:
        return None, f"must be at most {effective.MAX_MODEL_CHARS} characters"
    if _has_control(value):
        return None, "must not contain control characters"
    return value or None, None


def _check(name: str, value: Any) -> tuple[Any, str | None]:
    """(the value to store, or None for the default; a violation or None)."""
    if value is None:
        return None, None
    if name in ("chat_model", "image_model"):
        return _model(value)
    if name == "system_prompt":
        if len(value) > effective.MAX_SYSTEM_PROMPT_CHARS:
            return None, f"must be at most {effective.MAX_SYSTEM_PROMPT_CHARS} characters"
        if "\x00" in value:
            return None, "must not contain NUL characters"
        return value, None
    if name == "temperature":
        lo, hi = effective.MIN_TEMPERATURE, effective.MAX_TEMPERATURE
        if not math.isfinite(value) or not lo <= value <= hi:
            return None, f"must be between {lo:g} and {hi:g}"
        return float(value), None
    if name == "image_size":
        if value not in effective.IMAGE_SIZES:
            return None, f"must be one of {', '.join(effective.IMAGE_SIZES)}"
        return value, None
    if name == "search_providers":
        unknown = [p for p in value if p not in effective.SEARCH_PROVIDERS]
        if unknown:
            shown = unknown[0] if len(unknown[0]) <= 32 else unknown[0][:32] + "..."
            return None, f"unknown provider {shown!r}; use {', '.join(effective.SEARCH_PROVIDERS)}"
        if len(set(value)) != len(value):
            return None, "must not name a provider twice"
        return list(value), None
    if name == "theme":
        if value not in preferences_pb2.Theme.values():
            return None, "is not a Theme value"
        return preferences_pb2.Theme.Name(value), None
    if name == "locale":
        if len(value) > MAX_LOCALE_CHARS or not _LOCALE.match(value):
            return None, "must be a BCP 47 language tag such as 'en' or 'en-GB'"
        return value, None
    if name == "client_settings":
        return value, None  # already bounded and converted at the boundary (convert.struct_to_json)
    raise AssertionError(f"unhandled preference {name}")


def validate(patch: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(values to set, keys to clear) or InvalidArgument naming every bad field."""
    set_values: dict[str, Any] = {}
    clear: list[str] = []
    violations: list[FieldViolation] = []
    for name, raw in patch.items():
        value, problem = _check(name, raw)
        if problem is not None:
            violations.append(FieldViolation(f"preferences.{name}", problem))
        elif value is None:
            clear.append(name)
        else:
            set_values[name] = value
    if violations:
        raise errors.InvalidArgument.many(violations)
    return set_values, clear


class PreferencesService:
    def __init__(self, db: Database):
        self._db = db

    async def get(self, p: Principal) -> StoredPreferences | None:
        async with self._db.driver_transaction(p.user_id, p.session_id) as db:
            return await repo.get(db, p.user_id)

    async def update(self, p: Principal, patch: dict[str, Any]) -> StoredPreferences:
        set_values, clear = validate(patch)
        async with self._db.driver_transaction(p.user_id, p.session_id) as db:
            return await repo.patch(db, p.user_id, set_values=set_values, clear=clear)

    async def export(self, p: Principal) -> AsyncIterator[StoredPreferences]:
        stored = await self.get(p)
        if stored is not None:
            yield stored
