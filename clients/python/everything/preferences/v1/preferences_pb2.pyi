import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Theme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THEME_UNSPECIFIED: _ClassVar[Theme]
    THEME_SYSTEM: _ClassVar[Theme]
    THEME_LIGHT: _ClassVar[Theme]
    THEME_DARK: _ClassVar[Theme]
THEME_UNSPECIFIED: Theme
THEME_SYSTEM: Theme
THEME_LIGHT: Theme
THEME_DARK: Theme

class Preferences(_message.Message):
    __slots__ = ("chat_model", "system_prompt", "temperature", "image_model", "image_size", "search_providers", "theme", "locale", "client_settings", "update_time")
    CHAT_MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    THEME_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    chat_model: str
    system_prompt: str
    temperature: float
    image_model: str
    image_size: str
    search_providers: _containers.RepeatedScalarFieldContainer[str]
    theme: Theme
    locale: str
    client_settings: _struct_pb2.Struct
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, chat_model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., image_model: _Optional[str] = ..., image_size: _Optional[str] = ..., search_providers: _Optional[_Iterable[str]] = ..., theme: _Optional[_Union[Theme, str]] = ..., locale: _Optional[str] = ..., client_settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
