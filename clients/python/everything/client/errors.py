"""Errors of the everything client: a failed call's `google.rpc.Status` turned into an exception.

Every exception is an `EverythingError` carrying the status code, the `ErrorInfo` reason (an
`everything.errors.v1.ErrorReason` name without its prefix, the thing to branch on), the
`BadRequest` field violations, the `RetryInfo` delay, the `QuotaFailure` violations and the
server's request id. The subclass follows the gRPC code, so `except NotFoundError` reads naturally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
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
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (`google.rpc.BadRequest.FieldViolation`)."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota (`google.rpc.QuotaFailure.Violation`)."""

    subject: str
    description: str


class EverythingError(Exception):
    """A call failed. `code` is the gRPC status code, `reason` the ErrorInfo reason (or None)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
        quota_violations: Iterable[QuotaViolation] = (),
        request_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = list(field_violations)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)
        self.request_id = request_id
        self.metadata = dict(metadata or {})

    @property
    def fields(self) -> dict[str, str]:
        """Field violations as {field: description}."""
        return {v.field: v.description for v in self.field_violations}

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else self.code.name
        if self.reason and self.reason != self.code.name:
            text += f" [{self.reason}]"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"
        )


class InvalidArgumentError(EverythingError):
    """INVALID_ARGUMENT: `field_violations` names the bad fields."""


class NotFoundError(EverythingError):
    """NOT_FOUND: it does not exist or is not the caller's."""


class AlreadyExistsError(EverythingError):
    """ALREADY_EXISTS, for example EMAIL_TAKEN."""


class UnauthenticatedError(EverythingError):
    """UNAUTHENTICATED: no, a bad, an expired (after a failed refresh) or a revoked token."""


class PermissionDeniedError(EverythingError):
    """PERMISSION_DENIED."""


class FailedPreconditionError(EverythingError):
    """FAILED_PRECONDITION, for example GENERATION_NOT_ACTIVE."""


class AbortedError(EverythingError):
    """ABORTED: a concurrent change conflicted; retry."""


class ResourceExhaustedError(EverythingError):
    """RESOURCE_EXHAUSTED: rate limits and quotas; `retry_after` says when to try again."""


class UnavailableError(EverythingError):
    """UNAVAILABLE: the server or the model provider cannot answer now; retry later."""


class DeadlineExceededError(EverythingError):
    """DEADLINE_EXCEEDED: the call's deadline passed or the model stalled."""


class CallCancelledError(EverythingError):
    """CANCELLED: the call or the generation was cancelled."""


class UnimplementedError(EverythingError):
    """UNIMPLEMENTED: the server does not offer this method."""


class InternalError(EverythingError):
    """INTERNAL / UNKNOWN / DATA_LOSS: the server's fault; report `request_id`."""


_CLASSES: dict[grpc.StatusCode, type[EverythingError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def _status(err: grpc.RpcError) -> status_pb2.Status | None:
    # Read grpc-status-details-bin directly rather than with rpc_status.from_call, which refuses
    # details whose message differs from the call's (a proxy may rewrite the message).
    raw = _trailing(err, "grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return None
    try:
        return status_pb2.Status.FromString(raw)
    except DecodeError:
        return None


def _trailing(err: grpc.RpcError, key: str) -> str | bytes | None:
    try:
        md = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None
    for k, v in md:
        if k == key:
            return v
    return None


def from_rpc_error(err: grpc.RpcError) -> EverythingError:
    """The EverythingError of a failed call (sync, aio or grpc_testing), details decoded."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = (err.details() if callable(getattr(err, "details", None)) else "") or ""  # type: ignore[attr-defined]
    reason: str | None = None
    fields: list[FieldViolation] = []
    quota: list[QuotaViolation] = []
    retry_after: float | None = None
    metadata: dict[str, str] = {}
    status = _status(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason or None, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            quota += [QuotaViolation(v.subject, v.description) for v in qf.violations]
    trailing_id = _trailing(err, "x-request-id")
    request_id = metadata.get("request_id") or (trailing_id if isinstance(trailing_id, str) else None)
    cls = _CLASSES.get(code, EverythingError)
    return cls(
        code,
        message,
        reason=reason,
        field_violations=fields,
        retry_after=retry_after,
        quota_violations=quota,
        request_id=request_id,
        metadata=metadata,
    )
