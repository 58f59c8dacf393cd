"""The settings chat, search and image generation use for a user: their preferences with the server
defaults filled in. Preferences are stored as one JSONB document per user whose keys are the proto
field names of everything.preferences.v1.Preferences."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from everything_server.config import Settings

DEFAULT_IMAGE_SIZE = "1024x1024"
DEFAULT_SEARCH_PROVIDERS = ("history",)


@dataclass(frozen=True)
class Effective:
    chat_model: str
    system_prompt: str
    temperature: float
    image_model: str
    image_size: str
    search_providers: tuple[str, ...]


def resolve(data: dict, settings: Settings) -> Effective:
    temperature = data.get("temperature")
    return Effective(
        chat_model=data.get("chat_model") or settings.chat_model,
        system_prompt=data.get("system_prompt") or settings.default_system_prompt,
        temperature=float(temperature) if temperature is not None else settings.default_temperature,
        image_model=data.get("image_model") or settings.image_model,
        image_size=data.get("image_size") or DEFAULT_IMAGE_SIZE,
        search_providers=tuple(data.get("search_providers") or DEFAULT_SEARCH_PROVIDERS),
    )


async def load(session: AsyncSession, user_id: uuid.UUID, settings: Settings) -> Effective:
    """Read in the caller's transaction (one indexed lookup)."""
    row = await session.execute(text("SELECT data FROM preferences WHERE user_id = :u"), {"u": user_id})
    data = row.scalar_one_or_none() or {}
    return resolve(data, settings)
