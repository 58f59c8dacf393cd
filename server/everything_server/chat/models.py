"""Chat tables: threads, messages and the coalesced stream events (schema owned by migrations/0002)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Integer, SmallInteger, Text, func, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from everything_server.db.base import Base

TS = DateTime(timezone=True)

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"

GENERATING = "generating"
COMPLETED = "completed"
CANCELLED = "cancelled"
FAILED = "failed"
FINAL_STATUSES = (COMPLETED, CANCELLED, FAILED)


class Thread(Base):
    __tablename__ = "threads"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(Text, default="")
    title_generated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    thread_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(Text)
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(Text)
    parent_message_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(BigInteger, server_default=text("nextval('messages_position_seq')"))
    turn: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    model: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    error_reason: Mapped[str] = mapped_column(Text, default="")
    client_message_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    feedback_rating: Mapped[int] = mapped_column(SmallInteger, default=0)
    feedback_comment: Mapped[str] = mapped_column(Text, default="")
    feedback_at: Mapped[datetime | None] = mapped_column(TS)
    lease_expires_at: Mapped[datetime | None] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))


class MessageEvents(Base):
    """One checkpoint of a reply's stream: the events seq_first..seq_last, encoded by chat.events."""

    __tablename__ = "message_events"
    message_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    seq_first: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq_last: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
