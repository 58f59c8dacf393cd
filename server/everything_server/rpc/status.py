"""The one mapper from domain errors to `google.rpc.Status` (with ErrorInfo, BadRequest, RetryInfo,
QuotaFailure details), and back to a grpc.Status for `context.abort`."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from everything.errors.v1 import error_reason_pb2
from everything_server import errors

DOMAIN = "everything"

_CODES: list[tuple[type[errors.DomainError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
]


def known_reason(reason: str) -> str:
    """The reason if `ErrorReason` has it, else the generic one for safety."""
    try:
        error_reason_pb2.ErrorReason.Value("ERROR_REASON_" + reason)
    except ValueError:
        return "INTERNAL"
    return reason


def _pack(msg) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _retry_info(seconds: float) -> any_pb2.Any:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0) * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=d))


def code_of(err: errors.DomainError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(err: errors.DomainError, request_id: str) -> grpc.Status:
    code = code_of(err)
    metadata = {**err.metadata, "request_id": request_id}
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=known_reason(err.reason), domain=DOMAIN, metadata=metadata))
    ]
    if isinstance(err, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in err.violations
                    ]
                )
            )
        )
    if isinstance(err, errors.ResourceExhausted):
        if err.violations:
            details.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=v.subject, description=v.description
                            )
                            for v in err.violations
                        ]
                    )
                )
            )
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        details.append(_retry_info(retry_after))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=err.message, details=details))


def internal_status(request_id: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"request_id": request_id})
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error; report request id {request_id}",
            details=[_pack(info)],
        )
    )
