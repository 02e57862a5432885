"""The instrumentation hooks: what they are told, in which order, and what it costs when off."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind
from otel_support import Telemetry
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, table, text

from resilient_db import (
    AttemptEnded,
    AttemptStarted,
    AttemptTimeout,
    CircuitBreaker,
    CircuitOpenError,
    EventLoopLagProbe,
    InstrumentationEvent,
    OpenTelemetryInstrumentation,
    OperationEnded,
    OperationStarted,
    RetryScheduled,
    correlation_context,
    get_instrumentation,
    metric_views,
    resilient,
    set_instrumentation,
)
from resilient_db._instrument import _STATE, error_info, operation_name
from resilient_db._scope import current_scope

ROOT = Path(__file__).parent.parent


class Recorder:
    """A hook that writes down everything, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def enabled(self) -> bool:
        return True

    def operation_started(self, details: OperationStarted) -> str:
        self.calls.append(("operation_started", details))
        return "op-state"

    def attempt_started(self, operation: Any, details: AttemptStarted) -> str:
        self.calls.append(("attempt_started", (operation, details)))
        return f"attempt-{details.number}"

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        self.calls.append(("attempt_ended", (attempt, details)))

    def operation_ended(self, operation: Any, details: OperationEnded) -> None:
        self.calls.append(("operation_ended", (operation, details)))

    def event(self, operation: Any, event: InstrumentationEvent) -> None:
        self.calls.append(("event", (operation, event)))


class Broken(Recorder):
    def enabled(self) -> bool:
        return True

    def operation_started(self, details: OperationStarted) -> str:
        raise RuntimeError("operation_started")

    def attempt_started(self, operation: Any, details: AttemptStarted) -> str:
        raise RuntimeError("attempt_started")

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        raise RuntimeError("attempt_ended")

    def operation_ended(self, operation: Any, details: OperationEnded) -> None:
        raise RuntimeError("operation_ended")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    hook = Recorder()
    with set_instrumentation([hook]):
        yield hook


async def test_with_no_sdk_configured_no_operation_is_observed() -> None:
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    set_instrumentation(None)
    kinds = sorted(type(h).__name__ for h in get_instrumentation())
    assert kinds == ["LoggingInstrumentation", "OpenTelemetryInstrumentation"]
    scopes: list[Any] = []

    @resilient(timeout=1, breaker=False)
    async def unit() -> None:
        scopes.append(current_scope())

    await unit()
    assert _STATE.active == ()
    assert scopes[0].telemetry is None  # nothing allocated for instrumentation
    assert scopes[0].correlation_id is None  # nor an ID generated


async def test_hooks_see_operations_attempts_and_events_in_order(
    recorder: Recorder, no_waits: None
) -> None:
    attempts = 0

    @resilient(retries=2, breaker=False, name="flaky")
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionResetError("dropped")

    with correlation_context("req-1"):
        await flaky()
    names = [name for name, _ in recorder.calls]
    assert names == [
        "operation_started",
        "attempt_started",
        "attempt_ended",
        "event",
        "attempt_started",
        "attempt_ended",
        "operation_ended",
    ]
    started = recorder.calls[0][1]
    assert (started.name, started.correlation_id, started.target) == ("flaky", "req-1", None)
    first_end = recorder.calls[2][1]
    assert first_end[0] == "attempt-1"
    assert first_end[1].error_type == "ConnectionResetError"
    state, retry = recorder.calls[3][1]
    assert state == "op-state" and isinstance(retry, RetryScheduled)
    assert (retry.attempt, retry.correlation_id) == (1, "req-1")
    second = recorder.calls[4][1][1]
    assert second.number == 2 and second.backoff == retry.delay
    state, ended = recorder.calls[6][1]
    assert state == "op-state"
    assert (ended.attempts, ended.error, ended.error_type) == (2, None, None)


async def test_a_nested_guarded_call_is_part_of_the_outer_attempt(recorder: Recorder) -> None:
    @resilient(breaker=False)
    async def inner() -> int:
        return 1

    @resilient(breaker=False)
    async def outer() -> int:
        return await inner() + await inner()

    assert await outer() == 2
    assert [name for name, _ in recorder.calls].count("operation_started") == 1


async def test_a_breaker_rejection_is_an_event_for_every_hook(recorder: Recorder) -> None:
    breaker = CircuitBreaker("rejecting")
    breaker.force_open()

    @resilient(breaker=breaker, name="guarded")
    async def guarded() -> None: ...

    recorder.calls.clear()  # forget the transition to OPEN
    with pytest.raises(CircuitOpenError):
        await guarded()
    events = [call[1][1] for call in recorder.calls if call[0] == "event"]
    assert [(type(e).__name__, getattr(e, "breaker", None)) for e in events] == [
        ("BreakerRejected", "rejecting")
    ]
    ended = recorder.calls[-1][1][1]
    assert ended.error_type == "resilient_db.CircuitOpenError"


async def test_a_failing_hook_never_breaks_a_call_and_is_logged_once_per_method(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @resilient(breaker=False)
    async def unit() -> int:
        return 7

    with set_instrumentation([Broken()]), caplog.at_level(logging.DEBUG, logger="resilient_db"):
        assert [await unit(), await unit()] == [7, 7]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert sorted(str(r.args[1]) for r in errors if isinstance(r.args, tuple)) == [
        "attempt_ended",
        "attempt_started",
        "operation_ended",
        "operation_started",
    ]


def test_an_sdk_switched_off_by_its_environment_variable_leaves_the_hook_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry = Telemetry()
    assert telemetry.hook.enabled() is False


def test_set_instrumentation_refuses_what_is_not_a_hook_and_restores_in_with() -> None:
    with pytest.raises(TypeError, match="lacks"):
        set_instrumentation([object()])  # type: ignore[list-item]
    hook = Recorder()
    before = get_instrumentation()
    with set_instrumentation([hook]):
        assert get_instrumentation() == (hook,)
    assert [type(h) for h in get_instrumentation()] == [type(h) for h in before]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"query_text": 1}, TypeError),
        ({"statement_spans": "no"}, TypeError),
        ({"correlation_in_exemplars": None}, TypeError),
        ({"tracer_provider": "global"}, TypeError),
        ({"meter_provider": 3}, TypeError),
    ],
)
def test_otel_settings_are_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        OpenTelemetryInstrumentation(**kwargs)


class _DBAPIErrorWithCode(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__("boom")
        self.sqlstate = sqlstate


class _SQLiteError(Exception):
    sqlite_errorcode = 5


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (asyncio.CancelledError(), ("cancelled", None)),
        (AttemptTimeout("late", 1.0), ("timeout", None)),
        (TimeoutError(), ("timeout", None)),
        (sa_exc.DBAPIError("SELECT", {}, _DBAPIErrorWithCode("40001")), ("40001", "40001")),
        (sa_exc.OperationalError("BEGIN", {}, _SQLiteError()), ("5", "5")),
        (ValueError("x"), ("ValueError", None)),
        (CircuitOpenError("db", None), ("resilient_db.CircuitOpenError", None)),
        (sa_exc.TimeoutError("pool"), ("sqlalchemy.exc.TimeoutError", None)),
    ],
)
def test_error_type_and_status_code(exc: BaseException, expected: tuple[str, Any]) -> None:
    assert error_info(exc) == expected


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (select(table("t")), "SELECT"),
        (insert(table("t")), "INSERT"),
        (text("  update t set x = 1"), "UPDATE"),
        ("(SELECT 1) UNION (SELECT 2)", "SELECT"),
        ("/* hint */ SELECT 1", None),
        ("COMMIT;", "COMMIT"),
        (None, None),
    ],
)
def test_the_operation_name_is_the_sql_verb(statement: Any, expected: str | None) -> None:
    assert operation_name(statement) == expected


async def test_metrics_without_tracing_still_count_attempts() -> None:
    telemetry = Telemetry()
    telemetry.hook = OpenTelemetryInstrumentation(meter_provider=telemetry.meter_provider)

    @resilient(breaker=False, name="counted")
    async def counted() -> None: ...

    with telemetry.installed():
        await counted()
        await counted()
    assert telemetry.spans() == []
    assert telemetry.value("resilient_db.client.attempts", resilient_db__operation="counted") == 2
    assert telemetry.value("db.client.operation.duration", resilient_db__operation="counted") == 2


async def test_sampled_out_operations_record_metrics_and_no_spans() -> None:
    telemetry = Telemetry()
    telemetry.tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(telemetry.exporter))
    telemetry.hook = OpenTelemetryInstrumentation(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )

    @resilient(breaker=False, name="sampled-out")
    async def unit() -> None: ...

    with telemetry.installed():
        await unit()
    assert telemetry.spans() == []
    assert telemetry.value("db.client.operation.duration") == 1


def _current_span_per_attempt(
    provider: TracerProvider,
) -> tuple[list[trace.SpanContext], Callable[[], Awaitable[None]]]:
    """A unit that fails once, traced by ``provider``, and where the current span of
    each of its attempts is written down."""
    hook = OpenTelemetryInstrumentation(tracer_provider=provider)
    inside: list[trace.SpanContext] = []

    @resilient(breaker=False, retries=1, backoff=None, name="sampled-out")
    async def unit() -> None:
        inside.append(trace.get_current_span().get_span_context())
        if len(inside) == 1:
            raise ConnectionResetError("first attempt fails")

    async def run() -> None:
        with set_instrumentation([hook]):
            await unit()

    return inside, run


@pytest.mark.parametrize(
    "sampler", [ALWAYS_OFF, ParentBased(ALWAYS_OFF), TraceIdRatioBased(0.0)], ids=str
)
async def test_a_sampled_out_operation_starts_no_attempt_spans_and_children_follow(
    sampler: Sampler,
) -> None:
    inside, run = _current_span_per_attempt(TracerProvider(sampler=sampler))
    await run()
    first, second = inside
    # Both attempts ran under the operation's own span: no attempt span was started.
    assert first == second and first.is_valid and not first.trace_flags.sampled
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached afterwards


class ClientSpansOnly(Sampler):
    """Decides per span, not per trace: keeps CLIENT spans, drops the others."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        kind = kwargs.get("kind", args[3] if len(args) > 3 else None)
        return (ALWAYS_ON if kind is SpanKind.CLIENT else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "ClientSpansOnly"


async def test_a_custom_sampler_still_gets_to_decide_on_attempt_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ClientSpansOnly())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inside, run = _current_span_per_attempt(provider)
    await run()
    attempts = exporter.get_finished_spans()
    assert [s.name for s in attempts] == ["sampled-out attempt"] * 2  # the operation dropped
    assert [s.context.span_id for s in attempts] == [c.span_id for c in inside]


async def test_correlation_ids_go_to_exemplars_not_to_metric_streams() -> None:
    telemetry = Telemetry(views=metric_views(), correlation_in_exemplars=True)

    @resilient(breaker=False, name="exemplary")
    async def unit() -> None: ...

    with telemetry.installed(), correlation_context("req-exemplar"):
        await unit()
    (point,) = telemetry.points("db.client.operation.duration")
    assert "resilient_db.correlation_id" not in point.attributes
    assert point.attributes["resilient_db.operation"] == "exemplary"
    (exemplar,) = [e for e in point.exemplars if e.filtered_attributes]
    assert exemplar.filtered_attributes == {"resilient_db.correlation_id": "req-exemplar"}
    (operation,) = telemetry.spans("exemplary")
    assert exemplar.trace_id == operation.context.trace_id


async def test_the_loop_lag_probe_sees_a_blocked_loop(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry()
    with telemetry.installed(), caplog.at_level(logging.WARNING, logger="resilient_db"):
        async with EventLoopLagProbe(interval=0.02, warn_after=0.1, name="main") as probe:
            await asyncio.sleep(0.1)
            time.sleep(0.25)  # noqa: ASYNC251 - the point: block the loop
            await asyncio.sleep(0.1)
            peaks = [p.value for p in telemetry.points("resilient_db.event_loop.lag")]
            again = [p.value for p in telemetry.points("resilient_db.event_loop.lag")]
        assert not probe.running
    assert probe.samples >= 5
    assert 0.2 <= probe.max < 5
    assert len(peaks) == 1 and peaks[0] >= 0.2
    assert again[0] < 0.2  # the gauge reports the peak since its last reading
    (warning,) = [
        r for r in caplog.records if getattr(r, "resilient_db_event", "") == "event_loop_lag"
    ]
    assert warning.lag >= 0.2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"interval": 0}, ValueError),
        ({"interval": "1"}, TypeError),
        ({"warn_after": -1}, ValueError),
        ({"name": ""}, TypeError),
    ],
)
def test_loop_lag_settings_are_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        EventLoopLagProbe(**kwargs)


def test_the_loop_lag_probe_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        EventLoopLagProbe().start()


LATE_PROVIDER = """
    import asyncio, time
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from resilient_db import refresh_instrumentation, resilient

    @resilient(breaker=False)
    async def unit() -> None: ...

    async def main() -> None:
        exporter = InMemorySpanExporter()
        await unit()                    # no SDK yet: the hooks switch off
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        await unit()                    # still off: the flag is cached
        counts = [len(exporter.get_finished_spans())]
        if MODE == "refresh":
            refresh_instrumentation()
        else:
            time.sleep(1.05)
        await unit()
        counts.append(len(exporter.get_finished_spans()))
        print(counts)

    asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["refresh", "wait"])
def test_a_global_provider_set_after_the_first_call_is_picked_up(mode: str) -> None:
    script = f"MODE = {mode!r}\n" + textwrap.dedent(LATE_PROVIDER)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 2]"
