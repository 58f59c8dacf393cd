from everything.search.v1 import search_pb2 as _search_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("query", "providers", "max_sources", "client_request_id")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    query: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_sources: int
    client_request_id: str
    def __init__(self, query: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., max_sources: _Optional[int] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("search_id", "seq", "started", "sources_found", "summary_delta", "usage_reported", "completed")
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FOUND_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_DELTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    seq: int
    started: _search_pb2.SearchStarted
    sources_found: _search_pb2.SourcesFound
    summary_delta: _search_pb2.SummaryDelta
    usage_reported: _search_pb2.UsageReported
    completed: _search_pb2.SearchCompleted
    def __init__(self, search_id: _Optional[str] = ..., seq: _Optional[int] = ..., started: _Optional[_Union[_search_pb2.SearchStarted, _Mapping]] = ..., sources_found: _Optional[_Union[_search_pb2.SourcesFound, _Mapping]] = ..., summary_delta: _Optional[_Union[_search_pb2.SummaryDelta, _Mapping]] = ..., usage_reported: _Optional[_Union[_search_pb2.UsageReported, _Mapping]] = ..., completed: _Optional[_Union[_search_pb2.SearchCompleted, _Mapping]] = ...) -> None: ...

class ListSearchesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSearchesResponse(_message.Message):
    __slots__ = ("searches", "next_page_token")
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[_search_pb2.SearchRecord]
    next_page_token: str
    def __init__(self, searches: _Optional[_Iterable[_Union[_search_pb2.SearchRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class GetSearchResponse(_message.Message):
    __slots__ = ("search",)
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    search: _search_pb2.SearchRecord
    def __init__(self, search: _Optional[_Union[_search_pb2.SearchRecord, _Mapping]] = ...) -> None: ...

class DeleteSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class DeleteSearchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class CancelSearchResponse(_message.Message):
    __slots__ = ("search",)
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    search: _search_pb2.SearchRecord
    def __init__(self, search: _Optional[_Union[_search_pb2.SearchRecord, _Mapping]] = ...) -> None: ...
