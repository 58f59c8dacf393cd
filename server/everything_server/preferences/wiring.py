"""Builds the PreferencesService servicer from the container (and registers export sections)."""

from __future__ import annotations

from everything.preferences.v1 import preferences_service_pb2_grpc


def install(c) -> preferences_service_pb2_grpc.PreferencesServiceServicer:
    return preferences_service_pb2_grpc.PreferencesServiceServicer()  # UNIMPLEMENTED until it lands
