"""Preferences protos ↔ the stored JSON document, and the field mask of an update.

The document's keys are the proto field names; values are their proto-JSON forms (the theme as its
enum value name, client_settings as a JSON object). A field at its default has no key.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from google.protobuf import struct_pb2

from everything.preferences.v1 import preferences_pb2
from everything_server.config import Settings
from everything_server.errors import InvalidArgument
from everything_server.preferences import effective
from everything_server.preferences.repository import StoredPreferences
from everything_server.rpc.convert import ts

# The fields an update mask may name, in proto order. update_time is output only.
FIELDS = (
    "chat_model",
    "system_prompt",
    "temperature",
    "image_model",
    "image_size",
    "search_providers",
    "theme",
    "locale",
    "client_settings",
)
MAX_CLIENT_SETTINGS_BYTES = 64 * 1024
MAX_CLIENT_SETTINGS_DEPTH = 16
_MASK = "update_mask"
_CLIENT_SETTINGS = "preferences.client_settings"


class _TooBig(Exception):
    pass


# -- update mask --------------------------------------------------------------------------------


def mask_paths(request) -> list[str]:
    """The fields named by the request's update mask, each once, in proto order."""
    paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
    if not paths:
        raise InvalidArgument(_MASK, "is required: name the fields to change (for example 'temperature')")
    named: set[str] = set()
    for path in paths:
        if path == "*":
            raise InvalidArgument(_MASK, "'*' is not accepted: name the fields to change")
        if path not in FIELDS:
            shown = path if len(path) <= 64 else path[:64] + "..."
            raise InvalidArgument(_MASK, f"unknown field {shown!r}; known fields: {', '.join(FIELDS)}")
        named.add(path)
    return [f for f in FIELDS if f in named]


def patch_from_proto(prefs: preferences_pb2.Preferences, paths: list[str]) -> dict[str, Any]:
    """The new value of each masked field, as the service validates it. None means "back to default"."""
    patch: dict[str, Any] = {}
    for name in paths:
        if name == "temperature":
            patch[name] = prefs.temperature if prefs.HasField("temperature") else None
        elif name == "search_providers":
            patch[name] = list(prefs.search_providers) or None
        elif name == "theme":
            patch[name] = prefs.theme or None
        elif name == "client_settings":
            patch[name] = (
                struct_to_json(prefs.client_settings)
                if prefs.HasField("client_settings") and len(prefs.client_settings.fields)
                else None
            )
        else:
            patch[name] = getattr(prefs, name) or None
    return patch


# -- client_settings (free-form JSON) -------------------------------------------------------------


def struct_to_json(
    struct: struct_pb2.Struct,
    *,
    max_depth: int = MAX_CLIENT_SETTINGS_DEPTH,
    max_bytes: int = MAX_CLIENT_SETTINGS_BYTES,
) -> dict:
    """A Struct as plain JSON data, refusing anything nested deeper than `max_depth` or larger than
    `max_bytes` as JSON.

    The walk is iterative (no recursion, so no stack to blow) and keeps a running count of the compact
    JSON size (exact per value, at most one byte over per container), so an oversized document is
    refused after reading about `max_bytes` worth of it, whatever the size of the message. NaN and infinities have no JSON form, and PostgreSQL
    cannot store NUL characters in JSONB: both are refused too.
    """
    out: dict = {}
    budget = [max_bytes]

    def spend(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise _TooBig

    # (message, container to fill, depth of the container)
    stack: list[tuple[Any, Any, int]] = [(struct, out, 1)]
    try:
        spend(2)
        while stack:
            msg, target, depth = stack.pop()
            if isinstance(msg, struct_pb2.Struct):
                for key, value in msg.fields.items():
                    if "\x00" in key:
                        raise InvalidArgument(_CLIENT_SETTINGS, "keys must not contain NUL characters")
                    spend(len(orjson.dumps(key)) + 2)  # "key": and a comma
                    target[key] = _value(value, depth, max_depth, stack, spend)
            else:  # ListValue
                for value in msg.values:
                    spend(1)
                    target.append(_value(value, depth, max_depth, stack, spend))
    except _TooBig:
        raise InvalidArgument(_CLIENT_SETTINGS, f"must be at most {max_bytes // 1024} KiB as JSON") from None
    return out


def _value(value: struct_pb2.Value, depth: int, max_depth: int, stack: list, spend) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        s = value.string_value
        if "\x00" in s:
            raise InvalidArgument(_CLIENT_SETTINGS, "strings must not contain NUL characters")
        spend(len(orjson.dumps(s)))
        return s
    if kind == "number_value":
        n = value.number_value
        if not math.isfinite(n):
            raise InvalidArgument(_CLIENT_SETTINGS, "numbers must be finite (JSON has no NaN or Infinity)")
        spend(len(orjson.dumps(n)))
        return n
    if kind == "bool_value":
        spend(5)
        return value.bool_value
    if kind in ("struct_value", "list_value"):
        if depth + 1 > max_depth:
            raise InvalidArgument(_CLIENT_SETTINGS, f"must be nested at most {max_depth} deep")
        spend(2)
        child: Any = {} if kind == "struct_value" else []
        stack.append((getattr(value, kind), child, depth + 1))
        return child
    spend(4)  # null_value, or a Value with nothing set (read as null)
    return None


# -- out ------------------------------------------------------------------------------------------


def to_proto(stored: StoredPreferences | None, settings: Settings) -> preferences_pb2.Preferences:
    """The user's preferences with every default filled in."""
    data = stored.data if stored is not None and isinstance(stored.data, dict) else {}
    eff = effective.resolve(data, settings)
    theme = data.get("theme")
    locale = data.get("locale")
    out = preferences_pb2.Preferences(
        chat_model=eff.chat_model,
        system_prompt=eff.system_prompt,
        temperature=eff.temperature,
        image_model=eff.image_model,
        image_size=eff.image_size,
        search_providers=list(eff.search_providers),
        theme=preferences_pb2.Theme.Value(theme)
        if theme in preferences_pb2.Theme.keys() and theme != "THEME_UNSPECIFIED"
        else preferences_pb2.Theme.Value(effective.DEFAULT_THEME),
        locale=locale if isinstance(locale, str) and locale else effective.DEFAULT_LOCALE,
    )
    client = data.get("client_settings")
    out.client_settings.SetInParent()
    if isinstance(client, dict):
        out.client_settings.update(client)
    if stored is not None and data:
        out.update_time.CopyFrom(ts(stored.updated_at))
    return out


def export(stored: StoredPreferences) -> dict:
    return {
        "settings": stored.data,
        "created_at": stored.created_at.isoformat(),
        "updated_at": stored.updated_at.isoformat(),
    }
