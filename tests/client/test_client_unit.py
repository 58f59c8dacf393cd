"""Client behaviour that needs no server, with grpcio-testing's test channel.

The SyncClient runs in a worker thread; the test plays the server on the channel: it takes each
call the client makes, checks the request and metadata, and answers (or fails) it. Every wait is
bounded, so a client that makes the wrong call fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from everything.auth.v1 import auth_pb2, auth_service_pb2
from everything.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from everything.client import (
    Client,
    EverythingError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SyncClient,
    Tokens,
    UnauthenticatedError,
    UnavailableError,
    _core,
    cli,
)
from everything.client.store import CredentialsFile

AUTH = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"]
CHAT = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"]
WAIT = 5.0


class Background:
    """Run `fn` in a daemon thread; `result()` waits for it, bounded."""

    def __init__(self, fn: Callable[[], Any]):
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            self._out["error"] = exc

    def done(self, timeout: float = WAIT) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float = WAIT) -> Any:
        assert self.done(timeout), f"no result within {timeout}s"
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


def bounded(fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    return Background(fn).result(timeout)


def take_unary(channel, method: str, service=AUTH):
    desc = service.methods_by_name[method]
    return bounded(lambda: channel.take_unary_unary(desc))


def take_stream(channel, method: str, service=CHAT):
    desc = service.methods_by_name[method]
    return bounded(lambda: channel.take_unary_stream(desc))


def pack(msg) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def failure(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    fields: dict[str, str] | None = None,
    retry_after: float | None = None,
    quota: dict[str, str] | None = None,
    request_id: str = "rid-123",
):
    """(trailing metadata, code, details) of a status the way the server builds it."""
    details = [
        pack(
            error_details_pb2.ErrorInfo(
                reason=reason, domain="everything", metadata={"request_id": request_id}
            )
        )
    ]
    if fields:
        details.append(
            pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in fields.items()
                    ]
                )
            )
        )
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if quota:
        details.append(
            pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in quota.items()
                    ]
                )
            )
        )
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))
    return status.trailing_metadata + (("x-request-id", request_id),), code, message


def tokens_pb(access: str, refresh: str) -> auth_pb2.Tokens:
    t = auth_pb2.Tokens(access_token=access, refresh_token=refresh, token_type="Bearer")
    t.access_token_expire_time.FromDatetime(datetime.now(UTC) + timedelta(minutes=15))
    return t


def bearer(metadata) -> str | None:
    values = [v for k, v in metadata if k == "authorization"]
    return values[0] if values else None


@pytest.fixture
def channel():
    return grpc_testing.channel([AUTH, CHAT], grpc_testing.strict_real_time())


@pytest.fixture
def rotations() -> list[Tokens | None]:
    return []


@pytest.fixture
def client(channel, rotations) -> SyncClient:
    return SyncClient(
        channel=channel, tokens=Tokens("access-1", "refresh-1"), on_tokens=rotations.append, timeout=WAIT
    )


def test_expired_access_token_is_refreshed_once_and_the_call_retried(channel, client, rotations):
    call = Background(client.auth.get_current_user)

    md, _, rpc = take_unary(channel, "GetCurrentUser")
    assert bearer(md) == "Bearer access-1"
    rpc.terminate(
        None, *failure(grpc.StatusCode.UNAUTHENTICATED, "the access token has expired", "TOKEN_EXPIRED")
    )

    md, request, rpc = take_unary(channel, "RefreshToken")
    assert request.refresh_token == "refresh-1"
    assert bearer(md) is None, "RefreshToken is public: no access token is sent"
    rpc.terminate(
        auth_service_pb2.RefreshTokenResponse(tokens=tokens_pb("access-2", "refresh-2")),
        (),
        grpc.StatusCode.OK,
        "",
    )

    md, _, rpc = take_unary(channel, "GetCurrentUser")
    assert bearer(md) == "Bearer access-2"
    user = auth_pb2.User(id="u1", email="ada@example.com")
    rpc.terminate(auth_service_pb2.GetCurrentUserResponse(user=user), (), grpc.StatusCode.OK, "")

    assert call.result().user.email == "ada@example.com"
    assert client.tokens is not None and client.tokens.refresh_token == "refresh-2"
    assert [t.refresh_token for t in rotations if t] == ["refresh-2"], "the hook saw the rotated token once"
    assert rotations[0].access_expires_at is not None


def test_a_call_that_still_fails_after_the_refresh_is_not_retried_again(channel, client):
    call = Background(client.auth.get_current_user)
    _, _, rpc = take_unary(channel, "GetCurrentUser")
    rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "expired", "TOKEN_EXPIRED"))
    _, _, rpc = take_unary(channel, "RefreshToken")
    rpc.terminate(
        auth_service_pb2.RefreshTokenResponse(tokens=tokens_pb("access-2", "refresh-2")),
        (),
        grpc.StatusCode.OK,
        "",
    )
    _, _, rpc = take_unary(channel, "GetCurrentUser")
    rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "expired", "TOKEN_EXPIRED"))

    with pytest.raises(UnauthenticatedError) as info:
        call.result()
    assert info.value.reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize("reason", ["SESSION_REVOKED", "TOKEN_INVALID", "TOKEN_MISSING"])
def test_other_unauthenticated_reasons_are_raised_without_a_refresh(channel, client, rotations, reason):
    call = Background(client.auth.get_current_user)
    _, _, rpc = take_unary(channel, "GetCurrentUser")
    rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "no", reason))
    with pytest.raises(UnauthenticatedError) as info:
        call.result()
    assert info.value.reason == reason
    assert rotations == []


def test_a_refused_refresh_drops_the_tokens_and_tells_the_hook(channel, client, rotations):
    call = Background(client.auth.get_current_user)
    _, _, rpc = take_unary(channel, "GetCurrentUser")
    rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "expired", "TOKEN_EXPIRED"))
    _, _, rpc = take_unary(channel, "RefreshToken")
    rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "reused", "REFRESH_TOKEN_REUSED"))

    with pytest.raises(UnauthenticatedError) as info:
        call.result()
    assert info.value.reason == "REFRESH_TOKEN_REUSED"
    assert client.tokens is None
    assert rotations == [None]


def test_concurrent_expired_calls_share_one_refresh(channel, client):
    # Refresh tokens are single-use: two refreshes with the same token would revoke the session.
    calls = [Background(client.auth.get_current_user) for _ in range(2)]
    for _ in calls:
        _, _, rpc = take_unary(channel, "GetCurrentUser")
        rpc.terminate(None, *failure(grpc.StatusCode.UNAUTHENTICATED, "expired", "TOKEN_EXPIRED"))

    _, request, rpc = take_unary(channel, "RefreshToken")
    assert request.refresh_token == "refresh-1"
    rpc.terminate(
        auth_service_pb2.RefreshTokenResponse(tokens=tokens_pb("access-2", "refresh-2")),
        (),
        grpc.StatusCode.OK,
        "",
    )

    # Both retries come next, with the new token; a second RefreshToken would block one of them.
    for _ in calls:
        md, _, rpc = take_unary(channel, "GetCurrentUser")
        assert bearer(md) == "Bearer access-2"
        rpc.terminate(auth_service_pb2.GetCurrentUserResponse(), (), grpc.StatusCode.OK, "")
    for c in calls:
        c.result()


def test_sign_in_keeps_the_tokens_and_sends_none(channel, rotations):
    client = SyncClient(channel=channel, on_tokens=rotations.append, timeout=WAIT)
    call = Background(lambda: client.auth.sign_in("ada@example.com", "pw"))
    md, request, rpc = take_unary(channel, "SignIn")
    assert bearer(md) is None
    assert request.email == "ada@example.com"
    rpc.terminate(auth_service_pb2.SignInResponse(tokens=tokens_pb("a", "r")), (), grpc.StatusCode.OK, "")
    call.result()
    assert client.tokens is not None and client.tokens.access_token == "a"
    assert [t.refresh_token for t in rotations if t] == ["r"]


@pytest.mark.parametrize(
    ("code", "reason", "kwargs", "cls"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "WEAK_PASSWORD",
            {"fields": {"password": "too short"}},
            InvalidArgumentError,
        ),
        (grpc.StatusCode.NOT_FOUND, "NOT_FOUND", {}, NotFoundError),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUOTA_EXCEEDED",
            {"retry_after": 2.5, "quota": {"user:u1": "daily"}},
            ResourceExhaustedError,
        ),
        (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"retry_after": 1}, UnavailableError),
        (grpc.StatusCode.FAILED_PRECONDITION, "GENERATION_NOT_ACTIVE", {}, FailedPreconditionError),
        (grpc.StatusCode.INTERNAL, "INTERNAL", {}, InternalError),
    ],
)
def test_status_details_become_the_matching_exception(channel, client, code, reason, kwargs, cls):
    call = Background(lambda: client.chat.get_thread("t1"))
    _, request, rpc = take_unary(channel, "GetThread", CHAT)
    assert request.thread_id == "t1"
    rpc.terminate(None, *failure(code, "it went wrong", reason, request_id="rid-9", **kwargs))

    with pytest.raises(cls) as info:
        call.result()
    err = info.value
    assert isinstance(err, EverythingError)
    assert (err.code, err.reason, err.message, err.request_id) == (code, reason, "it went wrong", "rid-9")
    assert err.fields == kwargs.get("fields", {})
    assert err.retry_after == kwargs.get("retry_after")
    assert {q.subject: q.description for q in err.quota_violations} == kwargs.get("quota", {})


def test_a_status_without_details_still_has_code_and_message(channel, client):
    call = Background(lambda: client.chat.get_thread("t1"))
    _, _, rpc = take_unary(channel, "GetThread", CHAT)
    rpc.terminate(None, (), grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
    with pytest.raises(EverythingError) as info:
        call.result()
    assert info.value.code is grpc.StatusCode.UNIMPLEMENTED
    assert info.value.reason is None and info.value.field_violations == []


def _started(message_id: str) -> chat_service_pb2.SendMessageResponse:
    ev = chat_service_pb2.SendMessageResponse(message_id=message_id, seq=1)
    ev.message_started.message.id = message_id
    return ev


def test_closing_a_stream_cancels_the_call(channel, client):
    received: list[Any] = []

    def consume():
        with client.chat.send_message("hello") as stream:
            for event in stream:
                received.append(event)
                return  # leave after the first event: the `with` closes the stream

    consumer = Background(consume)
    _, request, rpc = take_stream(channel, "SendMessage")
    assert request.content == "hello"
    assert request.client_message_id, "an idempotency key is generated"
    rpc.send_response(_started("m1"))

    bounded(rpc.cancelled)  # returns once the client cancelled; times out otherwise
    consumer.result()
    assert [e.message_id for e in received] == ["m1"]


def test_cancel_from_another_thread_ends_the_iteration(channel, client):
    stream = client.chat.watch_message("m1")
    consumer = Background(lambda: [e.seq for e in stream])
    _, request, rpc = take_stream(channel, "WatchMessage")
    assert request.message_id == "m1"
    rpc.send_response(chat_service_pb2.WatchMessageResponse(message_id="m1", seq=1))
    stream.cancel()
    bounded(rpc.cancelled)
    assert consumer.result() in ([], [1])  # ends quietly, no CANCELLED error


def test_a_stream_is_refreshed_before_it_starts_when_the_token_is_about_to_expire(channel, rotations):
    soon = datetime.now(UTC) + timedelta(seconds=5)
    client = SyncClient(
        channel=channel, tokens=Tokens("access-1", "refresh-1", soon), on_tokens=rotations.append
    )
    consumer = Background(lambda: [e.message_id for e in client.chat.watch_message("m1")])

    _, request, rpc = take_unary(channel, "RefreshToken")
    assert request.refresh_token == "refresh-1"
    rpc.terminate(
        auth_service_pb2.RefreshTokenResponse(tokens=tokens_pb("access-2", "refresh-2")),
        (),
        grpc.StatusCode.OK,
        "",
    )

    md, _, rpc = take_stream(channel, "WatchMessage")
    assert bearer(md) == "Bearer access-2"
    rpc.send_response(chat_service_pb2.WatchMessageResponse(message_id="m1", seq=1))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert consumer.result() == ["m1"]


def test_a_stream_refused_as_expired_before_its_first_event_is_reopened_after_a_refresh(channel, client):
    consumer = Background(
        lambda: [e.message_id for e in client.chat.send_message("hi", client_message_id="k1")]
    )

    md, request, rpc = take_stream(channel, "SendMessage")
    assert bearer(md) == "Bearer access-1"
    rpc.terminate(*failure(grpc.StatusCode.UNAUTHENTICATED, "expired", "TOKEN_EXPIRED"))
    _, _, rpc = take_unary(channel, "RefreshToken")
    rpc.terminate(
        auth_service_pb2.RefreshTokenResponse(tokens=tokens_pb("access-2", "refresh-2")),
        (),
        grpc.StatusCode.OK,
        "",
    )

    md, request, rpc = take_stream(channel, "SendMessage")
    assert bearer(md) == "Bearer access-2"
    assert request.client_message_id == "k1", "the retry is the same request"
    rpc.send_response(_started("m1"))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert consumer.result() == ["m1"]


def test_an_error_in_the_middle_of_a_stream_is_raised_with_its_details(channel, client):
    def consume():
        seen = []
        for event in client.chat.watch_message("m1"):
            seen.append(event.seq)
        return seen

    consumer = Background(consume)
    _, _, rpc = take_stream(channel, "WatchMessage")
    rpc.send_response(chat_service_pb2.WatchMessageResponse(message_id="m1", seq=1))
    rpc.terminate(*failure(grpc.StatusCode.UNAVAILABLE, "model down", "UPSTREAM_UNAVAILABLE", retry_after=3))
    with pytest.raises(UnavailableError) as info:
        consumer.result()
    assert info.value.reason == "UPSTREAM_UNAVAILABLE" and info.value.retry_after == 3


# -- pieces of the CLI that need no server ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.UNAUTHENTICATED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 5),
        (grpc.StatusCode.UNAVAILABLE, 5),
        (grpc.StatusCode.ALREADY_EXISTS, 1),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_cli_exit_codes_follow_the_status_code(code, exit_code):
    assert cli.exit_code(EverythingError(code, "x")) == exit_code


def test_cli_error_text_names_reason_field_retry_and_request_id():
    err = InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "password: too short",
        reason="WEAK_PASSWORD",
        field_violations=[],
        retry_after=None,
        request_id="rid-1",
    )
    err.field_violations.append(type("V", (), {"field": "password", "description": "too short"})())
    text = cli.describe(err, "localhost:50051")
    assert "password: too short" in text
    assert "reason WEAK_PASSWORD" in text
    assert "field password: too short" in text
    assert "request id: rid-1" in text


def test_cli_parses_preference_values_by_field_type():
    assert cli._pref_value("temperature", "0.3") == 0.3
    assert cli._pref_value("temperature", "") is None
    assert cli._pref_value("search_providers", "history, searxng") == ["history", "searxng"]
    assert cli._pref_value("theme", "dark") == "THEME_DARK"
    assert cli._pref_value("client_settings", '{"a": [1]}') == {"a": [1]}
    for key, bad in [("temperature", "warm"), ("theme", "purple"), ("client_settings", "[1]")]:
        with pytest.raises(cli.CliError) as info:
            cli._pref_value(key, bad)
        assert info.value.code == 2


def test_credentials_file_is_private_and_keyed_by_server(tmp_path):
    store = CredentialsFile(tmp_path / "cfg" / "credentials.json")
    store.save("a:1", Tokens("acc", "ref", datetime(2030, 1, 1, tzinfo=UTC)), "ada@example.com")
    store.save("b:2", Tokens("acc-b", "ref-b"))
    assert (store.path.stat().st_mode & 0o777) == 0o600
    tokens, email = store.load("a:1")
    assert tokens == Tokens("acc", "ref", datetime(2030, 1, 1, tzinfo=UTC)) and email == "ada@example.com"
    assert store.load("c:3") == (None, None)
    assert store.remove("a:1") and store.load("a:1") == (None, None)
    assert store.load("b:2")[0] == Tokens("acc-b", "ref-b")


def test_async_client_targets_accept_tls_urls():
    assert Client("https://api.example.com").config.normalized().target == "api.example.com:443"
    assert Client("https://api.example.com").config.normalized().tls
    assert Client("api.example.com:8443", tls=True).config.normalized().target == "api.example.com:8443"
    assert not Client("localhost:50051").config.normalized().tls


# -- the async Stream: closing it cancels the call ---------------------------------------------------


class _WatchOnce(chat_service_pb2_grpc.ChatServiceServicer):
    """Sends one event, then waits; records when the client's cancel reaches the handler."""

    def __init__(self):
        self.cancelled = asyncio.Event()
        self.metadata: dict[str, str] = {}

    async def WatchMessage(self, request, context):
        self.metadata = {k: v for k, v in context.invocation_metadata()}
        yield chat_service_pb2.WatchMessageResponse(message_id=request.message_id, seq=1)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def fake_chat_server():
    servicer = _WatchOnce()
    server = grpc.aio.server()
    chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize("how", ["leaving-async-with", "aclose"])
async def test_closing_an_async_stream_cancels_the_call(fake_chat_server, how):
    servicer, target = fake_chat_server
    async with Client(target, tokens=Tokens("access-1")) as client:
        stream = client.chat.watch_message("m1")
        if how == "aclose":
            first = await anext(stream)
            await stream.aclose()
        else:
            async with stream:
                first = await anext(aiter(stream))
        assert first.seq == 1
        await asyncio.wait_for(servicer.cancelled.wait(), WAIT)
        assert servicer.metadata["authorization"] == "Bearer access-1"
        with pytest.raises(StopAsyncIteration):
            await anext(stream)  # a closed stream just ends


# -- coverage of the contracts -----------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize("rpc", sorted(_core.ALL.values(), key=lambda r: r.path), ids=lambda r: r.path)
def test_every_rpc_has_a_method_in_both_clients_with_the_same_signature(rpc):
    namespace = rpc.service.split(".")[1]  # everything.<namespace>.v1.XService
    aio_cls = type(getattr(Client("x:1"), namespace))
    sync_cls = type(getattr(SyncClient("x:1"), namespace))
    name = _snake(rpc.name)
    aio_method, sync_method = getattr(aio_cls, name), getattr(sync_cls, name)
    assert inspect.signature(aio_method).parameters.keys() == inspect.signature(sync_method).parameters.keys()
    assert inspect.iscoroutinefunction(aio_method) is not rpc.streaming, "unary: async def; streams: a Stream"
    assert not inspect.iscoroutinefunction(sync_method)
