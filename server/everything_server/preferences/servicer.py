"""PreferencesService over gRPC: convert in, call the service, convert out."""

from __future__ import annotations

from everything.preferences.v1 import preferences_service_pb2 as pb
from everything.preferences.v1 import preferences_service_pb2_grpc
from everything_server.config import Settings
from everything_server.preferences import convert
from everything_server.preferences.service import PreferencesService
from everything_server.rpc.context import principal


class PreferencesServicer(preferences_service_pb2_grpc.PreferencesServiceServicer):
    def __init__(self, preferences: PreferencesService, settings: Settings):
        self._preferences = preferences
        self._settings = settings

    async def GetPreferences(self, request, context):
        stored = await self._preferences.get(principal())
        return pb.GetPreferencesResponse(preferences=convert.to_proto(stored, self._settings))

    async def UpdatePreferences(self, request, context):
        p = principal()
        patch = convert.patch_from_proto(request.preferences, convert.mask_paths(request))
        stored = await self._preferences.update(p, patch)
        return pb.UpdatePreferencesResponse(preferences=convert.to_proto(stored, self._settings))
