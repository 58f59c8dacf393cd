"""Builds the ChatService servicer from the container and registers its export section."""

from __future__ import annotations

from everything.chat.v1 import chat_service_pb2_grpc
from everything_server.chat import convert
from everything_server.chat.service import ChatService
from everything_server.chat.servicer import ChatServicer
from everything_server.rpc.context import Principal


def install(c) -> chat_service_pb2_grpc.ChatServiceServicer:
    chat = ChatService(c.db, c.pubsub, c.ai, c.background, c.settings, limits=c.limits)

    async def export_threads(p: Principal, include_bytes: bool):
        async for thread, messages in chat.export_threads(p):
            yield convert.thread_export(thread, messages)

    c.exporter.add_section("threads", export_threads)
    return ChatServicer(chat)
