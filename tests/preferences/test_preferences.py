"""PreferencesService through real stubs: defaults, masked updates, validation, concurrency, export."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import grpc
import orjson
from google.protobuf import field_mask_pb2, struct_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.preferences.v1 import preferences_pb2 as prefs_pb
from everything.preferences.v1 import preferences_service_pb2 as pb
from everything_server.preferences import effective
from tests.support import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def update(prefs: prefs_pb.Preferences | None, *paths: str) -> pb.UpdatePreferencesRequest:
    return pb.UpdatePreferencesRequest(
        preferences=prefs or prefs_pb.Preferences(), update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


def nested(depth: int) -> struct_pb2.Struct:
    """A Struct `depth` objects deep: {"a": {"a": ... {"leaf": true}}}."""
    root = struct_pb2.Struct()
    cur = root
    for _ in range(depth - 1):
        cur = cur.fields["a"].struct_value
    cur.fields["leaf"].bool_value = True
    return root


async def stored_row(db_conn, user) -> dict | None:
    raw = await db_conn.fetchval("SELECT data FROM preferences WHERE user_id = $1", uuid.UUID(user.id))
    return None if raw is None else orjson.loads(raw)


async def test_new_user_gets_server_defaults_and_no_update_time(preferences_stub, user, settings):
    got = (await preferences_stub.GetPreferences(pb.GetPreferencesRequest(), metadata=user.md)).preferences
    assert got.chat_model == settings.chat_model
    assert got.system_prompt == settings.default_system_prompt
    assert got.HasField("temperature") and got.temperature == settings.default_temperature
    assert got.image_model == settings.image_model
    assert got.image_size == "1024x1024"
    assert list(got.search_providers) == ["history"]
    assert got.theme == prefs_pb.THEME_SYSTEM
    assert got.locale == "en"
    assert not got.HasField("update_time")


async def test_update_changes_only_the_fields_in_the_mask(preferences_stub, user, settings, db_conn):
    prefs = prefs_pb.Preferences(temperature=1.3, chat_model="not-in-the-mask", locale="de-CH")
    got = (
        await preferences_stub.UpdatePreferences(update(prefs, "temperature", "locale"), metadata=user.md)
    ).preferences
    assert got.temperature == 1.3
    assert got.locale == "de-CH"
    assert got.chat_model == settings.chat_model
    assert got.HasField("update_time")
    again = (await preferences_stub.GetPreferences(pb.GetPreferencesRequest(), metadata=user.md)).preferences
    assert again == got
    assert await stored_row(db_conn, user) == {"temperature": 1.3, "locale": "de-CH"}


async def test_a_masked_field_left_empty_goes_back_to_its_default(preferences_stub, user, settings, db_conn):
    prefs = prefs_pb.Preferences(
        system_prompt="Answer like a pirate.",
        theme=prefs_pb.THEME_DARK,
        search_providers=["searxng", "history"],
    )
    await preferences_stub.UpdatePreferences(
        update(prefs, "system_prompt", "theme", "search_providers"), metadata=user.md
    )
    got = (
        await preferences_stub.UpdatePreferences(update(None, "system_prompt", "theme"), metadata=user.md)
    ).preferences
    assert got.system_prompt == settings.default_system_prompt
    assert got.theme == prefs_pb.THEME_SYSTEM
    assert list(got.search_providers) == ["searxng", "history"]
    assert await stored_row(db_conn, user) == {"search_providers": ["searxng", "history"]}


async def test_concurrent_updates_of_different_fields_all_survive(preferences_stub, user, db_conn):
    for round_ in range(3):
        values = {
            "chat_model": prefs_pb.Preferences(chat_model=f"model-{round_}"),
            "image_model": prefs_pb.Preferences(image_model=f"image-{round_}"),
            "temperature": prefs_pb.Preferences(temperature=0.1 + round_ / 10),
            "system_prompt": prefs_pb.Preferences(system_prompt=f"prompt {round_}"),
            "locale": prefs_pb.Preferences(locale=["en-GB", "fr", "pt-BR"][round_]),
            "image_size": prefs_pb.Preferences(image_size=["256x256", "512x512", "1536x1024"][round_]),
            "theme": prefs_pb.Preferences(
                theme=[prefs_pb.THEME_DARK, prefs_pb.THEME_LIGHT, prefs_pb.THEME_DARK][round_]
            ),
            "search_providers": prefs_pb.Preferences(
                search_providers=[["brave"], ["tavily"], ["searxng"]][round_]
            ),
        }
        await asyncio.gather(
            *(preferences_stub.UpdatePreferences(update(v, k), metadata=user.md) for k, v in values.items())
        )
        got = (
            await preferences_stub.GetPreferences(pb.GetPreferencesRequest(), metadata=user.md)
        ).preferences
        for name, value in values.items():
            assert getattr(got, name) == getattr(value, name), name
    assert (
        await db_conn.fetchval("SELECT count(*) FROM preferences WHERE user_id = $1", uuid.UUID(user.id)) == 1
    )


async def test_bad_update_masks_are_refused_and_nothing_is_written(preferences_stub, user, db_conn):
    prefs = prefs_pb.Preferences(temperature=1.0)
    for request in [
        pb.UpdatePreferencesRequest(preferences=prefs),
        update(prefs),
        update(prefs, "*"),
        update(prefs, "temperature", "favourite_colour"),
        update(prefs, "update_time"),
        update(prefs, "client_settings.theme"),
    ]:
        await expect_error(
            preferences_stub.UpdatePreferences(request, metadata=user.md),
            INVALID,
            "INVALID_ARGUMENT",
            "update_mask",
        )
    assert await stored_row(db_conn, user) is None


async def test_bad_values_are_refused_naming_the_field_and_nothing_is_written(
    preferences_stub, user, db_conn
):
    big = struct_pb2.Struct()
    big.update({f"key-{i}": "v" * 100 for i in range(700)})  # about 75 KiB as JSON
    nul = struct_pb2.Struct()
    nul.update({"a": "nul\x00byte"})
    nan = struct_pb2.Struct()
    nan.update({"n": math.nan})
    cases = [
        (prefs_pb.Preferences(temperature=2.01), "temperature"),
        (prefs_pb.Preferences(temperature=-0.1), "temperature"),
        (prefs_pb.Preferences(temperature=math.nan), "temperature"),
        (prefs_pb.Preferences(temperature=math.inf), "temperature"),
        (prefs_pb.Preferences(image_size="300x300"), "image_size"),
        (prefs_pb.Preferences(image_size="1024X1024"), "image_size"),
        (prefs_pb.Preferences(system_prompt="x" * 8001), "system_prompt"),
        (prefs_pb.Preferences(system_prompt="nul\x00"), "system_prompt"),
        (prefs_pb.Preferences(chat_model="m" * 101), "chat_model"),
        (prefs_pb.Preferences(chat_model="gpt\n4o"), "chat_model"),
        (prefs_pb.Preferences(image_model="bell\x07"), "image_model"),
        (prefs_pb.Preferences(search_providers=["google"]), "search_providers"),
        (prefs_pb.Preferences(search_providers=["history", "history"]), "search_providers"),
        (prefs_pb.Preferences(locale="english please"), "locale"),
        (prefs_pb.Preferences(locale="en_GB"), "locale"),
        (prefs_pb.Preferences(locale="e"), "locale"),
        (prefs_pb.Preferences(locale="en-" + "abcdefgh-" * 4), "locale"),
        (prefs_pb.Preferences(theme=9), "theme"),
        (prefs_pb.Preferences(client_settings=big), "client_settings"),
        (prefs_pb.Preferences(client_settings=nested(17)), "client_settings"),
        (prefs_pb.Preferences(client_settings=nested(30)), "client_settings"),
        (prefs_pb.Preferences(client_settings=nul), "client_settings"),
        (prefs_pb.Preferences(client_settings=nan), "client_settings"),
    ]
    for prefs, name in cases:
        await expect_error(
            preferences_stub.UpdatePreferences(update(prefs, name), metadata=user.md),
            INVALID,
            "INVALID_ARGUMENT",
            f"preferences.{name}",
        )
    assert await stored_row(db_conn, user) is None


async def test_every_bad_field_is_named_at_once(preferences_stub, user):
    prefs = prefs_pb.Preferences(temperature=5, image_size="1x1", chat_model="fine")
    d = await expect_error(
        preferences_stub.UpdatePreferences(
            update(prefs, "temperature", "image_size", "chat_model"), metadata=user.md
        ),
        INVALID,
    )
    assert set(d.fields) == {"preferences.temperature", "preferences.image_size"}


async def test_client_settings_round_trip_up_to_the_depth_limit(preferences_stub, user, db_conn):
    settings = struct_pb2.Struct()
    settings.update(
        {"sidebar": {"open": True, "width": 280}, "pinned": ["a", "b", 3], "note": 'quote " and \\'}
    )
    settings.fields["deep"].struct_value.CopyFrom(nested(15))  # 16 deep with the top level
    got = (
        await preferences_stub.UpdatePreferences(
            update(prefs_pb.Preferences(client_settings=settings), "client_settings"), metadata=user.md
        )
    ).preferences
    assert got.client_settings == settings
    again = (await preferences_stub.GetPreferences(pb.GetPreferencesRequest(), metadata=user.md)).preferences
    assert again.client_settings == settings
    assert (await stored_row(db_conn, user))["client_settings"]["sidebar"] == {"open": True, "width": 280}


async def test_json_bombs_are_refused_quickly(preferences_stub, user):
    # A message near the 4 MiB limit made of tiny values, and the deepest Struct protobuf will parse:
    # both are refused after reading about 64 KiB of them.
    wide = struct_pb2.Struct()
    wide.fields["l"].list_value.values.extend([struct_pb2.Value(bool_value=True)] * 600_000)
    for bomb in (wide, nested(31)):
        start = time.perf_counter()
        await expect_error(
            preferences_stub.UpdatePreferences(
                update(prefs_pb.Preferences(client_settings=bomb), "client_settings"), metadata=user.md
            ),
            INVALID,
            field="preferences.client_settings",
        )
        assert time.perf_counter() - start < 5


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_client_settings_too_deep_to_parse_are_invalid_argument(channel, user):
    # Deeper than protobuf's own parser accepts: the request cannot even be decoded. Built by hand,
    # since the client library refuses to build it too.
    struct = _field(1, _field(1, b"leaf") + _field(2, b"\x20\x01"))  # {"leaf": true}
    for _ in range(200):
        struct = _field(1, _field(1, b"a") + _field(2, _field(5, struct)))  # {"a": <struct>}
    body = _field(1, _field(9, struct)) + _field(2, _field(1, b"client_settings"))
    call = channel.unary_unary(
        "/everything.preferences.v1.PreferencesService/UpdatePreferences",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.UpdatePreferencesResponse.FromString,
    )
    d = await expect_error(call(body, metadata=user.md), INVALID)
    assert d.code != grpc.StatusCode.INTERNAL


async def test_effective_settings_follow_the_users_chat_preferences(preferences_stub, user, app, settings):
    prefs = prefs_pb.Preferences(chat_model="gpt-4.1-mini", system_prompt="Be terse.", temperature=0.0)
    await preferences_stub.UpdatePreferences(
        update(prefs, "chat_model", "system_prompt", "temperature"), metadata=user.md
    )
    async with app.container.db.transaction(uuid.UUID(user.id)) as session:
        eff = await effective.load(session, uuid.UUID(user.id), settings)
    assert (eff.chat_model, eff.system_prompt, eff.temperature) == ("gpt-4.1-mini", "Be terse.", 0.0)
    assert eff.image_model == settings.image_model


async def test_stored_values_that_break_todays_rules_fall_back_to_defaults(settings):
    data = {
        "temperature": "hot",
        "image_size": "9x9",
        "search_providers": ["google", "brave"],
        "chat_model": 7,
    }
    eff = effective.resolve(data, settings)
    assert eff.temperature == settings.default_temperature
    assert eff.image_size == "1024x1024"
    assert eff.search_providers == ("brave",)
    assert eff.chat_model == settings.chat_model


async def test_export_includes_the_stored_preferences(preferences_stub, auth_stub, user):
    await preferences_stub.UpdatePreferences(
        update(prefs_pb.Preferences(locale="fr"), "locale"), metadata=user.md
    )
    chunks = [
        c.data async for c in auth_stub.ExportUserData(auth_pb.ExportUserDataRequest(), metadata=user.md)
    ]
    doc = orjson.loads(b"".join(chunks))
    assert doc["preferences"][0]["settings"] == {"locale": "fr"}


async def test_preferences_need_a_signed_in_caller(preferences_stub):
    await expect_error(
        preferences_stub.GetPreferences(pb.GetPreferencesRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
