"""OpenTelemetry tracing of RPCs, database transactions and upstream model calls, when enabled
(EVERYTHING_OTEL_ENABLED). Off by default: then every tracer here is a no-op and costs nothing.

Exporters: "otlp" (OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT or EVERYTHING_OTEL_ENDPOINT),
"console", or "memory" (kept in process, for tests). Incoming W3C `traceparent` metadata continues
the caller's trace. Span attributes carry method names and status codes, never payloads or tokens.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    def __init__(
        self,
        *,
        enabled: bool,
        exporter: str = "otlp",
        endpoint: str | None = None,
        service_name: str = "everything-server",
    ):
        self.exporter: SpanExporter | None = None
        self._provider: TracerProvider | None = None
        if not enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter == "memory":
            self.exporter = InMemorySpanExporter()
            self._provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        elif exporter == "console":
            self.exporter = ConsoleSpanExporter()
            self._provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
            self._provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self._provider.get_tracer("everything_server")

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def extract(self, metadata: dict[str, str]):
        """The caller's trace context from gRPC metadata (traceparent/tracestate), if any."""
        return PROPAGATOR.extract(metadata) if self.enabled else None

    async def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
