from everything.chat.v1 import chat_pb2 as _chat_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateThreadRequest(_message.Message):
    __slots__ = ("title",)
    TITLE_FIELD_NUMBER: _ClassVar[int]
    title: str
    def __init__(self, title: _Optional[str] = ...) -> None: ...

class CreateThreadResponse(_message.Message):
    __slots__ = ("thread",)
    THREAD_FIELD_NUMBER: _ClassVar[int]
    thread: _chat_pb2.Thread
    def __init__(self, thread: _Optional[_Union[_chat_pb2.Thread, _Mapping]] = ...) -> None: ...

class ListThreadsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListThreadsResponse(_message.Message):
    __slots__ = ("threads", "next_page_token")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    threads: _containers.RepeatedCompositeFieldContainer[_chat_pb2.Thread]
    next_page_token: str
    def __init__(self, threads: _Optional[_Iterable[_Union[_chat_pb2.Thread, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetThreadRequest(_message.Message):
    __slots__ = ("thread_id",)
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    def __init__(self, thread_id: _Optional[str] = ...) -> None: ...

class GetThreadResponse(_message.Message):
    __slots__ = ("thread",)
    THREAD_FIELD_NUMBER: _ClassVar[int]
    thread: _chat_pb2.Thread
    def __init__(self, thread: _Optional[_Union[_chat_pb2.Thread, _Mapping]] = ...) -> None: ...

class UpdateThreadRequest(_message.Message):
    __slots__ = ("thread", "update_mask")
    THREAD_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    thread: _chat_pb2.Thread
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, thread: _Optional[_Union[_chat_pb2.Thread, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateThreadResponse(_message.Message):
    __slots__ = ("thread",)
    THREAD_FIELD_NUMBER: _ClassVar[int]
    thread: _chat_pb2.Thread
    def __init__(self, thread: _Optional[_Union[_chat_pb2.Thread, _Mapping]] = ...) -> None: ...

class DeleteThreadRequest(_message.Message):
    __slots__ = ("thread_id",)
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    def __init__(self, thread_id: _Optional[str] = ...) -> None: ...

class DeleteThreadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("thread_id", "page_size", "page_token", "include_all_branches")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ALL_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    page_size: int
    page_token: str
    include_all_branches: bool
    def __init__(self, thread_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_all_branches: _Optional[bool] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.Message]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_chat_pb2.Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SendMessageRequest(_message.Message):
    __slots__ = ("thread_id", "content", "client_message_id", "model")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    content: str
    client_message_id: str
    model: str
    def __init__(self, thread_id: _Optional[str] = ..., content: _Optional[str] = ..., client_message_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ("message_id", "seq", "user_message_saved", "message_started", "text_delta", "usage_reported", "thread_title_set", "message_completed")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    USER_MESSAGE_SAVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    THREAD_TITLE_SET_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    seq: int
    user_message_saved: _chat_pb2.UserMessageSaved
    message_started: _chat_pb2.MessageStarted
    text_delta: _chat_pb2.TextDelta
    usage_reported: _chat_pb2.UsageReported
    thread_title_set: _chat_pb2.ThreadTitleSet
    message_completed: _chat_pb2.MessageCompleted
    def __init__(self, message_id: _Optional[str] = ..., seq: _Optional[int] = ..., user_message_saved: _Optional[_Union[_chat_pb2.UserMessageSaved, _Mapping]] = ..., message_started: _Optional[_Union[_chat_pb2.MessageStarted, _Mapping]] = ..., text_delta: _Optional[_Union[_chat_pb2.TextDelta, _Mapping]] = ..., usage_reported: _Optional[_Union[_chat_pb2.UsageReported, _Mapping]] = ..., thread_title_set: _Optional[_Union[_chat_pb2.ThreadTitleSet, _Mapping]] = ..., message_completed: _Optional[_Union[_chat_pb2.MessageCompleted, _Mapping]] = ...) -> None: ...

class WatchMessageRequest(_message.Message):
    __slots__ = ("message_id", "after_seq")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    after_seq: int
    def __init__(self, message_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class WatchMessageResponse(_message.Message):
    __slots__ = ("message_id", "seq", "message_started", "text_delta", "usage_reported", "thread_title_set", "message_completed")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    THREAD_TITLE_SET_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    seq: int
    message_started: _chat_pb2.MessageStarted
    text_delta: _chat_pb2.TextDelta
    usage_reported: _chat_pb2.UsageReported
    thread_title_set: _chat_pb2.ThreadTitleSet
    message_completed: _chat_pb2.MessageCompleted
    def __init__(self, message_id: _Optional[str] = ..., seq: _Optional[int] = ..., message_started: _Optional[_Union[_chat_pb2.MessageStarted, _Mapping]] = ..., text_delta: _Optional[_Union[_chat_pb2.TextDelta, _Mapping]] = ..., usage_reported: _Optional[_Union[_chat_pb2.UsageReported, _Mapping]] = ..., thread_title_set: _Optional[_Union[_chat_pb2.ThreadTitleSet, _Mapping]] = ..., message_completed: _Optional[_Union[_chat_pb2.MessageCompleted, _Mapping]] = ...) -> None: ...

class CancelGenerationRequest(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    def __init__(self, message_id: _Optional[str] = ...) -> None: ...

class CancelGenerationResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _chat_pb2.Message
    def __init__(self, message: _Optional[_Union[_chat_pb2.Message, _Mapping]] = ...) -> None: ...

class RegenerateMessageRequest(_message.Message):
    __slots__ = ("message_id", "model")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    model: str
    def __init__(self, message_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class RegenerateMessageResponse(_message.Message):
    __slots__ = ("message_id", "seq", "message_started", "text_delta", "usage_reported", "thread_title_set", "message_completed")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    THREAD_TITLE_SET_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    seq: int
    message_started: _chat_pb2.MessageStarted
    text_delta: _chat_pb2.TextDelta
    usage_reported: _chat_pb2.UsageReported
    thread_title_set: _chat_pb2.ThreadTitleSet
    message_completed: _chat_pb2.MessageCompleted
    def __init__(self, message_id: _Optional[str] = ..., seq: _Optional[int] = ..., message_started: _Optional[_Union[_chat_pb2.MessageStarted, _Mapping]] = ..., text_delta: _Optional[_Union[_chat_pb2.TextDelta, _Mapping]] = ..., usage_reported: _Optional[_Union[_chat_pb2.UsageReported, _Mapping]] = ..., thread_title_set: _Optional[_Union[_chat_pb2.ThreadTitleSet, _Mapping]] = ..., message_completed: _Optional[_Union[_chat_pb2.MessageCompleted, _Mapping]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("message_id", "rating", "comment")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    rating: _chat_pb2.FeedbackRating
    comment: str
    def __init__(self, message_id: _Optional[str] = ..., rating: _Optional[_Union[_chat_pb2.FeedbackRating, str]] = ..., comment: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _chat_pb2.Message
    def __init__(self, message: _Optional[_Union[_chat_pb2.Message, _Mapping]] = ...) -> None: ...
