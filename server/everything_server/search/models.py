"""Search rows (schema owned by migrations/0004) and the events of a running search."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, Text, func
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from everything_server.db.base import Base

TS = DateTime(timezone=True)


class Status(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class SearchQuery(Base):
    """One search. `sources` is a JSON list of Source dicts. The generated `search_vector` column
    (full-text search for the history provider) is left unmapped: PostgreSQL maintains it."""

    __tablename__ = "search_queries"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    query: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text, default="")
    sources: Mapped[list] = mapped_column(JSONB, default=list)
    providers: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    status: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    error_reason: Mapped[str] = mapped_column(Text, default="")
    client_request_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


@dataclass(frozen=True, slots=True)
class Source:
    index: int
    title: str
    url: str
    snippet: str
    provider: str

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "title": self.title,
            "url": self.url,
            "snippet": self.snippet,
            "provider": self.provider,
        }

    @classmethod
    def from_json(cls, d: dict) -> Source:
        return cls(
            int(d.get("index", 0)),
            str(d.get("title", "")),
            str(d.get("url", "")),
            str(d.get("snippet", "")),
            str(d.get("provider", "")),
        )


@dataclass(frozen=True, slots=True)
class SearchUsage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool


# -- events of a search's stream (each wrapped in an Event with its seq) --------------------------


@dataclass(frozen=True, slots=True)
class Started:
    search: SearchQuery


@dataclass(frozen=True, slots=True)
class SourcesFound:
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class SummaryDelta:
    text: str


@dataclass(frozen=True, slots=True)
class UsageReported:
    usage: SearchUsage


@dataclass(frozen=True, slots=True)
class Completed:
    search: SearchQuery


Body = Started | SourcesFound | SummaryDelta | UsageReported | Completed


@dataclass(frozen=True, slots=True)
class Event:
    search_id: uuid.UUID
    seq: int
    body: Body
