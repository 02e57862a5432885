"""OpenTelemetry SDK on and off in one process, so both can run in the same rounds.

The OpenTelemetry API lets a process install its global providers only once, and
resilient-db's OpenTelemetry hook stays idle as long as the global providers are
the API's own no-op ones — the state of a process that never configured
OpenTelemetry. So the benchmark never installs global providers ("tracing off" is
exactly that idle state), and switches "tracing on" through the library's public
hook API, handing it a real SDK::

    set_instrumentation([LoggingInstrumentation(),
                         OpenTelemetryInstrumentation(tracer_provider=sdk,
                                                      meter_provider=sdk_meters)])

The SDK is what production runs: a ``TracerProvider`` with a ``BatchSpanProcessor``
exporting to an exporter that discards the spans (the numbers measure
instrumentation, not a backend), and a ``MeterProvider`` with an
``InMemoryMetricReader``. A second span processor counts the spans ended under
each variant's label, so the report shows spans per operation: whether the code
under test emits spans at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from resilient_db import (
    InstrumentationHook,
    LoggingInstrumentation,
    OpenTelemetryInstrumentation,
    set_instrumentation,
)

__all__ = ["Telemetry", "install"]


class DiscardingExporter(SpanExporter):
    """Exports nowhere; counts what it was given."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class _CountingProcessor(SpanProcessor):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def on_end(self, span: ReadableSpan) -> None:
        telemetry = self._telemetry
        telemetry.spans[telemetry.label] += 1
        telemetry.span_names[span.name] += 1


class Telemetry:
    """The SDK, the switch, and what the SDK saw."""

    def __init__(self) -> None:
        self.on = False
        self.label = ""
        self.spans: Counter[str] = Counter()
        self.span_names: Counter[str] = Counter()
        self.exporter = DiscardingExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer_provider.add_span_processor(_CountingProcessor(self))
        self.metric_reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader])
        self.sdk_tracer = self.tracer_provider.get_tracer("bench")
        self.library_hooks = _library_hooks(self.tracer_provider, self.meter_provider)

    def switch(self, on: bool, label: str) -> None:
        """Hand the SDK to resilient-db (``on``) or leave it idle; count under ``label``."""
        self.label = label
        if on == self.on:
            return
        self.on = on
        set_instrumentation(self.library_hooks if on else None)

    def metric_names(self) -> list[str]:
        """Names of the metrics the SDK recorded so far."""
        data = self.metric_reader.get_metrics_data()
        names: set[str] = set()
        if data is not None:
            for resource in data.resource_metrics:
                for scope in resource.scope_metrics:
                    names.update(metric.name for metric in scope.metrics)
        return sorted(names)

    def flush(self) -> None:
        self.tracer_provider.force_flush()

    def shutdown(self) -> None:
        self.switch(False, "")
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _library_hooks(
    tracer_provider: TracerProvider, meter_provider: MeterProvider
) -> list[InstrumentationHook]:
    return [
        LoggingInstrumentation(),
        OpenTelemetryInstrumentation(
            tracer_provider=tracer_provider, meter_provider=meter_provider
        ),
    ]


def install() -> Telemetry:
    """The process's telemetry switch (tracing off until switched on)."""
    return Telemetry()
