import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_STATUS_UNSPECIFIED: _ClassVar[ImageStatus]
    IMAGE_STATUS_GENERATING: _ClassVar[ImageStatus]
    IMAGE_STATUS_COMPLETED: _ClassVar[ImageStatus]
    IMAGE_STATUS_FAILED: _ClassVar[ImageStatus]
IMAGE_STATUS_UNSPECIFIED: ImageStatus
IMAGE_STATUS_GENERATING: ImageStatus
IMAGE_STATUS_COMPLETED: ImageStatus
IMAGE_STATUS_FAILED: ImageStatus

class Image(_message.Message):
    __slots__ = ("id", "prompt", "revised_prompt", "size", "model", "image_url", "image_url_expire_time", "content_type", "byte_size", "status", "error_reason", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REVISED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    revised_prompt: str
    size: str
    model: str
    image_url: str
    image_url_expire_time: _timestamp_pb2.Timestamp
    content_type: str
    byte_size: int
    status: ImageStatus
    error_reason: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., revised_prompt: _Optional[str] = ..., size: _Optional[str] = ..., model: _Optional[str] = ..., image_url: _Optional[str] = ..., image_url_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_type: _Optional[str] = ..., byte_size: _Optional[int] = ..., status: _Optional[_Union[ImageStatus, str]] = ..., error_reason: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ImageStarted(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ImageProgress(_message.Message):
    __slots__ = ("percent", "stage")
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    percent: int
    stage: str
    def __init__(self, percent: _Optional[int] = ..., stage: _Optional[str] = ...) -> None: ...

class PartialImage(_message.Message):
    __slots__ = ("index", "data", "content_type")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    content_type: str
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class ImageCompleted(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...
