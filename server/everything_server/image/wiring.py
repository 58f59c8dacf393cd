"""Builds the ImageService servicer from the container (and registers export sections, hooks)."""

from __future__ import annotations

from everything.image.v1 import image_service_pb2_grpc


def install(c) -> image_service_pb2_grpc.ImageServiceServicer:
    return image_service_pb2_grpc.ImageServiceServicer()  # UNIMPLEMENTED until the image service lands
