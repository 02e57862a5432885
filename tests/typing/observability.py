"""Never run: the observability API, type-checked as user code (``mypy --strict tests/typing``)."""

from __future__ import annotations

import logging
from typing import Any, assert_type

from resilient_db import (
    AttemptEnded,
    AttemptStarted,
    CorrelationIdFilter,
    CorrelationIdMiddleware,
    EventLoopLagProbe,
    InstrumentationEvent,
    InstrumentationHook,
    LoggingInstrumentation,
    OpenTelemetryInstrumentation,
    OperationEnded,
    OperationStarted,
    RetryScheduled,
    correlation_context,
    current_correlation_id,
    get_instrumentation,
    metric_views,
    refresh_instrumentation,
    set_instrumentation,
)


class CountingHook:
    """A user hook: counts retries per operation."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}

    def enabled(self) -> bool:
        return False

    def operation_started(self, details: OperationStarted) -> None:
        return None

    def attempt_started(self, operation: Any, details: AttemptStarted) -> None:
        return None

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        return None

    def operation_ended(self, operation: Any, details: OperationEnded) -> None:
        return None

    def event(self, operation: Any, event: InstrumentationEvent) -> None:
        if isinstance(event, RetryScheduled):
            self.retries[event.operation] = self.retries.get(event.operation, 0) + 1


def wiring() -> None:
    hook: InstrumentationHook = CountingHook()
    with set_instrumentation([LoggingInstrumentation(), OpenTelemetryInstrumentation(), hook]):
        refresh_instrumentation()
    assert_type(get_instrumentation(), tuple[InstrumentationHook, ...])
    with correlation_context("req-1") as request_id:
        assert_type(request_id, str)
    assert_type(current_correlation_id(), str)
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default="-"))
    views = metric_views()
    assert isinstance(views, list)
    OpenTelemetryInstrumentation(query_text="yes")  # type: ignore[arg-type]


async def serve(app: Any) -> None:
    wrapped = CorrelationIdMiddleware(app, header="X-Request-ID")
    async with EventLoopLagProbe(interval=0.25, warn_after=0.1) as probe:
        assert_type(probe.max, float)
    assert callable(wrapped)
