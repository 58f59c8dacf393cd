"""Chat rows and stream events ↔ protos (and the export records)."""

from __future__ import annotations

from typing import Any

from everything.chat.v1 import chat_pb2, chat_service_pb2
from everything_server.chat.events import DELTA, DONE, START, TITLE, USAGE
from everything_server.chat.models import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GENERATING,
    ROLE_ASSISTANT,
    ROLE_USER,
    Message,
    Thread,
)
from everything_server.chat.service import USER_SAVED, StreamEvent
from everything_server.rpc.convert import ts

_ROLES = {ROLE_USER: chat_pb2.MESSAGE_ROLE_USER, ROLE_ASSISTANT: chat_pb2.MESSAGE_ROLE_ASSISTANT}
_STATUSES = {
    GENERATING: chat_pb2.MESSAGE_STATUS_GENERATING,
    COMPLETED: chat_pb2.MESSAGE_STATUS_COMPLETED,
    CANCELLED: chat_pb2.MESSAGE_STATUS_CANCELLED,
    FAILED: chat_pb2.MESSAGE_STATUS_FAILED,
}


def thread_to_proto(t: Thread) -> chat_pb2.Thread:
    return chat_pb2.Thread(
        id=str(t.id), title=t.title, create_time=ts(t.created_at), update_time=ts(t.updated_at)
    )


def message_to_proto(m: Message) -> chat_pb2.Message:
    out = chat_pb2.Message(
        id=str(m.id),
        thread_id=str(m.thread_id),
        role=_ROLES[m.role],
        content=m.content,
        status=_STATUSES[m.status],
        parent_message_id=str(m.parent_message_id) if m.parent_message_id else "",
        seq=m.seq,
        model=m.model,
        error_reason=m.error_reason,
        client_message_id=str(m.client_message_id) if m.client_message_id else "",
        create_time=ts(m.created_at),
        update_time=ts(m.updated_at),
    )
    if m.role == ROLE_ASSISTANT:
        out.usage.CopyFrom(
            chat_pb2.Usage(
                prompt_tokens=m.prompt_tokens,
                completion_tokens=m.completion_tokens,
                estimated=m.usage_estimated,
            )
        )
    if m.feedback_rating:
        out.feedback.CopyFrom(
            chat_pb2.Feedback(
                rating=m.feedback_rating, comment=m.feedback_comment, update_time=ts(m.feedback_at)
            )
        )
    return out


def _event_fields(ev: StreamEvent) -> dict[str, Any]:
    """The oneof member of a stream response for `ev`."""
    if ev.kind == DELTA:
        return {"text_delta": chat_pb2.TextDelta(text=ev.text)}
    if ev.kind == START:
        assert ev.message is not None
        return {"message_started": chat_pb2.MessageStarted(message=message_to_proto(ev.message))}
    if ev.kind == USAGE:
        u = ev.usage
        usage = chat_pb2.Usage(
            prompt_tokens=u.prompt_tokens if u else 0,
            completion_tokens=u.completion_tokens if u else 0,
            estimated=u.estimated if u else True,
        )
        return {"usage_reported": chat_pb2.UsageReported(usage=usage)}
    if ev.kind == TITLE:
        return {"thread_title_set": chat_pb2.ThreadTitleSet(thread_id=str(ev.thread_id), title=ev.text)}
    if ev.kind == DONE:
        assert ev.message is not None
        return {"message_completed": chat_pb2.MessageCompleted(message=message_to_proto(ev.message))}
    if ev.kind == USER_SAVED:
        assert ev.message is not None and ev.thread is not None
        return {
            "user_message_saved": chat_pb2.UserMessageSaved(
                message=message_to_proto(ev.message), thread=thread_to_proto(ev.thread)
            )
        }
    raise ValueError(f"unknown event kind {ev.kind!r}")


def send_response(ev: StreamEvent) -> chat_service_pb2.SendMessageResponse:
    return chat_service_pb2.SendMessageResponse(
        message_id=str(ev.message_id), seq=ev.seq, **_event_fields(ev)
    )


def watch_response(ev: StreamEvent) -> chat_service_pb2.WatchMessageResponse:
    return chat_service_pb2.WatchMessageResponse(
        message_id=str(ev.message_id), seq=ev.seq, **_event_fields(ev)
    )


def regenerate_response(ev: StreamEvent) -> chat_service_pb2.RegenerateMessageResponse:
    return chat_service_pb2.RegenerateMessageResponse(
        message_id=str(ev.message_id), seq=ev.seq, **_event_fields(ev)
    )


# -- export (ExportUserData, section "threads") -------------------------------------------------------


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def message_export(m: Message) -> dict:
    out: dict[str, Any] = {
        "id": str(m.id),
        "role": m.role,
        "content": m.content,
        "status": m.status,
        "created_at": _iso(m.created_at),
    }
    if m.client_message_id:
        out["client_message_id"] = str(m.client_message_id)
    if m.role == ROLE_ASSISTANT:
        out.update(
            parent_message_id=str(m.parent_message_id),
            model=m.model,
            usage={
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "estimated": m.usage_estimated,
            },
        )
        if m.error_reason:
            out["error_reason"] = m.error_reason
        if m.feedback_rating:
            out["feedback"] = {
                "rating": chat_pb2.FeedbackRating.Name(m.feedback_rating),
                "comment": m.feedback_comment,
                "updated_at": _iso(m.feedback_at),
            }
    return out


def thread_export(t: Thread, messages: list[Message]) -> dict:
    return {
        "id": str(t.id),
        "title": t.title,
        "created_at": _iso(t.created_at),
        "updated_at": _iso(t.updated_at),
        "messages": [message_export(m) for m in messages],
    }
