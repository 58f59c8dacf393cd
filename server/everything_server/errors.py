"""Domain errors. Domain code raises these; one mapper (`rpc.status`) turns them into gRPC statuses.

Each error carries a reason from `everything.errors.v1.ErrorReason` (by name, without the enum prefix)
so clients can branch on it without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class DomainError(Exception):
    """Base for every error that is the caller's or the world's fault, never the server's."""

    reason: str = "UNSPECIFIED"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field_name: str, description: str, *, reason: str | None = None):
        super().__init__(f"{field_name}: {description}", reason=reason)
        self.violations = [FieldViolation(field_name, description)]

    @classmethod
    def many(cls, violations: list[FieldViolation], *, reason: str | None = None) -> InvalidArgument:
        err = cls(violations[0].field, violations[0].description, reason=reason)
        err.violations = list(violations)
        err.message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        err.args = (err.message,)
        return err


class NotFound(DomainError):
    reason = "NOT_FOUND"

    def __init__(self, resource: str, resource_id: str | None = None):
        super().__init__(f"{resource} not found", metadata={"resource": resource})
        self.resource = resource
        self.resource_id = resource_id


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    reason = "ABORTED"


@dataclass
class _Retry:
    retry_after: float | None = None
    violations: list[QuotaViolation] = field(default_factory=list)


class ResourceExhausted(DomainError):
    """A limit or quota was hit (ours or the upstream model's). `retry_after` in seconds."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        violations: list[QuotaViolation] | None = None,
    ):
        super().__init__(message, reason=reason)
        self.retry_after = retry_after
        self.violations = violations or []


class Unavailable(DomainError):
    """A dependency (database, model upstream, search provider) is down; retrying later may work."""

    reason = "UPSTREAM_UNAVAILABLE"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None):
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class DeadlineExceeded(DomainError):
    reason = "UPSTREAM_TIMEOUT"


class Cancelled(DomainError):
    reason = "CANCELLED"
