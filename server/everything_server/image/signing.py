"""Signed image URLs: the credential a browser presents instead of a bearer token.

    {image_url_base}/v1/images/{id}/content?expires=<unix seconds>&signature=<sig>
    sig = base64url(HMAC-SHA256(url_signing_key, f"{id}.{expires}")), no padding

The gateway maps that GET onto ImageService/DownloadImage (`image_id`, `expires`, `signature`), which
checks the signature in constant time, then the expiry. Both failures are PERMISSION_DENIED (a 403 for
the browser), with reason IMAGE_URL_INVALID (bad or missing signature, malformed id or expiry, an
expiry further out than this server would ever sign) or IMAGE_URL_EXPIRED (a genuine link whose time
is up: get the image again for a fresh one). A valid link to an image that is gone is NOT_FOUND.

Expiry times are rounded up to a step (at most 5 minutes), so the same image gets the same URL for a
while and browsers can cache it; a link lives between ttl and ttl + step seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from everything_server.errors import PermissionDenied

MAX_STEP_SECONDS = 300
CLOCK_SKEW_SECONDS = 60  # replicas' clocks may differ a little


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_at: datetime


class UrlSigner:
    def __init__(
        self, key: bytes, base_url: str, ttl_seconds: int, *, clock: Callable[[], float] = time.time
    ):
        if not key:
            raise ValueError("the URL signing key is empty")
        self._key = key
        self._base = base_url.rstrip("/")
        self._ttl = ttl_seconds
        self._step = max(1, min(MAX_STEP_SECONDS, ttl_seconds // 10))
        self._clock = clock

    def signature(self, image_id: uuid.UUID, expires: int) -> str:
        mac = hmac.new(self._key, f"{image_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def sign(self, image_id: uuid.UUID) -> SignedUrl:
        expires = math.ceil((self._clock() + self._ttl) / self._step) * self._step
        sig = self.signature(image_id, expires)
        return SignedUrl(
            url=f"{self._base}/v1/images/{image_id}/content?expires={expires}&signature={sig}",
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def verify(self, image_id: str, expires: int, signature: str) -> uuid.UUID:
        """The image id of a genuine, unexpired link; PermissionDenied otherwise."""
        invalid = PermissionDenied("the image link is not valid", reason="IMAGE_URL_INVALID")
        if not image_id or len(image_id) > 64 or not signature or len(signature) > 128:
            raise invalid
        try:
            iid = uuid.UUID(image_id)
        except ValueError:
            raise invalid from None
        if expires <= 0:
            raise invalid
        expected = self.signature(iid, expires).encode()
        if not hmac.compare_digest(expected, signature.encode()):
            raise invalid
        now = self._clock()
        if expires > now + self._ttl + self._step + CLOCK_SKEW_SECONDS:
            raise invalid  # signed under a longer TTL than today's: refuse what this TTL would not mint
        if expires <= now:
            raise PermissionDenied(
                "the image link has expired; get the image again for a fresh link", reason="IMAGE_URL_EXPIRED"
            )
        return iid
