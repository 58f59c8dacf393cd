"""ImageService over gRPC: validate, call the service, convert."""

from __future__ import annotations

from google.api import httpbody_pb2

from everything.image.v1 import image_service_pb2 as pb
from everything.image.v1 import image_service_pb2_grpc
from everything_server.image import convert
from everything_server.image.service import ImageService, check_generate
from everything_server.rpc import validate
from everything_server.rpc.context import principal

# Just under 64 KiB and a multiple of 3: in JSON (grpcurl, gateways) each chunk is base64 without
# padding, so the chunks' texts concatenate into the base64 of the whole image.
CHUNK_BYTES = 3 * 21845


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageService):
        self._images = images
        self._signer = images.signer

    async def GenerateImage(self, request, context):
        p = principal()
        params = check_generate(
            prompt=request.prompt,
            size=request.size,
            model=request.model,
            count=request.count,
            partial_images=request.partial_images,
            client_request_id=validate.parse_uuid(
                "client_request_id", request.client_request_id, required=False
            ),
        )
        async for event in self._images.generate(p, params):
            yield convert.event_to_proto(event, self._signer)

    async def ListImages(self, request, context):
        images, token = await self._images.list(
            principal(), page_size=validate.page_size(request.page_size), page_token=request.page_token
        )
        return pb.ListImagesResponse(
            images=[convert.image_to_proto(i, self._signer) for i in images], next_page_token=token
        )

    async def GetImage(self, request, context):
        image = await self._images.get(principal(), validate.parse_uuid("image_id", request.image_id))
        return pb.GetImageResponse(image=convert.image_to_proto(image, self._signer))

    async def DeleteImage(self, request, context):
        await self._images.delete(principal(), validate.parse_uuid("image_id", request.image_id))
        return pb.DeleteImageResponse()

    async def GetImageContent(self, request, context):
        image, data = await self._images.content(
            principal(), validate.parse_uuid("image_id", request.image_id)
        )
        yield pb.GetImageContentResponse(
            data=data[:CHUNK_BYTES], content_type=image.content_type, total_bytes=len(data)
        )
        view = memoryview(data)
        for start in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
            yield pb.GetImageContentResponse(data=bytes(view[start : start + CHUNK_BYTES]))

    async def DownloadImage(self, request, context):
        image, data = await self._images.download(request.image_id, request.expires, request.signature)
        return httpbody_pb2.HttpBody(content_type=image.content_type, data=data)
