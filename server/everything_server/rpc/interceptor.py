"""The one server interceptor: request id, authentication, error mapping and the access log.

Authentication: `authorization: Bearer <jwt>` → the caller in a ContextVar. Methods outside the
PUBLIC allow-list are refused with UNAUTHENTICATED before the handler runs. Domain errors become
statuses with details (rpc.status); anything unexpected becomes INTERNAL with a request id and no
internals. Access logs carry method, code, duration and request id; never tokens or payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from everything_server import errors
from everything_server.limits import Limits
from everything_server.metrics import Metrics
from everything_server.rpc import context as ctx
from everything_server.rpc import status as st
from everything_server.rpc.admission import StreamAdmission, saw_call
from everything_server.tracing import Tracing

log = logging.getLogger("everything.access")
err_log = logging.getLogger("everything.rpc")

PUBLIC_METHODS = frozenset(
    {
        "/everything.auth.v1.AuthService/SignUp",
        "/everything.auth.v1.AuthService/SignIn",
        "/everything.auth.v1.AuthService/RefreshToken",
        "/everything.image.v1.ImageService/DownloadImage",
    }
)
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

Verifier = Callable[[str], ctx.Principal]

# A request whose bytes did not parse (bad wire format, invalid UTF-8, nested deeper than protobuf
# allows). grpc would answer UNKNOWN naming the parser's exception; the handler answers
# INVALID_ARGUMENT instead, after authentication, like any other bad input.
_UNDECODABLE = object()


def _lenient(deserializer):
    if deserializer is None:
        return None

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - DecodeError and whatever else the parser raises
            return _UNDECODABLE

    return parse


def _check_decoded(request) -> None:
    if request is _UNDECODABLE:
        raise errors.InvalidArgument("request", "is not a valid message of the method's request type")


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if isinstance(value, str):
            out.setdefault(key.lower(), value)
    return out


@dataclass(frozen=True)
class Caps:
    """Per-process caps. Past them a call is refused at once instead of queueing (rpc.admission)."""

    rate_limit_per_minute: int = 600
    max_streams_per_user: int = 8
    # Open streams of the process, when the interceptor is given no StreamAdmission of its own (the
    # app gives one, built from the same setting, which its LoopLagMonitor steers).
    max_streams_per_process: int = 2000
    # New streams are refused while the smoothed event-loop lag is above this; 0 turns it off.
    max_loop_lag_seconds: float = 0.1
    # ... and while the oldest caller waiting for a database connection has waited this long; 0
    # turns it off.
    max_db_wait_seconds: float = 0.25
    unary_timeout_seconds: float = 30.0


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        verify_access_token: Verifier,
        *,
        limits: Limits | None = None,
        caps: Caps | None = None,
        metrics: Metrics | None = None,
        ready: Callable[[], bool] | None = None,
        draining: Callable[[], bool] | None = None,
        tracing: Tracing | None = None,
        loop_lag: Callable[[], float] | None = None,
        db_wait: Callable[[], float] | None = None,
        admission: StreamAdmission | None = None,
    ):
        self._tracing = tracing
        self._loop_lag = loop_lag  # seconds the event loop runs late (rpc.admission.LoopLagMonitor)
        self._db_wait = db_wait  # seconds the oldest caller has waited for a connection (db.PoolQueue)
        self._ready = ready  # False while the database is unreachable or not migrated
        self._draining = draining  # True once the process is shutting down
        self._verify = verify_access_token
        self._limits = limits
        self._caps = caps or Caps()
        self._metrics = metrics
        # Open streams and their limit (adaptive when the app's LoopLagMonitor feeds it; else the
        # configured cap).
        self._admission = admission or StreamAdmission(self._caps.max_streams_per_process, target_load=0)
        self._streams_by_user: dict[uuid.UUID, int] = {}

    async def intercept_service(self, continuation, handler_call_details):
        saw_call()  # taken from grpc core (rpc.admission.CallBacklog)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(PUBLIC_PREFIXES):
            return handler
        md = _metadata(handler_call_details)
        rid = md.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        public = method in PUBLIC_METHODS
        auth_header = md.get("authorization", "")

        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request, context):
                start = time.perf_counter()
                code, reason = grpc.StatusCode.OK, None
                tokens = self._enter(rid)
                span = self._span(method, md)
                try:
                    span.__enter__()
                    context.set_trailing_metadata((("x-request-id", rid),))
                    self._check_ready()
                    await self._admit(method, request, auth_header, public)
                    try:
                        async with asyncio.timeout(self._caps.unary_timeout_seconds):
                            return await behavior(request, context)
                    except TimeoutError:
                        raise errors.DeadlineExceeded(
                            "the call took longer than the server allows", reason="REQUEST_TIMEOUT"
                        ) from None
                except BaseException as exc:  # noqa: BLE001 - mapped below, re-raised when not ours
                    code, reason = _code_for(exc), getattr(exc, "reason", None)
                    await self._handle(exc, context, rid, method)
                finally:
                    self._exit(tokens, method, code, start, rid, reason)
                    _end_span(span, code)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream:
            stream_behavior = handler.unary_stream

            async def unary_stream(request, context):
                start = time.perf_counter()
                code, reason = grpc.StatusCode.OK, None
                tokens = self._enter(rid)
                span = self._span(method, md)
                slot = started = False
                try:
                    span.__enter__()
                    self._check_ready()
                    # Before anything that costs (token check, rate-limit round trip): a refusal
                    # must stay cheap and fast exactly when the process is overloaded.
                    self._take_stream_slot()
                    slot = True
                    # In the trailers, as for unary calls. (Sent as initial metadata before
                    # anything else, it cost a round trip to grpc core in front of the first token.)
                    context.set_trailing_metadata((("x-request-id", rid),))
                    await self._admit(method, request, auth_header, public)
                    with self._user_stream_slot():
                        async for item in stream_behavior(request, context):
                            if not started:
                                started = True
                                self._admission.started()
                            yield item
                except BaseException as exc:  # noqa: BLE001
                    code, reason = _code_for(exc), getattr(exc, "reason", None)
                    await self._handle(exc, context, rid, method)
                finally:
                    if slot:
                        self._release_stream_slot(started)
                    self._exit(tokens, method, code, start, rid, reason)
                    _end_span(span, code)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    # -- pieces -----------------------------------------------------------------------------------

    def _enter(self, rid: str):
        return (ctx.set_request_id(rid), ctx.set_principal(None))

    async def _admit(self, method: str, request, auth_header: str, public: bool) -> None:
        """What every call passes before its handler, after the database readiness check (and for
        streams, a slot): the caller, the caller's rate limit, and a request that decoded."""
        self._authenticate(auth_header, public)
        await self._rate_limit(method)
        _check_decoded(request)

    def _authenticate(self, auth_header: str, public: bool) -> None:
        if not auth_header:
            if public:
                return
            raise errors.Unauthenticated(
                "missing authorization: Bearer <access token>", reason="TOKEN_MISSING"
            )
        scheme, _, token = auth_header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            if public:
                return
            raise errors.Unauthenticated(
                "authorization must be 'Bearer <access token>'", reason="TOKEN_INVALID"
            )
        try:
            ctx.set_principal(self._verify(token.strip()))
        except errors.Unauthenticated:
            if not public:
                raise

    def _span(self, method: str, md: dict[str, str]):
        if self._tracing is None or not self._tracing.enabled:
            return contextlib.nullcontext()
        _, service, name = method.split("/")
        return self._tracing.tracer.start_as_current_span(
            method,
            context=self._tracing.extract(md),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def _check_ready(self) -> None:
        if self._draining is not None and self._draining():
            raise errors.Unavailable(
                "the server is shutting down; retry shortly", reason="SHUTTING_DOWN", retry_after=1.0
            )
        if self._ready is not None and not self._ready():
            raise errors.Unavailable(
                "the database is unreachable or not migrated; retry shortly",
                reason="DATABASE_UNAVAILABLE",
                retry_after=1.0,
            )

    async def _rate_limit(self, method: str) -> None:
        p = ctx.optional_principal()
        if p is None or self._limits is None:
            return
        service = method.split("/")[1]
        await self._limits.hit(
            f"rpc:{p.user_id}:{service}",
            limit=self._caps.rate_limit_per_minute,
            window_seconds=60,
            subject=f"user:{p.user_id}",
            what=f"calls to {service}",
        )

    def _take_stream_slot(self) -> None:
        """Admission of a new stream: refused at once while the process is full, its event loop is
        late or its database connections have a standing queue; else one of the process's stream
        slots is taken (give it back with `_release_stream_slot`)."""
        caps, admission = self._caps, self._admission
        if (
            self._loop_lag is not None
            and caps.max_loop_lag_seconds > 0
            and self._loop_lag() > caps.max_loop_lag_seconds
        ):
            admission.refused_elsewhere()
            self._overloaded("loop_lag")
        if self._db_wait is not None and 0 < caps.max_db_wait_seconds < self._db_wait():
            admission.refused_elsewhere()
            self._overloaded("database")
        cause = admission.take()
        if cause is not None:
            self._overloaded(cause)
        if self._metrics is not None:
            self._metrics.active_streams.inc()

    def _release_stream_slot(self, started: bool) -> None:
        self._admission.release(started=started)
        if self._metrics is not None:
            self._metrics.active_streams.dec()

    def _overloaded(self, cause: str):
        if self._metrics is not None:
            self._metrics.overload_refused(cause)
        raise errors.ResourceExhausted(
            "the server is at capacity; retry shortly",
            reason="SERVER_OVERLOADED",
            retry_after=self._admission.retry_after(),
        )

    @contextmanager
    def _user_stream_slot(self) -> Iterator[None]:
        p = ctx.optional_principal()
        user = p.user_id if p else None
        if user is None:
            yield
            return
        held = self._streams_by_user.get(user, 0)
        if held >= self._caps.max_streams_per_user:
            raise errors.ResourceExhausted(
                f"at most {self._caps.max_streams_per_user} open streams per user",
                reason="TOO_MANY_STREAMS",
                retry_after=1.0,
                violations=[errors.QuotaViolation(f"user:{user}", "concurrent streams")],
            )
        self._streams_by_user[user] = held + 1
        try:
            yield
        finally:
            left = self._streams_by_user[user] - 1
            if left:
                self._streams_by_user[user] = left
            else:
                del self._streams_by_user[user]

    async def _handle(self, exc: BaseException, context, rid: str, method: str) -> None:
        if isinstance(exc, errors.DomainError):
            await _abort(context, st.to_status(exc, rid), rid)
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            raise exc
        if isinstance(exc, NotImplementedError):  # a generated base servicer: the method is not there yet
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented", (("x-request-id", rid),)
            )
        err_log.error(
            "unhandled error in %s", method, exc_info=exc, extra={"request_id": rid, "method": method}
        )
        await _abort(context, st.internal_status(rid), rid)

    def _exit(
        self, tokens, method: str, code: grpc.StatusCode, start: float, rid: str, reason: str | None
    ) -> None:
        elapsed = time.perf_counter() - start
        p = ctx.optional_principal()
        log.info(
            "rpc",
            extra={
                "method": method,
                "code": code.name,
                "duration_ms": round(elapsed * 1000, 3),
                "request_id": rid,
                "user_id": str(p.user_id) if p else None,
                "reason": reason,
            },
        )
        if self._metrics is not None:
            self._metrics.rpc_done(method, code.name, elapsed, reason)
        try:
            ctx._request_id.reset(tokens[0])
            ctx._principal.reset(tokens[1])
        except ValueError:  # a stream closed from another context; its context dies with it
            pass


async def _abort(context, status: grpc.Status, rid: str) -> None:
    """End the call with `status`, its details and the request id in the trailers (raises)."""
    await context.abort(status.code, status.details, status.trailing_metadata + (("x-request-id", rid),))


def _end_span(span, code: grpc.StatusCode) -> None:
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            current.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
    span.__exit__(None, None, None)


def _code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, errors.DomainError):
        return st.code_of(exc)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL
