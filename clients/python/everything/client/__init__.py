"""A typed client of the everything backend: `Client` (asyncio) and `SyncClient` (blocking).

    from everything.client import Client

    async with Client("localhost:50051", on_tokens=save) as client:
        await client.auth.sign_in(email, password)
        threads = await client.chat.list_threads()

Both have one method per RPC, grouped by service (`client.auth`, `.chat`, `.search`, `.image`,
`.preferences`), send the access token, refresh it by themselves when it expires (and tell
`on_tokens`), and raise `EverythingError` subclasses built from the `google.rpc.Status` details.
The `everything` command line tool (`everything.client.cli`) is built on `SyncClient`.
"""

from everything.client._core import TokenHook, Tokens
from everything.client.aio import Client, Stream
from everything.client.errors import (
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    DeadlineExceededError,
    EverythingError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QuotaViolation,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from everything.client.sync import SyncClient, SyncStream

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "Client",
    "DeadlineExceededError",
    "EverythingError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaViolation",
    "ResourceExhaustedError",
    "Stream",
    "SyncClient",
    "SyncStream",
    "TokenHook",
    "Tokens",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
