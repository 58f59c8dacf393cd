"""The async client: `Client`, one method per RPC, grouped by service.

    async with Client("localhost:50051") as client:
        await client.auth.sign_in("ada@example.com", password)
        async for event in client.chat.send_message("Hello!"):
            if event.HasField("text_delta"):
                print(event.text_delta.text, end="", flush=True)

Unary methods return the response message; streaming methods return a `Stream` of response
messages at once (the call starts on the first read). Leaving `async for` early, `aclose()` or the
`async with` block cancels the call; for chat/search/image that only stops the stream — the server
goes on generating and saves the result (call `cancel_generation` / `cancel_search` to stop it).
Failed calls raise `EverythingError` subclasses (see `everything.client.errors`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
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

__all__ = ["Client", "Stream"]

T = TypeVar("T")


class Stream(AsyncIterator[T], Generic[T]):
    """The events of a server-streaming call. Closing it (or leaving `async with`) cancels the call."""

    def __init__(self, client: Client, rpc: Rpc, request: Any):
        self._client = client
        self._rpc = rpc
        self._request = request
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._first: list[Any] = []
        self._closed = False

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        if self._call is None:
            try:
                self._call, self._first = await self._client._run(self._rpc, self._request, self)
            except EverythingError as err:
                was_closed, self._closed = self._closed, True
                if was_closed and err.code == grpc.StatusCode.CANCELLED:
                    raise StopAsyncIteration from None
                raise
            except asyncio.CancelledError:
                if self._cancelled_by_us():
                    raise StopAsyncIteration from None
                self._closed = True
                raise
            except BaseException:
                self._closed = True
                raise
        if self._first:
            return self._first.pop()
        try:
            item = await self._call.read()
        except grpc.RpcError as err:
            was_closed, self._closed = self._closed, True
            if was_closed and err.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                raise StopAsyncIteration from None
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            if self._cancelled_by_us():
                raise StopAsyncIteration from None
            raise
        if item is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        return item

    def _cancelled_by_us(self) -> bool:
        # grpc.aio reports a locally cancelled call as CancelledError; that is the end of the
        # stream, unless this task itself is being cancelled, which must propagate.
        task = asyncio.current_task()
        return self._closed and not (task is not None and task.cancelling())

    def _attach(self, call: Any) -> None:
        # Called as soon as the call exists (before its first event), so a cancel() from another
        # thread or task while the stream opens still reaches it.
        self._call = call
        if self._closed:
            call.cancel()

    def cancel(self) -> None:
        """Cancel the call (idempotent). The stream ends; nothing more is read."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Stream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    async def collect(self) -> list[T]:
        """Read the stream to its end."""
        return [item async for item in self]

    async def initial_metadata(self) -> dict[str, str]:
        """Initial metadata of the call (`x-request-id`), once it has started."""
        if self._call is None:
            return {}
        md = await self._call.initial_metadata()
        return {k: v for k, v in md if isinstance(v, str)} if md else {}


class _Service:
    def __init__(self, client: Client):
        self._c = client


class Auth(_Service):
    """everything.auth.v1.AuthService. Sign-in methods keep the new tokens in the client."""

    async def sign_up(self, email: str, password: str, display_name: str = "") -> auth_pb.SignUpResponse:
        resp = await self._c._run(
            AUTH["SignUp"], auth_pb.SignUpRequest(email=email, password=password, display_name=display_name)
        )
        self._c.credentials.set(Tokens.from_proto(resp.tokens))
        return resp

    async def sign_in(self, email: str, password: str) -> auth_pb.SignInResponse:
        resp = await self._c._run(AUTH["SignIn"], auth_pb.SignInRequest(email=email, password=password))
        self._c.credentials.set(Tokens.from_proto(resp.tokens))
        return resp

    async def refresh_token(self) -> auth_pb.RefreshTokenResponse:
        """Rotate the tokens now (the client also does it by itself when the access token expires)."""
        return await self._c._refresh(self._c.credentials.access_token(), force=True)

    async def sign_out(self) -> auth_pb.SignOutResponse:
        resp = await self._c._run(AUTH["SignOut"], auth_pb.SignOutRequest())
        self._c.credentials.set(None)
        return resp

    async def get_current_user(self) -> auth_pb.GetCurrentUserResponse:
        return await self._c._run(AUTH["GetCurrentUser"], auth_pb.GetCurrentUserRequest())

    async def list_sessions(self, page_size: int = 0, page_token: str = "") -> auth_pb.ListSessionsResponse:
        return await self._c._run(
            AUTH["ListSessions"], auth_pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
        )

    async def revoke_session(self, session_id: str) -> auth_pb.RevokeSessionResponse:
        return await self._c._run(AUTH["RevokeSession"], auth_pb.RevokeSessionRequest(session_id=session_id))

    async def change_password(
        self, current_password: str, new_password: str
    ) -> auth_pb.ChangePasswordResponse:
        return await self._c._run(
            AUTH["ChangePassword"],
            auth_pb.ChangePasswordRequest(current_password=current_password, new_password=new_password),
        )

    async def delete_account(self, password: str) -> auth_pb.DeleteAccountResponse:
        resp = await self._c._run(AUTH["DeleteAccount"], auth_pb.DeleteAccountRequest(password=password))
        self._c.credentials.set(None)
        return resp

    def export_user_data(self, include_image_bytes: bool = False) -> Stream[auth_pb.ExportUserDataResponse]:
        """Chunks of one JSON document; concatenate their `data`."""
        return self._c._stream(
            AUTH["ExportUserData"], auth_pb.ExportUserDataRequest(include_image_bytes=include_image_bytes)
        )


class Chat(_Service):
    """everything.chat.v1.ChatService."""

    async def create_thread(self, title: str = "") -> chat_pb.CreateThreadResponse:
        return await self._c._run(CHAT["CreateThread"], chat_pb.CreateThreadRequest(title=title))

    async def list_threads(self, page_size: int = 0, page_token: str = "") -> chat_pb.ListThreadsResponse:
        return await self._c._run(
            CHAT["ListThreads"], chat_pb.ListThreadsRequest(page_size=page_size, page_token=page_token)
        )

    async def get_thread(self, thread_id: str) -> chat_pb.GetThreadResponse:
        return await self._c._run(CHAT["GetThread"], chat_pb.GetThreadRequest(thread_id=thread_id))

    async def update_thread(self, thread_id: str, title: str) -> chat_pb.UpdateThreadResponse:
        return await self._c._run(
            CHAT["UpdateThread"],
            chat_pb.UpdateThreadRequest(
                thread=chat_pb2.Thread(id=thread_id, title=title),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
        )

    async def delete_thread(self, thread_id: str) -> chat_pb.DeleteThreadResponse:
        return await self._c._run(CHAT["DeleteThread"], chat_pb.DeleteThreadRequest(thread_id=thread_id))

    async def list_messages(
        self, thread_id: str, page_size: int = 0, page_token: str = "", include_all_branches: bool = False
    ) -> chat_pb.ListMessagesResponse:
        return await self._c._run(
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
    ) -> Stream[chat_pb.SendMessageResponse]:
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

    def watch_message(self, message_id: str, after_seq: int = 0) -> Stream[chat_pb.WatchMessageResponse]:
        return self._c._stream(
            CHAT["WatchMessage"], chat_pb.WatchMessageRequest(message_id=message_id, after_seq=after_seq)
        )

    async def cancel_generation(self, message_id: str) -> chat_pb.CancelGenerationResponse:
        return await self._c._run(
            CHAT["CancelGeneration"], chat_pb.CancelGenerationRequest(message_id=message_id)
        )

    def regenerate_message(
        self, message_id: str, model: str = ""
    ) -> Stream[chat_pb.RegenerateMessageResponse]:
        return self._c._stream(
            CHAT["RegenerateMessage"], chat_pb.RegenerateMessageRequest(message_id=message_id, model=model)
        )

    async def submit_feedback(
        self, message_id: str, rating: chat_pb2.FeedbackRating.ValueType, comment: str = ""
    ) -> chat_pb.SubmitFeedbackResponse:
        return await self._c._run(
            CHAT["SubmitFeedback"],
            chat_pb.SubmitFeedbackRequest(message_id=message_id, rating=rating, comment=comment),
        )


class Search(_Service):
    """everything.search.v1.SearchService."""

    def search(
        self, query: str, providers: Iterable[str] = (), max_sources: int = 0, client_request_id: str = ""
    ) -> Stream[search_pb.SearchResponse]:
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

    async def list_searches(self, page_size: int = 0, page_token: str = "") -> search_pb.ListSearchesResponse:
        return await self._c._run(
            SEARCH["ListSearches"], search_pb.ListSearchesRequest(page_size=page_size, page_token=page_token)
        )

    async def get_search(self, search_id: str) -> search_pb.GetSearchResponse:
        return await self._c._run(SEARCH["GetSearch"], search_pb.GetSearchRequest(search_id=search_id))

    async def delete_search(self, search_id: str) -> search_pb.DeleteSearchResponse:
        return await self._c._run(SEARCH["DeleteSearch"], search_pb.DeleteSearchRequest(search_id=search_id))

    async def cancel_search(self, search_id: str) -> search_pb.CancelSearchResponse:
        return await self._c._run(SEARCH["CancelSearch"], search_pb.CancelSearchRequest(search_id=search_id))


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
    ) -> Stream[image_pb.GenerateImageResponse]:
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

    async def list_images(self, page_size: int = 0, page_token: str = "") -> image_pb.ListImagesResponse:
        return await self._c._run(
            IMAGE["ListImages"], image_pb.ListImagesRequest(page_size=page_size, page_token=page_token)
        )

    async def get_image(self, image_id: str) -> image_pb.GetImageResponse:
        return await self._c._run(IMAGE["GetImage"], image_pb.GetImageRequest(image_id=image_id))

    async def delete_image(self, image_id: str) -> image_pb.DeleteImageResponse:
        return await self._c._run(IMAGE["DeleteImage"], image_pb.DeleteImageRequest(image_id=image_id))

    def get_image_content(self, image_id: str) -> Stream[image_pb.GetImageContentResponse]:
        return self._c._stream(IMAGE["GetImageContent"], image_pb.GetImageContentRequest(image_id=image_id))

    async def read_image(self, image_id: str) -> tuple[bytes, str]:
        """The whole image: (bytes, content type), from GetImageContent."""
        data, content_type = bytearray(), ""
        async for chunk in self.get_image_content(image_id):
            data += chunk.data
            content_type = content_type or chunk.content_type
        return bytes(data), content_type

    async def download_image(self, image_id: str, expires: int, signature: str) -> httpbody_pb2.HttpBody:
        return await self._c._run(
            IMAGE["DownloadImage"],
            image_pb.DownloadImageRequest(image_id=image_id, expires=expires, signature=signature),
        )


class Preferences(_Service):
    """everything.preferences.v1.PreferencesService."""

    async def get_preferences(self) -> prefs_pb.GetPreferencesResponse:
        return await self._c._run(PREFERENCES["GetPreferences"], prefs_pb.GetPreferencesRequest())

    async def update_preferences(
        self, preferences: preferences_pb2.Preferences, fields: Iterable[str]
    ) -> prefs_pb.UpdatePreferencesResponse:
        """Change the `fields` (proto names) of `preferences` and nothing else."""
        return await self._c._run(
            PREFERENCES["UpdatePreferences"],
            prefs_pb.UpdatePreferencesRequest(
                preferences=preferences, update_mask=field_mask_pb2.FieldMask(paths=list(fields))
            ),
        )


class Client:
    """An async client of every everything service over one channel.

    Args:
        target: "host:port", or "https://host[:port]" for TLS.
        tls: use TLS (with `root_certificates`, else the system roots).
        tokens: tokens to start with (from a previous sign-in, see `on_tokens`).
        on_tokens: called with the new `Tokens` whenever they rotate, None when they are dropped.
            Runs on the event loop: keep it short (writing a small file is fine).
        timeout: deadline of unary calls in seconds (streams have none; close them instead).
        metadata: extra metadata sent with every call.
        keepalive_seconds: HTTP/2 ping interval while calls are open (not below the server's
            5-minute ping policy unless the server allows it).
        max_message_bytes: largest message sent or received.
        user_agent: shown in the user's session list.
        channel: an existing `grpc.aio.Channel` to use instead (the client does not close it).
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
        channel: grpc.aio.Channel | None = None,
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
        self._refresh_lock: asyncio.Lock | None = None
        self.auth = Auth(self)
        self.chat = Chat(self)
        self.search = Search(self)
        self.image = Image(self)
        self.preferences = Preferences(self)

    @property
    def tokens(self) -> Tokens | None:
        return self.credentials.tokens

    @property
    def channel(self) -> grpc.aio.Channel:
        # Made on first use, inside the running event loop (grpc.aio binds channels to a loop).
        if self._channel is None:
            self._channel = _core.make_channel(self.config, aio=True)  # type: ignore[assignment]
        return self._channel  # type: ignore[return-value]

    async def close(self) -> None:
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stubs.clear()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- running plans ----------------------------------------------------------------------------

    def _method(self, rpc: Rpc) -> Any:
        stub = self._stubs.get(rpc.stub)
        if stub is None:
            stub = self._stubs[rpc.stub] = rpc.stub(self.channel)
        return getattr(stub, rpc.name)

    def _stream(self, rpc: Rpc, request: Any) -> Stream[Any]:
        return Stream(self, rpc, request)

    async def _run(self, rpc: Rpc, request: Any, stream: Any = None) -> Any:
        """Run the plan of one call. Streams return (call, [first event] or [])."""
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
                    await self._refresh(step.used)
                elif rpc.streaming:
                    value = await self._open(step, stream)
                else:
                    value = await self._unary(step)
            except EverythingError as err:
                error = err

    async def _unary(self, step: _core.Call) -> Any:
        try:
            return await self._method(step.rpc)(step.request, metadata=step.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def _open(self, step: _core.Call, stream: Any = None) -> tuple[Any, list[Any]]:
        call = self._method(step.rpc)(step.request, metadata=step.metadata)
        if stream is not None:
            stream._attach(call)
        try:
            first = await call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except BaseException:
            call.cancel()
            raise
        return call, ([] if first is grpc.aio.EOF else [first])

    async def _refresh(self, used: str | None, force: bool = False) -> Any:
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            if not force and not self.credentials.refresh_due(used):
                return None  # another call rotated the tokens already
            rpc = _core.refresh_rpc()
            try:
                resp = await self._unary(_core.Call(rpc, self.credentials.refresh_request(), self._metadata))
            except EverythingError as err:
                self.credentials.refresh_failed(err)
                raise
            self.credentials.refreshed(resp)
            return resp
