"""The synchronous client: `SyncClient`, the same methods as `aio.Client`, over blocking stubs.

It shares the token refresh rule, the token hook and the error mapping with the async client
(`everything.client._core`, `everything.client.errors`); only the waiting differs. The CLI uses it.

    with SyncClient("localhost:50051") as client:
        client.auth.sign_in("ada@example.com", password)
        with client.chat.send_message("Hello!") as stream:
            for event in stream:
                ...

Streaming methods return a `SyncStream` (the call starts on the first `next`); `close()` or
leaving the `with` block cancels the call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2

from everything.auth.v1 import auth_service_pb2 as auth_pb
from everything.chat.v1 import chat_pb2
from everything.chat.v1 import chat_service_pb2 as chat_pb
from everything.client import _core
from everything.client._core import AUTH, CHAT, IMAGE, PREFERENCES, SEARCH, Rpc, TokenHook, Tokens
from everything.client.errors import EverythingError, from_rpc_error
from everything.image.v1 import image_service_pb2 as image_pb
from everything.preferences.v1 import preferences_pb2
from everything.preferences.v1 import preferences_service_pb2 as prefs_pb
from everything.search.v1 import search_service_pb2 as search_pb

__all__ = ["SyncClient", "SyncStream"]

T = TypeVar("T")


class SyncStream(Iterator[T], Generic[T]):
    """The events of a server-streaming call. `close()` (or leaving `with`) cancels the call."""

    def __init__(self, client: SyncClient, rpc: Rpc, request: Any):
        self._client = client
        self._rpc = rpc
        self._request = request
        self._call: Any = None
        self._first: list[Any] = []
        self._closed = False

    def __iter__(self) -> SyncStream[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        if self._call is None:
            try:
                self._call, self._first = self._client._run(self._rpc, self._request, self)
            except EverythingError as err:
                was_closed, self._closed = self._closed, True
                if was_closed and err.code == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise
            except BaseException:
                self._closed = True
                raise
        if self._first:
            return self._first.pop()
        try:
            return next(self._call)
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as err:
            was_closed, self._closed = self._closed, True
            if was_closed and err.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                raise StopIteration from None
            raise from_rpc_error(err) from None

    def _attach(self, call: Any) -> None:
        # Called as soon as the call exists (before its first event), so a cancel() from another
        # thread or task while the stream opens still reaches it.
        self._call = call
        if self._closed:
            call.cancel()

    def cancel(self) -> None:
        """Cancel the call (idempotent, safe from another thread). The stream ends."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> SyncStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def collect(self) -> list[T]:
        """Read the stream to its end."""
        return list(self)

    def initial_metadata(self) -> dict[str, str]:
        """Initial metadata of the call (`x-request-id`), once it has started."""
        if self._call is None:
            return {}
        md = self._call.initial_metadata()
        return {k: v for k, v in md if isinstance(v, str)} if md else {}


class _Service:
    def __init__(self, client: SyncClient):
        self._c = client


class Auth(_Service):
    """everything.auth.v1.AuthService. Sign-in methods keep the new tokens in the client."""

    def sign_up(self, email: str, password: str, display_name: str = "") -> auth_pb.SignUpResponse:
        resp = self._c._run(
            AUTH["SignUp"], auth_pb.SignUpRequest(email=email, password=password, display_name=display_name)
        )
        self._c.credentials.set(Tokens.from_proto(resp.tokens))
        return resp

    def sign_in(self, email: str, password: str) -> auth_pb.SignInResponse:
        resp = self._c._run(AUTH["SignIn"], auth_pb.SignInRequest(email=email, password=password))
        self._c.credentials.set(Tokens.from_proto(resp.tokens))
        return resp

    def refresh_token(self) -> auth_pb.RefreshTokenResponse:
        """Rotate the tokens now (the client also does it by itself when the access token expires)."""
        return self._c._refresh(self._c.credentials.access_token(), force=True)

    def sign_out(self) -> auth_pb.SignOutResponse:
        resp = self._c._run(AUTH["SignOut"], auth_pb.SignOutRequest())
        self._c.credentials.set(None)
        return resp

    def get_current_user(self) -> auth_pb.GetCurrentUserResponse:
        return self._c._run(AUTH["GetCurrentUser"], auth_pb.GetCurrentUserRequest())

    def list_sessions(self, page_size: int = 0, page_token: str = "") -> auth_pb.ListSessionsResponse:
        return self._c._run(
            AUTH["ListSessions"], auth_pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
        )

    def revoke_session(self, session_id: str) -> auth_pb.RevokeSessionResponse:
        return self._c._run(AUTH["RevokeSession"], auth_pb.RevokeSessionRequest(session_id=session_id))

    def change_password(self, current_password: str, new_password: str) -> auth_pb.ChangePasswordResponse:
        return self._c._run(
            AUTH["ChangePassword"],
            auth_pb.ChangePasswordRequest(current_password=current_password, new_password=new_password),
        )

    def delete_account(self, password: str) -> auth_pb.DeleteAccountResponse:
        resp = self._c._run(AUTH["DeleteAccount"], auth_pb.DeleteAccountRequest(password=password))
        self._c.credentials.set(None)
        return resp

    def export_user_data(
        self, include_image_bytes: bool = False
    ) -> SyncStream[auth_pb.ExportUserDataResponse]:
        """Chunks of one JSON document; concatenate their `data`."""
        return self._c._stream(
            AUTH["ExportUserData"], auth_pb.ExportUserDataRequest(include_image_bytes=include_image_bytes)
        )


class Chat(_Service):
    """everything.chat.v1.ChatService."""

    def create_thread(self, title: str = "") -> chat_pb.CreateThreadResponse:
        return self._c._run(CHAT["CreateThread"], chat_pb.CreateThreadRequest(title=title))

    def list_threads(self, page_size: int = 0, page_token: str = "") -> chat_pb.ListThreadsResponse:
        return self._c._run(
            CHAT["ListThreads"], chat_pb.ListThreadsRequest(page_size=page_size, page_token=page_token)
        )

    def get_thread(self, thread_id: str) -> chat_pb.GetThreadResponse:
        return self._c._run(CHAT["GetThread"], chat_pb.GetThreadRequest(thread_id=thread_id))

    def update_thread(self, thread_id: str, title: str) -> chat_pb.UpdateThreadResponse:
        return self._c._run(
            CHAT["UpdateThread"],
            chat_pb.UpdateThreadRequest(
                thread=chat_pb2.Thread(id=thread_id, title=title),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
        )

    def delete_thread(self, thread_id: str) -> chat_pb.DeleteThreadResponse:
        return self._c._run(CHAT["DeleteThread"], chat_pb.DeleteThreadRequest(thread_id=thread_id))

    def list_messages(
        self, thread_id: str, page_size: int = 0, page_token: str = "", include_all_branches: bool = False
    ) -> chat_pb.ListMessagesResponse:
        return self._c._run(
            CHAT["ListMessages"],
            chat_pb.ListMessagesRequest(
                thread_id=thread_id,
                page_size=page_size,
                page_token=page_token,
                include_all_branches=include_all_branches,
            ),
        )

    def send_message(
        self, content: str, thread_id: str = "", model: str = "", client_message_id: str = ""
    ) -> SyncStream[chat_pb.SendMessageResponse]:
        """Post `content` (in a new thread unless `thread_id`) and stream the reply.

        A `client_message_id` is generated when not given, so the client's own retry (after a
        token refresh) never posts the message twice.
        """
        return self._c._stream(
            CHAT["SendMessage"],
            chat_pb.SendMessageRequest(
                thread_id=thread_id,
                content=content,
                model=model,
                client_message_id=_core.idempotency_key(client_message_id),
            ),
        )

    def watch_message(self, message_id: str, after_seq: int = 0) -> SyncStream[chat_pb.WatchMessageResponse]:
        return self._c._stream(
            CHAT["WatchMessage"], chat_pb.WatchMessageRequest(message_id=message_id, after_seq=after_seq)
        )

    def cancel_generation(self, message_id: str) -> chat_pb.CancelGenerationResponse:
        return self._c._run(CHAT["CancelGeneration"], chat_pb.CancelGenerationRequest(message_id=message_id))

    def regenerate_message(
        self, message_id: str, model: str = ""
    ) -> SyncStream[chat_pb.RegenerateMessageResponse]:
        return self._c._stream(
            CHAT["RegenerateMessage"], chat_pb.RegenerateMessageRequest(message_id=message_id, model=model)
        )

    def submit_feedback(
        self, message_id: str, rating: chat_pb2.FeedbackRating.ValueType, comment: str = ""
    ) -> chat_pb.SubmitFeedbackResponse:
        return self._c._run(
            CHAT["SubmitFeedback"],
            chat_pb.SubmitFeedbackRequest(message_id=message_id, rating=rating, comment=comment),
        )


class Search(_Service):
    """everything.search.v1.SearchService."""

    def search(
        self, query: str, providers: Iterable[str] = (), max_sources: int = 0, client_request_id: str = ""
    ) -> SyncStream[search_pb.SearchResponse]:
        """Stream the sources, then the summary, then the saved record."""
        return self._c._stream(
            SEARCH["Search"],
            search_pb.SearchRequest(
                query=query,
                providers=list(providers),
                max_sources=max_sources,
                client_request_id=_core.idempotency_key(client_request_id),
            ),
        )

    def list_searches(self, page_size: int = 0, page_token: str = "") -> search_pb.ListSearchesResponse:
        return self._c._run(
            SEARCH["ListSearches"], search_pb.ListSearchesRequest(page_size=page_size, page_token=page_token)
        )

    def get_search(self, search_id: str) -> search_pb.GetSearchResponse:
        return self._c._run(SEARCH["GetSearch"], search_pb.GetSearchRequest(search_id=search_id))

    def delete_search(self, search_id: str) -> search_pb.DeleteSearchResponse:
        return self._c._run(SEARCH["DeleteSearch"], search_pb.DeleteSearchRequest(search_id=search_id))

    def cancel_search(self, search_id: str) -> search_pb.CancelSearchResponse:
        return self._c._run(SEARCH["CancelSearch"], search_pb.CancelSearchRequest(search_id=search_id))


class Image(_Service):
    """everything.image.v1.ImageService."""

    def generate_image(
        self,
        prompt: str,
        size: str = "",
        model: str = "",
        count: int = 0,
        partial_images: int = 0,
        client_request_id: str = "",
    ) -> SyncStream[image_pb.GenerateImageResponse]:
        return self._c._stream(
            IMAGE["GenerateImage"],
            image_pb.GenerateImageRequest(
                prompt=prompt,
                size=size,
                model=model,
                count=count,
                partial_images=partial_images,
                client_request_id=_core.idempotency_key(client_request_id),
            ),
        )

    def list_images(self, page_size: int = 0, page_token: str = "") -> image_pb.ListImagesResponse:
        return self._c._run(
            IMAGE["ListImages"], image_pb.ListImagesRequest(page_size=page_size, page_token=page_token)
        )

    def get_image(self, image_id: str) -> image_pb.GetImageResponse:
        return self._c._run(IMAGE["GetImage"], image_pb.GetImageRequest(image_id=image_id))

    def delete_image(self, image_id: str) -> image_pb.DeleteImageResponse:
        return self._c._run(IMAGE["DeleteImage"], image_pb.DeleteImageRequest(image_id=image_id))

    def get_image_content(self, image_id: str) -> SyncStream[image_pb.GetImageContentResponse]:
        return self._c._stream(IMAGE["GetImageContent"], image_pb.GetImageContentRequest(image_id=image_id))

    def read_image(self, image_id: str) -> tuple[bytes, str]:
        """The whole image: (bytes, content type), from GetImageContent."""
        data, content_type = bytearray(), ""
        for chunk in self.get_image_content(image_id):
            data += chunk.data
            content_type = content_type or chunk.content_type
        return bytes(data), content_type

    def download_image(self, image_id: str, expires: int, signature: str) -> httpbody_pb2.HttpBody:
        return self._c._run(
            IMAGE["DownloadImage"],
            image_pb.DownloadImageRequest(image_id=image_id, expires=expires, signature=signature),
        )


class Preferences(_Service):
    """everything.preferences.v1.PreferencesService."""

    def get_preferences(self) -> prefs_pb.GetPreferencesResponse:
        return self._c._run(PREFERENCES["GetPreferences"], prefs_pb.GetPreferencesRequest())

    def update_preferences(
        self, preferences: preferences_pb2.Preferences, fields: Iterable[str]
    ) -> prefs_pb.UpdatePreferencesResponse:
        """Change the `fields` (proto names) of `preferences` and nothing else."""
        return self._c._run(
            PREFERENCES["UpdatePreferences"],
            prefs_pb.UpdatePreferencesRequest(
                preferences=preferences, update_mask=field_mask_pb2.FieldMask(paths=list(fields))
            ),
        )


class SyncClient:
    """A blocking client of every everything service over one channel; arguments as `aio.Client`.

    `channel` may be any `grpc.Channel`, for example `grpc_testing.channel(...)` in tests.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        tokens: Tokens | None = None,
        on_tokens: TokenHook | None = None,
        timeout: float | None = 30.0,
        metadata: Iterable[tuple[str, str]] = (),
        keepalive_seconds: float = 300.0,
        max_message_bytes: int = 32 * 1024 * 1024,
        user_agent: str = "everything-python-client/0.1",
        channel: grpc.Channel | None = None,
    ):
        self.config = _core.ChannelConfig(
            target=target,
            tls=tls,
            root_certificates=root_certificates,
            keepalive_seconds=keepalive_seconds,
            max_message_bytes=max_message_bytes,
            user_agent=user_agent,
        )
        self.credentials = _core.Credentials(tokens, on_tokens)
        self.timeout = timeout
        self._metadata = tuple(metadata)
        self._channel = channel
        self._owns_channel = channel is None
        self._stubs: dict[type, Any] = {}
        self._refresh_lock = threading.Lock()
        self.auth = Auth(self)
        self.chat = Chat(self)
        self.search = Search(self)
        self.image = Image(self)
        self.preferences = Preferences(self)

    @property
    def tokens(self) -> Tokens | None:
        return self.credentials.tokens

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = _core.make_channel(self.config, aio=False)  # type: ignore[assignment]
        return self._channel  # type: ignore[return-value]

    def close(self) -> None:
        if self._owns_channel and self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stubs.clear()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running plans (the same steps as aio.Client._run, blocking) --------------------------------

    def _method(self, rpc: Rpc) -> Any:
        stub = self._stubs.get(rpc.stub)
        if stub is None:
            stub = self._stubs[rpc.stub] = rpc.stub(self.channel)
        return getattr(stub, rpc.name)

    def _stream(self, rpc: Rpc, request: Any) -> SyncStream[Any]:
        return SyncStream(self, rpc, request)

    def _run(self, rpc: Rpc, request: Any, stream: Any = None) -> Any:
        steps = _core.plan(self.credentials, rpc, request, self._metadata)
        value: Any = None
        error: EverythingError | None = None
        while True:
            try:
                step = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            value, error = None, None
            try:
                if isinstance(step, _core.Refresh):
                    self._refresh(step.used)
                elif rpc.streaming:
                    value = self._open(step, stream)
                else:
                    value = self._unary(step)
            except EverythingError as err:
                error = err

    def _unary(self, step: _core.Call) -> Any:
        try:
            return self._method(step.rpc)(step.request, metadata=step.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _open(self, step: _core.Call, stream: Any = None) -> tuple[Any, list[Any]]:
        call = self._method(step.rpc)(step.request, metadata=step.metadata)
        if stream is not None:
            stream._attach(call)
        try:
            first = next(call)
        except StopIteration:
            return call, []
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except BaseException:
            call.cancel()
            raise
        return call, [first]

    def _refresh(self, used: str | None, force: bool = False) -> Any:
        with self._refresh_lock:
            if not force and not self.credentials.refresh_due(used):
                return None  # another call rotated the tokens already
            rpc = _core.refresh_rpc()
            try:
                resp = self._unary(_core.Call(rpc, self.credentials.refresh_request(), self._metadata))
            except EverythingError as err:
                self.credentials.refresh_failed(err)
                raise
            self.credentials.refreshed(resp)
            return resp
