"""Builds the ImageService servicer from the container (and registers the "images" export section)."""

from __future__ import annotations

from everything.image.v1 import image_service_pb2_grpc
from everything_server.image import convert
from everything_server.image.service import ImageService
from everything_server.image.servicer import ImageServicer
from everything_server.image.signing import UrlSigner
from everything_server.image.storage import PostgresImageStore
from everything_server.rpc.context import Principal


def install(c) -> image_service_pb2_grpc.ImageServiceServicer:
    s = c.settings
    service = ImageService(
        db=c.db,
        ai=c.ai,
        store=PostgresImageStore(),
        signer=UrlSigner(c.url_signing_key, s.image_url_base, s.image_url_ttl_seconds),
        background=c.background,
        pubsub=c.pubsub,
        limits=c.limits,
        settings=s,
    )

    async def export_images(p: Principal, include_bytes: bool):
        async for image, data in service.export(p, include_bytes=include_bytes):
            yield convert.export(image, data)

    c.exporter.add_section("images", export_images)
    return ImageServicer(service)
