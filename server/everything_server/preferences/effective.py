"""The settings chat, search and image generation use for a user: their preferences with the server
defaults filled in. Preferences are stored as one JSONB document per user whose keys are the proto
field names of everything.preferences.v1.Preferences (a key is absent while the field is at its default).

`resolve` trusts nothing it reads: a stored value of the wrong type or outside today's rules (written
by an older version, or by hand) falls back to the default instead of reaching the model upstream.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.config import Settings
from everything_server.db.database import driver_of

IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1024x1536", "1536x1024")
SEARCH_PROVIDERS = ("searxng", "brave", "tavily", "history")
DEFAULT_IMAGE_SIZE = "1024x1024"
DEFAULT_SEARCH_PROVIDERS = ("history",)
DEFAULT_THEME = "THEME_SYSTEM"
DEFAULT_LOCALE = "en"
MAX_MODEL_CHARS = 100
MAX_SYSTEM_PROMPT_CHARS = 8000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0


@dataclass(frozen=True)
class Effective:
    chat_model: str
    system_prompt: str
    temperature: float
    image_model: str
    image_size: str
    search_providers: tuple[str, ...]


def _text(value: object, max_len: int) -> str | None:
    if isinstance(value, str) and value and len(value) <= max_len:
        return value
    return None


def _temperature(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if not math.isfinite(value) or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        return None
    return value


def _providers(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    known = tuple(dict.fromkeys(p for p in value if isinstance(p, str) and p in SEARCH_PROVIDERS))
    return known or None


def resolve(data: dict, settings: Settings) -> Effective:
    if not isinstance(data, dict):
        data = {}
    temperature = _temperature(data.get("temperature"))
    size = data.get("image_size")
    return Effective(
        chat_model=_text(data.get("chat_model"), MAX_MODEL_CHARS) or settings.chat_model,
        system_prompt=_text(data.get("system_prompt"), MAX_SYSTEM_PROMPT_CHARS)
        or settings.default_system_prompt,
        temperature=temperature if temperature is not None else settings.default_temperature,
        image_model=_text(data.get("image_model"), MAX_MODEL_CHARS) or settings.image_model,
        image_size=size if size in IMAGE_SIZES else DEFAULT_IMAGE_SIZE,
        search_providers=_providers(data.get("search_providers")) or DEFAULT_SEARCH_PROVIDERS,
    )


def data_sql(user: str) -> str:
    """SQL for the stored preferences (`resolve` takes them) of user `user` (an SQL expression, a
    placeholder), so another statement can read them in the same round trip."""
    return f"SELECT data FROM preferences WHERE user_id = {user}"  # noqa: S608


_DATA = data_sql("$1")


async def load(db: AsyncSession | asyncpg.Connection, user_id: uuid.UUID, settings: Settings) -> Effective:
    """Read in the caller's transaction (one indexed lookup)."""
    data = await (await driver_of(db)).fetchval(_DATA, user_id)  # jsonb, decoded by the engine's codec
    return resolve(data or {}, settings)
