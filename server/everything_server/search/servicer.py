"""SearchService over gRPC: validate ids, call the service, convert."""

from __future__ import annotations

from everything.search.v1 import search_service_pb2 as pb
from everything.search.v1 import search_service_pb2_grpc
from everything_server.rpc import validate
from everything_server.rpc.context import principal
from everything_server.search import convert
from everything_server.search.service import SearchService


class SearchServicer(search_service_pb2_grpc.SearchServiceServicer):
    def __init__(self, search: SearchService):
        self._search = search

    async def Search(self, request, context):
        events = self._search.search(
            principal(),
            query=request.query,
            providers=list(request.providers),
            max_sources=request.max_sources,
            client_request_id=request.client_request_id,
        )
        async for event in events:
            yield convert.event_to_proto(event)

    async def ListSearches(self, request, context):
        rows, token = await self._search.list_searches(
            principal(), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListSearchesResponse(
            searches=[convert.search_to_proto(r) for r in rows], next_page_token=token
        )

    async def GetSearch(self, request, context):
        row = await self._search.get(principal(), validate.parse_uuid("search_id", request.search_id))
        return pb.GetSearchResponse(search=convert.search_to_proto(row))

    async def DeleteSearch(self, request, context):
        await self._search.delete(principal(), validate.parse_uuid("search_id", request.search_id))
        return pb.DeleteSearchResponse()

    async def CancelSearch(self, request, context):
        row = await self._search.cancel(principal(), validate.parse_uuid("search_id", request.search_id))
        return pb.CancelSearchResponse(search=convert.search_to_proto(row))
