"""Builds the ChatService servicer from the container (and registers export sections, hooks)."""

from __future__ import annotations

from everything.chat.v1 import chat_service_pb2_grpc


def install(c) -> chat_service_pb2_grpc.ChatServiceServicer:
    return chat_service_pb2_grpc.ChatServiceServicer()  # UNIMPLEMENTED until the chat service lands
