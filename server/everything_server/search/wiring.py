"""Builds the SearchService servicer from the container (and registers export sections, hooks)."""

from __future__ import annotations

from everything.search.v1 import search_service_pb2_grpc


def install(c) -> search_service_pb2_grpc.SearchServiceServicer:
    return search_service_pb2_grpc.SearchServiceServicer()  # UNIMPLEMENTED until the search service lands
