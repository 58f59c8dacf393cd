"""Image rows and events ↔ protos (with a freshly signed image_url for completed images)."""

from __future__ import annotations

import base64

from everything.image.v1 import image_pb2
from everything.image.v1 import image_service_pb2 as pb
from everything_server.image.models import COMPLETED, FAILED, GENERATING, Image
from everything_server.image.service import Event
from everything_server.image.signing import UrlSigner
from everything_server.rpc.convert import ts

_STATUS = {
    GENERATING: image_pb2.IMAGE_STATUS_GENERATING,
    COMPLETED: image_pb2.IMAGE_STATUS_COMPLETED,
    FAILED: image_pb2.IMAGE_STATUS_FAILED,
}


def image_to_proto(image: Image, signer: UrlSigner) -> image_pb2.Image:
    out = image_pb2.Image(
        id=str(image.id),
        prompt=image.prompt,
        revised_prompt=image.revised_prompt,
        size=image.size,
        model=image.model,
        content_type=image.content_type,
        byte_size=image.byte_size,
        status=_STATUS.get(image.status, image_pb2.IMAGE_STATUS_UNSPECIFIED),
        error_reason=image.error_reason,
        create_time=ts(image.created_at),
    )
    if image.status == COMPLETED:
        signed = signer.sign(image.id)
        out.image_url = signed.url
        out.image_url_expire_time.CopyFrom(ts(signed.expires_at))
    return out


def event_to_proto(event: Event, signer: UrlSigner) -> pb.GenerateImageResponse:
    out = pb.GenerateImageResponse(image_id=str(event.image_id), seq=event.seq)
    if event.kind == "started":
        out.started.image.CopyFrom(image_to_proto(event.image, signer))
    elif event.kind == "progress":
        out.progress.percent = event.percent
        out.progress.stage = event.stage
    elif event.kind == "partial_image":
        out.partial_image.index = event.index
        out.partial_image.data = event.data
        out.partial_image.content_type = event.content_type
    else:
        out.completed.image.CopyFrom(image_to_proto(event.image, signer))
    return out


def export(image: Image, data: bytes | None) -> dict:
    record = {
        "id": str(image.id),
        "prompt": image.prompt,
        "revised_prompt": image.revised_prompt,
        "size": image.size,
        "model": image.model,
        "status": image.status,
        "error_reason": image.error_reason,
        "content_type": image.content_type,
        "byte_size": image.byte_size,
        "prompt_tokens": image.prompt_tokens,
        "completion_tokens": image.completion_tokens,
        "created_at": image.created_at.isoformat(),
    }
    if data is not None:
        record["data_base64"] = base64.b64encode(data).decode()
    return record
