"""The async client against the real in-process server (real PostgreSQL, real tokens)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import jwt
import orjson
import pytest

from everything.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    Tokens,
    UnauthenticatedError,
)
from tests.support import PASSWORD, unique_email


@pytest.fixture
def target(app) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture
async def client(target):
    rotations: list[Tokens | None] = []
    async with Client(target, on_tokens=rotations.append, timeout=20) as c:
        c.rotations = rotations  # type: ignore[attr-defined]
        yield c


def expired_access_token(app, access_token: str) -> str:
    """An access token of the same session, issued an hour ago (so expired), by the server's own key."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    token, _ = app.container.tokens.issue_access(
        uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"]), now=datetime.now(UTC) - timedelta(hours=1)
    )
    return token


async def test_async_client_signs_up_reads_the_user_lists_sessions_and_exports(client):
    email = unique_email()
    signed = await client.auth.sign_up(email, PASSWORD, display_name="Ada")
    assert client.tokens is not None and client.tokens.access_token == signed.tokens.access_token
    assert client.rotations == [client.tokens]
    assert client.tokens.access_expires_at is not None and client.tokens.access_expires_at > datetime.now(UTC)

    me = await client.auth.get_current_user()
    assert (me.user.email, me.user.display_name) == (email, "Ada")

    sessions = await client.auth.list_sessions()
    assert [s.current for s in sessions.sessions] == [True]
    assert "everything-python-client" in sessions.sessions[0].user_agent

    chunks = [chunk async for chunk in client.auth.export_user_data()]
    assert chunks[0].content_type == "application/json"
    document = orjson.loads(b"".join(c.data for c in chunks))
    assert document["user"]["email"] == email


async def test_async_client_refreshes_an_expired_access_token_and_reports_the_rotation(app, target, client):
    signed = await client.auth.sign_up(unique_email(), PASSWORD)
    old_refresh = signed.tokens.refresh_token
    rotations: list[Tokens | None] = []
    stale = Tokens(expired_access_token(app, signed.tokens.access_token), old_refresh)

    async with Client(target, tokens=stale, on_tokens=rotations.append) as c:
        me = await c.auth.get_current_user()  # TOKEN_EXPIRED -> RefreshToken -> retry
        assert me.user.id == signed.user.id
        assert len(rotations) == 1 and rotations[0] is not None
        assert rotations[0].refresh_token not in ("", old_refresh), "the rotated refresh token is handed over"
        assert c.tokens == rotations[0]

        # The old refresh token is spent: presenting it again revokes the session, as promised.
        async with Client(target, tokens=Tokens("", old_refresh)) as thief:
            with pytest.raises(UnauthenticatedError) as info:
                await thief.auth.refresh_token()
            assert info.value.reason == "REFRESH_TOKEN_REUSED"
        with pytest.raises(UnauthenticatedError) as info:
            await c.auth.get_current_user()
        assert info.value.reason == "SESSION_REVOKED"


async def test_async_stream_is_refreshed_before_it_starts(app, target, client):
    signed = await client.auth.sign_up(unique_email(), PASSWORD)
    expired_at = datetime.now(UTC) - timedelta(minutes=1)
    stale = Tokens(
        expired_access_token(app, signed.tokens.access_token), signed.tokens.refresh_token, expired_at
    )
    rotations: list[Tokens | None] = []
    async with Client(target, tokens=stale, on_tokens=rotations.append) as c:
        chunks = await c.auth.export_user_data().collect()
        assert orjson.loads(b"".join(x.data for x in chunks))["user"]["id"] == signed.user.id
        assert len(rotations) == 1


async def test_async_client_raises_status_details_as_exceptions(client):
    with pytest.raises(InvalidArgumentError) as info:
        await client.auth.sign_up(unique_email(), "short")
    err = info.value
    assert err.reason == "WEAK_PASSWORD"
    assert "password" in err.fields
    assert err.request_id

    await client.auth.sign_up(unique_email(), PASSWORD)
    with pytest.raises(NotFoundError) as nf:
        await client.image.get_image(str(uuid.uuid4()))
    assert nf.value.reason == "NOT_FOUND"


async def test_async_client_without_tokens_is_unauthenticated(target):
    async with Client(target) as c:
        with pytest.raises(UnauthenticatedError) as info:
            await c.auth.get_current_user()
        assert info.value.reason == "TOKEN_MISSING"


async def test_async_sign_out_drops_the_tokens_and_tells_the_hook(client):
    await client.auth.sign_up(unique_email(), PASSWORD)
    await client.auth.sign_out()
    assert client.tokens is None
    assert client.rotations[-1] is None
