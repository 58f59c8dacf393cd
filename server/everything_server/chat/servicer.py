"""ChatService over gRPC: validate, call the service, convert."""

from __future__ import annotations

import re

from everything.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from everything_server.chat import convert
from everything_server.chat.service import ChatService
from everything_server.errors import InvalidArgument
from everything_server.rpc import validate
from everything_server.rpc.context import principal

MAX_TITLE = 200
MAX_CONTENT = 32_000
MAX_MODEL = 100
MAX_COMMENT = 2000
_MODEL = re.compile(r"^[^\s\x00-\x1f\x7f]+$")
_RATINGS = frozenset(chat_pb2.FeedbackRating.values())


def _title(field: str, value: str) -> str:
    return validate.text(field, value, max_len=MAX_TITLE, strip=True)


def _content(value: str) -> str:
    value = validate.text("content", value, max_len=MAX_CONTENT, min_len=1)
    if not value.strip():
        raise InvalidArgument("content", "must not be blank")
    return value


def _model(value: str) -> str:
    if not value:
        return ""
    if len(value) > MAX_MODEL:
        raise InvalidArgument("model", f"must be at most {MAX_MODEL} characters")
    if not _MODEL.match(value):
        raise InvalidArgument("model", "must not contain spaces or control characters")
    return value


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    def __init__(self, chat: ChatService):
        self._chat = chat

    async def CreateThread(self, request, context):
        thread = await self._chat.create_thread(principal(), title=_title("title", request.title))
        return chat_service_pb2.CreateThreadResponse(thread=convert.thread_to_proto(thread))

    async def ListThreads(self, request, context):
        threads, token = await self._chat.list_threads(
            principal(),
            page_size=validate.page_size(request.page_size, default=50, maximum=100),
            page_token=request.page_token,
        )
        return chat_service_pb2.ListThreadsResponse(
            threads=[convert.thread_to_proto(t) for t in threads], next_page_token=token
        )

    async def GetThread(self, request, context):
        thread_id = validate.parse_uuid("thread_id", request.thread_id)
        thread = await self._chat.get_thread(principal(), thread_id)
        return chat_service_pb2.GetThreadResponse(thread=convert.thread_to_proto(thread))

    async def UpdateThread(self, request, context):
        thread_id = validate.parse_uuid("thread.id", request.thread.id)
        paths = list(request.update_mask.paths) or ["title"]  # an empty mask means every updatable field
        for path in paths:
            if path != "title":
                raise InvalidArgument("update_mask", f"cannot update {path!r}; only 'title' can change")
        title = _title("thread.title", request.thread.title)
        thread = await self._chat.rename_thread(principal(), thread_id, title=title)
        return chat_service_pb2.UpdateThreadResponse(thread=convert.thread_to_proto(thread))

    async def DeleteThread(self, request, context):
        thread_id = validate.parse_uuid("thread_id", request.thread_id)
        await self._chat.delete_thread(principal(), thread_id)
        return chat_service_pb2.DeleteThreadResponse()

    async def ListMessages(self, request, context):
        thread_id = validate.parse_uuid("thread_id", request.thread_id)
        messages, token = await self._chat.list_messages(
            principal(),
            thread_id,
            page_size=validate.page_size(request.page_size, default=100, maximum=200),
            page_token=request.page_token,
            all_branches=request.include_all_branches,
        )
        return chat_service_pb2.ListMessagesResponse(
            messages=[convert.message_to_proto(m) for m in messages], next_page_token=token
        )

    async def SendMessage(self, request, context):
        thread_id = validate.parse_uuid("thread_id", request.thread_id, required=False)
        content = _content(request.content)
        client_message_id = validate.parse_uuid(
            "client_message_id", request.client_message_id, required=False
        )
        model = _model(request.model)
        events = self._chat.send_message(
            principal(),
            thread_id=thread_id,
            content=content,
            client_message_id=client_message_id,
            model=model,
        )
        async for ev in events:
            yield convert.send_response(ev)

    async def WatchMessage(self, request, context):
        message_id = validate.parse_uuid("message_id", request.message_id)
        if request.after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        async for ev in self._chat.watch(principal(), message_id=message_id, after_seq=request.after_seq):
            yield convert.watch_response(ev)

    async def CancelGeneration(self, request, context):
        message_id = validate.parse_uuid("message_id", request.message_id)
        message = await self._chat.cancel(principal(), message_id)
        return chat_service_pb2.CancelGenerationResponse(message=convert.message_to_proto(message))

    async def RegenerateMessage(self, request, context):
        message_id = validate.parse_uuid("message_id", request.message_id)
        model = _model(request.model)
        async for ev in self._chat.regenerate(principal(), message_id=message_id, model=model):
            yield convert.regenerate_response(ev)

    async def SubmitFeedback(self, request, context):
        message_id = validate.parse_uuid("message_id", request.message_id)
        if request.rating not in _RATINGS:
            raise InvalidArgument("rating", "must be FEEDBACK_RATING_UP, FEEDBACK_RATING_DOWN or UNSPECIFIED")
        comment = validate.text("comment", request.comment, max_len=MAX_COMMENT)
        if comment and request.rating == chat_pb2.FEEDBACK_RATING_UNSPECIFIED:
            raise InvalidArgument("comment", "needs a rating (UNSPECIFIED clears the feedback)")
        message = await self._chat.submit_feedback(
            principal(), message_id, rating=request.rating, comment=comment
        )
        return chat_service_pb2.SubmitFeedbackResponse(message=convert.message_to_proto(message))
