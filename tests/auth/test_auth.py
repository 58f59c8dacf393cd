"""Auth through real stubs against the in-process server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import grpc
import orjson

from everything.auth.v1 import auth_service_pb2 as pb
from tests.support import PASSWORD, expect_error, unique_email

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


async def test_sign_up_normalises_the_email_and_signs_in(auth_stub):
    local = uuid.uuid4().hex[:10]
    resp = await auth_stub.SignUp(
        pb.SignUpRequest(email=f"  Mixed.{local}@Example.COM ", password=PASSWORD, display_name="Ada")
    )
    assert resp.user.email == f"mixed.{local}@example.com"
    assert resp.user.display_name == "Ada"
    assert resp.tokens.token_type == "Bearer"
    assert resp.tokens.refresh_token.startswith("rt_")
    me = await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(resp.tokens.access_token))
    assert me.user.id == resp.user.id


async def test_sign_up_with_a_taken_email_is_already_exists(auth_stub, user):
    await expect_error(
        auth_stub.SignUp(pb.SignUpRequest(email=user.email.upper(), password=PASSWORD)),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_TAKEN",
    )


async def test_sign_up_rejects_bad_input_naming_the_field(auth_stub, db_conn):
    email = unique_email()
    for req, field, reason in [
        (pb.SignUpRequest(email="not-an-email", password=PASSWORD), "email", "INVALID_ARGUMENT"),
        (pb.SignUpRequest(email="", password=PASSWORD), "email", "INVALID_ARGUMENT"),
        (pb.SignUpRequest(email=email, password="short"), "password", "WEAK_PASSWORD"),
        (pb.SignUpRequest(email=email, password="aaaaaaaaaaaaaaa"), "password", "WEAK_PASSWORD"),
        (pb.SignUpRequest(email=email, password="x" * 300), "password", "WEAK_PASSWORD"),
        (pb.SignUpRequest(email=email, password=email), "password", "WEAK_PASSWORD"),
        (pb.SignUpRequest(email=email, password=PASSWORD, display_name="n" * 101), "display_name", None),
    ]:
        await expect_error(auth_stub.SignUp(req), INVALID, reason, field)
    # Nothing was written for the rejected requests.
    assert await db_conn.fetchval("SELECT count(*) FROM users WHERE email = $1", email) == 0


async def test_sign_in_returns_a_new_session(auth_stub, user):
    resp = await auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password))
    assert resp.user.id == user.id
    sessions = await auth_stub.ListSessions(
        pb.ListSessionsRequest(), metadata=bearer(resp.tokens.access_token)
    )
    assert len(sessions.sessions) == 2
    assert sum(s.current for s in sessions.sessions) == 1


async def test_wrong_password_and_unknown_email_get_the_same_answer_and_similar_timing(auth_stub, user):
    async def attempt(email: str) -> tuple[float, tuple]:
        start = time.perf_counter()
        d = await expect_error(
            auth_stub.SignIn(pb.SignInRequest(email=email, password="wrong password 123")),
            UNAUTH,
            "INVALID_CREDENTIALS",
        )
        return time.perf_counter() - start, (d.code, d.message, d.reason)

    wrong, unknown = [], []
    for _ in range(4):
        t1, a1 = await attempt(user.email)
        t2, a2 = await attempt(unique_email())
        assert a1 == a2
        wrong.append(t1)
        unknown.append(t2)
    # Without the dummy hash an unknown email would answer ~100x faster; allow generous noise.
    assert statistics.median(unknown) > 0.4 * statistics.median(wrong)


async def test_refresh_rotates_and_reuse_revokes_the_family(auth_stub, user):
    first = await auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=user.refresh_token))
    assert first.tokens.refresh_token != user.refresh_token
    await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(first.tokens.access_token))
    # The spent token again: the whole session goes.
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=user.refresh_token)),
        UNAUTH,
        "REFRESH_TOKEN_REUSED",
    )
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.tokens.refresh_token)),
        UNAUTH,
        "SESSION_REVOKED",
    )
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(first.tokens.access_token)),
        UNAUTH,
        "SESSION_REVOKED",
    )


async def test_concurrent_refreshes_with_one_token_let_only_one_through(auth_stub, user):
    results = await asyncio.gather(
        *[auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=user.refresh_token)) for _ in range(3)],
        return_exceptions=True,
    )
    assert sum(not isinstance(r, Exception) for r in results) <= 1
    assert any(isinstance(r, grpc.aio.AioRpcError) and r.code() == UNAUTH for r in results)


async def test_unknown_refresh_token_is_unauthenticated(auth_stub):
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token="rt_nope")), UNAUTH, "TOKEN_INVALID"
    )
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token="")), UNAUTH, "TOKEN_INVALID"
    )


async def test_sign_out_ends_the_session(auth_stub, user):
    await auth_stub.SignOut(pb.SignOutRequest(), metadata=user.md)
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md), UNAUTH, "SESSION_REVOKED"
    )
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=user.refresh_token)),
        UNAUTH,
        "SESSION_REVOKED",
    )


async def test_list_sessions_pages_with_opaque_tokens(auth_stub, user):
    for _ in range(2):
        await auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password))
    seen, token = [], ""
    for _ in range(5):
        page = await auth_stub.ListSessions(
            pb.ListSessionsRequest(page_size=1, page_token=token), metadata=user.md
        )
        seen += [s.id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 3 and len(set(seen)) == 3
    await expect_error(
        auth_stub.ListSessions(pb.ListSessionsRequest(page_token="garbage!"), metadata=user.md),
        INVALID,
        field="page_token",
    )
    await expect_error(
        auth_stub.ListSessions(pb.ListSessionsRequest(page_size=-1), metadata=user.md),
        INVALID,
        field="page_size",
    )
    await expect_error(
        auth_stub.ListSessions(pb.ListSessionsRequest(page_size=1000), metadata=user.md),
        INVALID,
        field="page_size",
    )


async def test_revoke_session_signs_that_device_out(auth_stub, user, other_user):
    second = await auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password))
    sessions = await auth_stub.ListSessions(pb.ListSessionsRequest(), metadata=user.md)
    other_id = next(s.id for s in sessions.sessions if not s.current)
    await auth_stub.RevokeSession(pb.RevokeSessionRequest(session_id=other_id), metadata=user.md)
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(second.tokens.access_token)),
        UNAUTH,
        "SESSION_REVOKED",
    )
    await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)
    # Another user's session id is not found; a malformed id is invalid.
    theirs = await auth_stub.ListSessions(pb.ListSessionsRequest(), metadata=other_user.md)
    await expect_error(
        auth_stub.RevokeSession(pb.RevokeSessionRequest(session_id=theirs.sessions[0].id), metadata=user.md),
        grpc.StatusCode.NOT_FOUND,
    )
    await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=other_user.md)
    await expect_error(
        auth_stub.RevokeSession(pb.RevokeSessionRequest(session_id="nope"), metadata=user.md),
        INVALID,
        field="session_id",
    )


async def test_change_password_revokes_every_other_session(auth_stub, user):
    other = await auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password))
    await expect_error(
        auth_stub.ChangePassword(
            pb.ChangePasswordRequest(
                current_password="wrong one 12345", new_password="a brand new passphrase"
            ),
            metadata=user.md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        auth_stub.ChangePassword(
            pb.ChangePasswordRequest(current_password=user.password, new_password="short"), metadata=user.md
        ),
        INVALID,
        "WEAK_PASSWORD",
        "new_password",
    )
    await auth_stub.ChangePassword(
        pb.ChangePasswordRequest(current_password=user.password, new_password="a brand new passphrase"),
        metadata=user.md,
    )
    await auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md)
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(other.tokens.access_token)),
        UNAUTH,
        "SESSION_REVOKED",
    )
    await expect_error(
        auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password)),
        UNAUTH,
        "INVALID_CREDENTIALS",
    )
    await auth_stub.SignIn(pb.SignInRequest(email=user.email, password="a brand new passphrase"))


async def test_delete_account_removes_the_user_and_every_session(auth_stub, user, db_conn):
    await expect_error(
        auth_stub.DeleteAccount(pb.DeleteAccountRequest(password="not the password"), metadata=user.md),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await auth_stub.DeleteAccount(pb.DeleteAccountRequest(password=user.password), metadata=user.md)
    await expect_error(
        auth_stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=user.md), UNAUTH, "SESSION_REVOKED"
    )
    await expect_error(
        auth_stub.SignIn(pb.SignInRequest(email=user.email, password=user.password)),
        UNAUTH,
        "INVALID_CREDENTIALS",
    )
    await expect_error(
        auth_stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=user.refresh_token)),
        UNAUTH,
        "TOKEN_INVALID",
    )
    uid = uuid.UUID(user.id)
    for table in ("users", "sessions", "refresh_tokens"):
        column = "id" if table == "users" else "user_id"
        assert await db_conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", uid) == 0


async def test_export_streams_one_json_document(auth_stub, user):
    chunks = [c async for c in auth_stub.ExportUserData(pb.ExportUserDataRequest(), metadata=user.md)]
    assert chunks[0].content_type == "application/json"
    doc = orjson.loads(b"".join(c.data for c in chunks))
    assert doc["format"] == "everything.export.v1"
    assert doc["user"]["email"] == user.email
    assert doc["user"]["id"] == user.id
    assert len(doc["sessions"]) == 1
    assert "password" not in orjson.dumps(doc).decode().lower()


async def test_password_hashes_are_argon2id_at_owasp_minimum(auth_stub, user, db_conn):
    stored = await db_conn.fetchval("SELECT password_hash FROM users WHERE id = $1", uuid.UUID(user.id))
    assert stored.startswith("$argon2id$")
    params = dict(p.split("=") for p in stored.split("$")[3].split(","))
    assert int(params["m"]) >= 19 * 1024 and int(params["t"]) >= 2 and int(params["p"]) >= 1
    assert user.password not in stored
