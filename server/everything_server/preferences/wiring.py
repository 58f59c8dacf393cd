"""Builds the PreferencesService servicer from the container (and registers export sections)."""

from __future__ import annotations

from everything.preferences.v1 import preferences_service_pb2_grpc
from everything_server.preferences import convert
from everything_server.preferences.service import PreferencesService
from everything_server.preferences.servicer import PreferencesServicer
from everything_server.rpc.context import Principal


def install(c) -> preferences_service_pb2_grpc.PreferencesServiceServicer:
    service = PreferencesService(c.db)

    async def export_preferences(p: Principal, include_bytes: bool):
        async for stored in service.export(p):
            yield convert.export(stored)

    c.exporter.add_section("preferences", export_preferences)
    return PreferencesServicer(service, c.settings)
