"""An OpenTelemetry SDK in memory, handed to resilient-db's hook for one test.

The global providers are never touched (they can be set only once per process):
the hook gets its providers explicitly, through ``set_instrumentation``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient_db import LoggingInstrumentation, OpenTelemetryInstrumentation, set_instrumentation


class Telemetry:
    """Spans and metrics recorded in memory."""

    def __init__(self, *, views: Sequence[View] = (), **options: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], views=list(views))
        self.hook = OpenTelemetryInstrumentation(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        return spans if name is None else [s for s in spans if s.name == name]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        parent_id = parent.context.span_id
        children = [
            s for s in self.spans() if s.parent is not None and s.parent.span_id == parent_id
        ]
        return sorted(children, key=lambda s: s.start_time or 0)

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found

    def value(self, metric: str, **attributes: Any) -> float:
        """Sum of the points of ``metric`` whose attributes include ``attributes``."""
        total = 0.0
        wanted = {key.replace("__", "."): value for key, value in attributes.items()}
        for point in self.points(metric):
            if all(point.attributes.get(k) == v for k, v in wanted.items()):
                total += point.count if hasattr(point, "count") else point.value
        return total

    @contextmanager
    def installed(self) -> Iterator[Telemetry]:
        with set_instrumentation([LoggingInstrumentation(), self.hook]):
            yield self
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
