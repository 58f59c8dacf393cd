"""Boundary checks shared by every servicer. Each failure names the field."""

from __future__ import annotations

import uuid

from everything_server.errors import InvalidArgument


def parse_uuid(field: str, value: str, *, required: bool = True) -> uuid.UUID | None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    if len(value) > 64:
        raise InvalidArgument(field, "must be a UUID")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, "must be a UUID") from None


def text(field: str, value: str, *, max_len: int, min_len: int = 0, strip: bool = False) -> str:
    if strip:
        value = value.strip()
    if len(value) < min_len:
        raise InvalidArgument(
            field, "is required" if min_len == 1 else f"must be at least {min_len} characters"
        )
    if len(value) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def page_size(value: int, *, default: int = 50, maximum: int = 100, field: str = "page_size") -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value == 0:
        return default
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}")
    return value
