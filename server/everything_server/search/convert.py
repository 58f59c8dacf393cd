"""Search rows and events ↔ protos, and the export format."""

from __future__ import annotations

from everything.search.v1 import search_pb2, search_service_pb2
from everything_server.rpc.convert import ts
from everything_server.search.models import (
    Completed,
    Event,
    SearchQuery,
    SearchUsage,
    Source,
    SourcesFound,
    Started,
    Status,
    SummaryDelta,
    UsageReported,
)
from everything_server.search.service import usage_of

_STATUS = {
    Status.RUNNING: search_pb2.SEARCH_STATUS_RUNNING,
    Status.COMPLETED: search_pb2.SEARCH_STATUS_COMPLETED,
    Status.CANCELLED: search_pb2.SEARCH_STATUS_CANCELLED,
    Status.FAILED: search_pb2.SEARCH_STATUS_FAILED,
}


def source_to_proto(s: Source) -> search_pb2.Source:
    return search_pb2.Source(index=s.index, title=s.title, url=s.url, snippet=s.snippet, provider=s.provider)


def usage_to_proto(u: SearchUsage) -> search_pb2.Usage:
    return search_pb2.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, estimated=u.estimated
    )


def search_to_proto(row: SearchQuery) -> search_pb2.SearchRecord:
    return search_pb2.SearchRecord(
        id=str(row.id),
        query=row.query,
        summary=row.summary,
        sources=[source_to_proto(Source.from_json(s)) for s in row.sources],
        status=_STATUS.get(Status(row.status), search_pb2.SEARCH_STATUS_UNSPECIFIED),
        providers=list(row.providers),
        model=row.model,
        usage=usage_to_proto(usage_of(row)),
        error_reason=row.error_reason,
        create_time=ts(row.created_at),
        update_time=ts(row.updated_at),
    )


def event_to_proto(e: Event) -> search_service_pb2.SearchResponse:
    out = search_service_pb2.SearchResponse(search_id=str(e.search_id), seq=e.seq)
    body = e.body
    if isinstance(body, Started):
        out.started.search.CopyFrom(search_to_proto(body.search))
    elif isinstance(body, SourcesFound):
        out.sources_found.sources.extend(source_to_proto(s) for s in body.sources)
    elif isinstance(body, SummaryDelta):
        out.summary_delta.text = body.text
    elif isinstance(body, UsageReported):
        out.usage_reported.usage.CopyFrom(usage_to_proto(body.usage))
    elif isinstance(body, Completed):
        out.completed.search.CopyFrom(search_to_proto(body.search))
    return out


def search_export(row: SearchQuery) -> dict:
    return {
        "id": str(row.id),
        "query": row.query,
        "summary": row.summary,
        "sources": [Source.from_json(s).to_json() for s in row.sources],
        "status": row.status,
        "providers": list(row.providers),
        "model": row.model,
        "usage": {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "estimated": row.usage_estimated,
        },
        "error_reason": row.error_reason,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }
