"""OpenTelemetry spans and metrics for operations, attempts, retries and breakers.

Only opentelemetry-api is imported; the SDK (the ``otel`` extra) is what users
configure. The hook switches itself on when a real (SDK) provider is configured —
globally, or handed to it — and costs nothing before that (see ``_instrument``).

Spans, following the database semantic conventions:

* one ``INTERNAL`` span per observed operation, named ``{db.operation.name}
  {db.namespace}`` for a single statement, else after the unit of work;
* one ``CLIENT`` child span per attempt (``{operation} attempt``), current while the
  attempt runs, so spans of other instrumentations (asyncpg, httpx) nest inside it;
* per-statement ``CLIENT`` spans only with ``statement_spans=True`` (off by default,
  so that opentelemetry-instrumentation-asyncpg can run alongside without duplicates).

No exception message is recorded anywhere: SQLAlchemy's messages carry the bound
parameters. The SQLSTATE, ``error.type`` and the classification say what happened.

Metrics: the ``db.client.operation.duration`` histogram is recorded per operation
(with exemplars); counters are kept in-process and reported as observable counters,
so that counting an attempt costs a dictionary update, not an SDK measurement.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from . import _validate as v
from ._correlation import current_correlation_id
from ._instrument import (
    _STATE,
    AttemptEnded,
    AttemptStarted,
    BreakerRejected,
    DatabaseTarget,
    InstrumentationEvent,
    OperationEnded,
    OperationStarted,
    RetryScheduled,
    UnknownCommitOutcome,
    error_info,
    operation_name,
    target_for,
    tracked_breakers,
    tracked_engines,
)
from ._version import __version__
from .policies.breaker import BreakerState, BreakerTransition

__all__ = ["OpenTelemetryInstrumentation", "metric_views"]

SCOPE_NAME: Final = "resilient_db"

DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""The semantic conventions' advice for ``db.client.operation.duration``."""

CORRELATION_ID: Final = "resilient_db.correlation_id"

METRIC_KEYS: Final = frozenset(
    {
        "db.system.name",
        "db.namespace",
        "db.operation.name",
        "server.address",
        "server.port",
        "error.type",
        "db.response.status_code",
        "resilient_db.operation",
    }
)
"""Every attribute the duration histogram's streams are keyed by."""

_TRANSITION_EVENTS: Final = {
    BreakerState.OPEN: "breaker opened",
    BreakerState.HALF_OPEN: "breaker half-opened",
    BreakerState.CLOSED: "breaker closed",
}


def _real(provider: Any) -> Any:
    """The provider, or ``None`` for the API's own no-op and proxy providers."""
    module = type(provider).__module__
    if module.startswith(("opentelemetry.trace", "opentelemetry.metrics")):
        return None
    return provider


_TARGET_ATTRIBUTES: dict[int, tuple[DatabaseTarget, dict[str, Any]]] = {}


def _target_attributes(target: DatabaseTarget | None) -> dict[str, Any]:
    """A new dict with the semantic-convention attributes of ``target``."""
    if target is None:
        return {}
    # Targets are cached per engine URL, so the same few objects come back: look them
    # up by identity (hashing a dataclass costs more than copying the dict).
    found = _TARGET_ATTRIBUTES.get(id(target))
    if found is None or found[0] is not target:
        attributes: dict[str, Any] = {"db.system.name": target.system}
        if target.namespace is not None:
            attributes["db.namespace"] = target.namespace
        if target.address is not None:
            attributes["server.address"] = target.address
        if target.port is not None:
            attributes["server.port"] = target.port
        if len(_TARGET_ATTRIBUTES) > 256:
            _TARGET_ATTRIBUTES.clear()
        found = _TARGET_ATTRIBUTES[id(target)] = (target, attributes)
    return dict(found[1])


class _Op:
    """The hook's state for one operation."""

    __slots__ = (
        "attempt_name",
        "context",
        "correlation_id",
        "db_operation",
        "name",
        "span",
        "target",
    )

    def __init__(self, details: OperationStarted, span: Span | None) -> None:
        self.span = span
        self.context = None if span is None else trace.set_span_in_context(span)
        self.name = details.name
        self.attempt_name = details.name + " attempt"
        self.target = details.target
        self.db_operation = details.db_operation
        self.correlation_id = details.correlation_id


class _Counts:
    """Monotonic counts per attribute set, read by observable counters at collection."""

    __slots__ = ("attributes", "values")

    def __init__(self) -> None:
        self.values: dict[Any, int] = {}
        self.attributes: dict[Any, dict[str, Any]] = {}

    def add(self, key: Any, attributes: Callable[[], dict[str, Any]]) -> None:
        values = self.values
        count = values.get(key)
        if count is None:
            self.attributes[key] = attributes()
            values[key] = 1
        else:
            values[key] = count + 1

    def observe(self, options: CallbackOptions) -> Iterator[Observation]:
        # Collection may run in the exporter's thread: copy (atomic under the GIL) first.
        for key, value in self.values.copy().items():
            yield Observation(value, self.attributes[key])


class _Instruments:
    """The instruments of one meter (one MeterProvider)."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.duration = _histogram(
            meter,
            "db.client.operation.duration",
            "Duration of database operations, retries and backoff included.",
        )
        self.wait_time = _histogram(
            meter,
            "db.client.connection.wait_time",
            "Time to obtain a connection from a ResilientEngine pool, retries included.",
        )
        # opentelemetry-api < 1.26 cannot take the context an exemplar should point to.
        self.record_context = "context" in inspect.signature(self.duration.record).parameters
        self.attempts = _Counts()
        self.retries = _Counts()
        self.timeouts = _Counts()
        self.rejections = _Counts()
        self.unknown_commits = _Counts()
        counters = (
            ("resilient_db.client.attempts", "{attempt}", self.attempts, "Attempts started."),
            ("resilient_db.client.retries", "{retry}", self.retries, "Retries scheduled."),
            (
                "resilient_db.client.timeouts",
                "{attempt}",
                self.timeouts,
                "Attempts that timed out.",
            ),
            (
                "resilient_db.breaker.rejections",
                "{call}",
                self.rejections,
                "Attempts rejected by an open breaker.",
            ),
            (
                "resilient_db.client.commit_outcome_unknown",
                "{call}",
                self.unknown_commits,
                "Calls that ended with the outcome of a COMMIT unknown.",
            ),
        )
        for name, unit, counts, description in counters:
            meter.create_observable_counter(
                name, callbacks=[counts.observe], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "resilient_db.breaker.status",
            callbacks=[_observe_breakers],
            unit="1",
            description="1 for the state each circuit breaker is in, 0 for the others.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[_observe_connections],
            unit="{connection}",
            description="Connections of ResilientEngine pools, by state (used, idle).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[_observe_connection_limits],
            unit="{connection}",
            description="The most connections a ResilientEngine pool may open.",
        )
        meter.create_observable_gauge(
            "resilient_db.event_loop.lag",
            callbacks=[_observe_loop_lag],
            unit="s",
            description="Largest event-loop lag measured by each probe since the last reading.",
        )
        self._bases: dict[Any, tuple[dict[str, Any], tuple[Any, ...], Any]] = {}

    def base(
        self, target: DatabaseTarget | None, name: str, db_operation: str | None
    ) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """The attributes every metric of an operation carries, and a hashable key."""
        key = (id(target), name, db_operation)
        found = self._bases.get(key)
        if found is None or found[2] is not target:
            attributes = _target_attributes(target)
            if db_operation is not None:
                attributes["db.operation.name"] = db_operation
            attributes["resilient_db.operation"] = name
            if len(self._bases) > 1024:
                self._bases.clear()
            found = self._bases[key] = (attributes, key, target)
        return found[0], found[1]


def _children_follow(provider: Any) -> bool:
    """Whether the provider's sampler surely drops the children of a dropped span.

    True for the SDK's own samplers that do: the constant ones, the trace-ID ratio
    (a child has the same trace ID), and the parent-based ones with their default
    ``local_parent_not_sampled`` (drop). A custom sampler may decide per span (by
    kind, by name): then attempt spans are always started."""
    sampler = getattr(provider, "sampler", None)
    kind = type(sampler)
    if kind.__module__ != "opentelemetry.sdk.trace.sampling":
        return False
    if kind.__name__ in ("StaticSampler", "TraceIdRatioBased"):
        return True
    if kind.__name__ in ("ParentBased", "ParentBasedTraceIdRatio"):
        child = getattr(sampler, "_local_parent_not_sampled", None)
        return type(child).__name__ == "StaticSampler" and (
            getattr(getattr(child, "_decision", None), "name", None) == "DROP"
        )
    return False


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    """A histogram in seconds with the semantic conventions' bucket advice."""
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
    except TypeError:  # opentelemetry-api < 1.23 has no advisory parameter
        return meter.create_histogram(name, unit="s", description=description)


def _observe_breakers(options: CallbackOptions) -> Iterator[Observation]:
    for breaker in tracked_breakers():
        current = breaker.state
        for state in BreakerState:
            yield Observation(
                1 if state is current else 0,
                {
                    "resilient_db.breaker.name": breaker.name,
                    "resilient_db.breaker.state": state.value,
                },
            )


def _pool_rows() -> dict[str, list[int | None]]:
    """``name -> [used, idle, max]``, summed over distinct pools of the same name (one
    per event loop); engines wrapping the same pool count it once."""
    rows: dict[str, list[int | None]] = {}
    seen: set[int] = set()
    for engine in tracked_engines():
        for name, pool, used, idle, limit in engine._pool_usage():
            if id(pool) in seen:
                continue
            seen.add(id(pool))
            row = rows.setdefault(name, [0, 0, 0])
            row[0] = (row[0] or 0) + used
            row[1] = (row[1] or 0) + idle
            row[2] = None if limit is None or row[2] is None else row[2] + limit
    return rows


def _observe_connections(options: CallbackOptions) -> Iterator[Observation]:
    for name, (used, idle, _) in _pool_rows().items():
        pool = {"db.client.connection.pool.name": name}
        yield Observation(used or 0, {**pool, "db.client.connection.state": "used"})
        yield Observation(idle or 0, {**pool, "db.client.connection.state": "idle"})


def _observe_connection_limits(options: CallbackOptions) -> Iterator[Observation]:
    for name, (_, _, limit) in _pool_rows().items():
        if limit is not None:
            yield Observation(limit, {"db.client.connection.pool.name": name})


def _observe_loop_lag(options: CallbackOptions) -> Iterator[Observation]:
    from ._looplag import live_probes

    for probe in live_probes():
        yield Observation(probe._take_peak(), {"resilient_db.event_loop.probe": probe.name})


class OpenTelemetryInstrumentation:
    """Spans and metrics through OpenTelemetry (installed by default, idle without an SDK).

    Args:
        tracer_provider: the ``TracerProvider`` to use; ``None``: the global one,
            once one is set (``trace.set_tracer_provider``).
        meter_provider: likewise for metrics.
        query_text: add ``db.query.text`` (the SQL as sent, with placeholders:
            parameters are never recorded) to single-statement operations and
            statement spans. Off by default: SQL may embed literals.
        statement_spans: a ``CLIENT`` span per statement, for every SQLAlchemy
            engine in the process. Off by default; leave it off when
            opentelemetry-instrumentation-asyncpg (or -sqlalchemy) runs, which
            emit those spans already.
        correlation_in_exemplars: record ``resilient_db.correlation_id`` with each
            duration measurement, so that it appears in exemplars. Only together
            with :func:`metric_views` in your ``MeterProvider``: without those views
            every correlation ID would become a metric stream of its own.

    Example::

        from opentelemetry.sdk.trace import TracerProvider
        provider = TracerProvider()
        set_instrumentation(
            [LoggingInstrumentation(), OpenTelemetryInstrumentation(tracer_provider=provider)]
        )
    """

    __slots__ = (
        "_children_follow",
        "_instruments",
        "_meter_provider",
        "_mp",
        "_tp",
        "_tracer",
        "_tracer_provider",
        "correlation_in_exemplars",
        "query_text",
        "statement_spans",
    )

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        query_text: bool = False,
        statement_spans: bool = False,
        correlation_in_exemplars: bool = False,
    ) -> None:
        if tracer_provider is not None and not callable(
            getattr(tracer_provider, "get_tracer", None)
        ):
            raise TypeError(
                f"tracer_provider must be a TracerProvider or None; got {tracer_provider!r}"
            )
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(
                f"meter_provider must be a MeterProvider or None; got {meter_provider!r}"
            )
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.query_text = v.boolean("query_text", query_text)
        self.statement_spans = v.boolean("statement_spans", statement_spans)
        self.correlation_in_exemplars = v.boolean(
            "correlation_in_exemplars", correlation_in_exemplars
        )
        self._tp: Any = None
        self._mp: Any = None
        self._tracer: trace.Tracer | None = None
        self._children_follow = False
        self._instruments: _Instruments | None = None

    def __repr__(self) -> str:
        return (
            f"OpenTelemetryInstrumentation(tracing={self._tracer is not None}, "
            f"metrics={self._instruments is not None})"
        )

    # -- switching on -------------------------------------------------------------------

    def enabled(self) -> bool:
        """Whether a real tracer or meter provider is available (picks up new ones)."""
        tp = self._tracer_provider or _real(trace.get_tracer_provider())
        if tp is not self._tp:
            self._tp = tp
            tracer = None if tp is None else tp.get_tracer(SCOPE_NAME, __version__)
            # An SDK switched off (OTEL_SDK_DISABLED=true) hands out no-op tracers.
            self._tracer = None if isinstance(tracer, trace.NoOpTracer) else tracer
            self._children_follow = _children_follow(tp)
        mp = self._meter_provider or _real(metrics.get_meter_provider())
        if mp is not self._mp:
            self._mp = mp
            meter = None if mp is None else mp.get_meter(SCOPE_NAME, __version__)
            self._instruments = (
                None
                if meter is None or isinstance(meter, metrics.NoOpMeter)
                else _Instruments(meter)
            )
        if self.statement_spans and self._tracer is not None:
            _install_statement_spans(self)
        return self._tracer is not None or self._instruments is not None

    # -- operations and attempts --------------------------------------------------------

    def operation_started(self, details: OperationStarted) -> _Op:
        """Start the operation's span (not made current: the attempts are)."""
        tracer = self._tracer
        span = None
        if tracer is not None:
            attributes = _target_attributes(details.target)
            if details.db_operation is not None:
                attributes["db.operation.name"] = details.db_operation
            attributes["resilient_db.operation"] = details.name
            attributes[CORRELATION_ID] = details.correlation_id
            if details.pool_name is not None:
                attributes["db.client.connection.pool.name"] = details.pool_name
            span = tracer.start_span(details.name, kind=SpanKind.INTERNAL, attributes=attributes)
        return _Op(details, span)

    def attempt_started(self, operation: _Op | None, details: AttemptStarted) -> Any:
        """Start the attempt's span and make it current."""
        tracer = self._tracer
        if operation is None or operation.span is None or tracer is None:
            return (None, None, operation)
        context = operation.context
        if context is not None and self._children_follow and not operation.span.is_recording():
            # Sampled out, by a sampler that decides the same for a child: an attempt
            # span would be dropped too. Make the operation's span current instead, so
            # that spans started inside the attempt (asyncpg instrumentation, the
            # caller's) inherit the decision and the trace.
            return (None, otel_context.attach(context), operation)
        attributes = _target_attributes(operation.target)
        attributes["resilient_db.attempt"] = details.number
        attributes[CORRELATION_ID] = operation.correlation_id
        if details.number > 1:
            attributes["resilient_db.backoff.delay"] = details.backoff
            if details.retry_budget is not None:
                attributes["resilient_db.retry_budget.available"] = details.retry_budget
        if details.deadline_remaining is not None:
            attributes["resilient_db.deadline.remaining"] = details.deadline_remaining
        state = details.breaker_state
        if state is not None and state is not BreakerState.CLOSED:
            # Absent means closed (or no breaker): two attributes less on the happy path.
            attributes["resilient_db.breaker.name"] = details.breaker
            attributes["resilient_db.breaker.state"] = state.value
        span = tracer.start_span(
            operation.attempt_name,
            context=operation.context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return (span, token, operation)

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        """End the attempt's span; count the attempt."""
        span, token, operation = attempt if attempt is not None else (None, None, None)
        try:
            if span is not None:
                self._finish(span, details, operation, details.query_text)
        finally:
            if token is not None:
                otel_context.detach(token)
        instruments = self._instruments
        if instruments is not None and operation is not None:
            attributes, key = instruments.base(
                details.target, operation.name, operation.db_operation
            )
            error_type = details.error_type
            instruments.attempts.add((key, error_type), lambda: _with_error(attributes, error_type))
            if error_type == "timeout":
                instruments.timeouts.add(key, lambda: dict(attributes))

    def operation_ended(self, operation: _Op | None, details: OperationEnded) -> None:
        """End the operation's span; record its duration."""
        if operation is None:
            return
        span = operation.span
        if span is not None:
            self._finish(span, details, operation, details.query_text)
        instruments = self._instruments
        if instruments is not None and details.pool_name is not None and details.error is None:
            # A checkout that got its connection is no database operation: its time
            # goes to the pool's metric, where it does not drag the operations'
            # percentiles down. A failed one stays an operation (``connect`` with its
            # error.type), so that error rates keep seeing an outage where only
            # checkouts fail.
            pool = {"db.client.connection.pool.name": details.pool_name}
            instruments.wait_time.record(details.duration, pool)
        elif instruments is not None:
            attributes, _ = instruments.base(details.target, details.name, details.db_operation)
            if details.error_type is not None:
                attributes = _with_error(attributes, details.error_type, details.status_code)
            if self.correlation_in_exemplars:
                attributes = {**attributes, CORRELATION_ID: details.correlation_id}
            if instruments.record_context and operation.context is not None:
                instruments.duration.record(details.duration, attributes, context=operation.context)
            else:
                instruments.duration.record(details.duration, attributes)

    def _finish(
        self,
        span: Span,
        details: AttemptEnded | OperationEnded,
        operation: _Op | None,
        query_text: str | None,
    ) -> None:
        if span.is_recording():
            attributes: dict[str, Any] = {}
            if operation is not None and operation.target is None and details.target is not None:
                attributes.update(_target_attributes(details.target))
            if details.error_type is not None:
                attributes["error.type"] = details.error_type
            if details.status_code is not None:
                attributes["db.response.status_code"] = details.status_code
            if details.commit_outcome is not None:
                attributes["resilient_db.commit.outcome"] = details.commit_outcome
            if isinstance(details, OperationEnded) and details.attempts != 1:
                attributes["resilient_db.attempts"] = details.attempts
            if query_text is not None and self.query_text:
                attributes["db.query.text"] = query_text
            if attributes:
                span.set_attributes(attributes)
            if details.error is not None:
                span.set_status(Status(StatusCode.ERROR, details.error_type))
        span.end()

    # -- rare events --------------------------------------------------------------------

    def event(self, operation: _Op | None, event: InstrumentationEvent) -> None:
        """Span events and counters for retries, breakers and unknown commits."""
        instruments = self._instruments
        if isinstance(event, RetryScheduled):
            if operation is not None and operation.span is not None:
                attributes: dict[str, Any] = {
                    "resilient_db.attempt": event.attempt,
                    "resilient_db.backoff.delay": event.delay,
                    "error.type": event.error_type,
                }
                if event.retry_budget is not None:
                    attributes["resilient_db.retry_budget.available"] = event.retry_budget
                operation.span.add_event("retry scheduled", attributes)
            if instruments is not None:
                target = None if operation is None else operation.target
                db_operation = None if operation is None else operation.db_operation
                base, key = instruments.base(target, event.operation, db_operation)
                error_type = event.error_type
                instruments.retries.add((key, error_type), lambda: _with_error(base, error_type))
        elif isinstance(event, BreakerTransition):
            span = trace.get_current_span()
            if self._tracer is not None and span.is_recording():
                span.add_event(
                    _TRANSITION_EVENTS[event.new],
                    {
                        "resilient_db.breaker.name": event.breaker,
                        "resilient_db.breaker.state": event.new.value,
                        "resilient_db.breaker.previous_state": event.old.value,
                        "resilient_db.breaker.reason": event.reason,
                    },
                )
        elif isinstance(event, BreakerRejected):
            span = trace.get_current_span()
            if self._tracer is not None and span.is_recording():
                attributes = {"resilient_db.breaker.name": event.breaker}
                if event.retry_after is not None:
                    attributes["resilient_db.breaker.retry_after"] = event.retry_after
                span.add_event("rejected by breaker", attributes)
            if instruments is not None:
                name = event.breaker
                instruments.rejections.add(name, lambda: {"resilient_db.breaker.name": name})
        elif isinstance(event, UnknownCommitOutcome):
            if operation is not None and operation.span is not None:
                attributes = {"resilient_db.commit.outcome": "unknown"}
                if event.xid is not None:
                    attributes["resilient_db.commit.xid"] = str(event.xid)
                operation.span.add_event("commit outcome unknown", attributes)
            if instruments is not None:
                target = None if operation is None else operation.target
                base, key = instruments.base(target, event.operation, None)
                instruments.unknown_commits.add(key, lambda: dict(base))


def _with_error(
    attributes: dict[str, Any], error_type: str | None, status_code: str | None = None
) -> dict[str, Any]:
    if error_type is None:
        return dict(attributes)
    extended = {**attributes, "error.type": error_type}
    if status_code is not None:
        extended["db.response.status_code"] = status_code
    return extended


def metric_views() -> list[Any]:
    """OpenTelemetry SDK ``View``\\ s for ``MeterProvider(views=...)``.

    They key the duration histogram's streams by :data:`METRIC_KEYS` only, so
    that ``resilient_db.correlation_id`` (recorded with
    ``OpenTelemetryInstrumentation(correlation_in_exemplars=True)``) lands in the
    exemplars instead of creating a stream per request. Needs opentelemetry-sdk.
    """
    from opentelemetry.sdk.metrics.view import View

    return [
        View(
            instrument_name="db.client.operation.duration",
            meter_name=SCOPE_NAME,
            attribute_keys=set(METRIC_KEYS),
        )
    ]


# -- per-statement spans (opt-in) -------------------------------------------------------


class _StatementSpans:
    __slots__ = ("hook", "installed", "lock")

    def __init__(self) -> None:
        self.hook: OpenTelemetryInstrumentation | None = None
        self.installed = False
        self.lock = threading.Lock()


_STATEMENTS: Final = _StatementSpans()
_SPAN_KEY: Final = "_resilient_db_statement_span"


def _install_statement_spans(hook: OpenTelemetryInstrumentation) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    with _STATEMENTS.lock:
        _STATEMENTS.hook = hook
        if _STATEMENTS.installed:
            return
        event.listen(Engine, "before_cursor_execute", _statement_started)
        event.listen(Engine, "after_cursor_execute", _statement_ended)
        event.listen(Engine, "handle_error", _statement_failed)
        _STATEMENTS.installed = True


def _statement_hook() -> OpenTelemetryInstrumentation | None:
    hook = _STATEMENTS.hook
    if hook is None or hook._tracer is None or not hook.statement_spans:
        return None
    # Only while the hook is installed and enabled.
    return hook if any(active is hook for active in _STATE.active) else None


def _statement_started(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    hook = _statement_hook()
    if hook is None or context is None or hook._tracer is None:
        return
    target = target_for(conn)
    verb = operation_name(statement)
    namespace = target.namespace if target is not None else None
    if verb and namespace:
        name = f"{verb} {namespace}"
    else:
        name = verb or namespace or (target.system if target is not None else "statement")
    attributes = _target_attributes(target)
    if verb is not None:
        attributes["db.operation.name"] = verb
    attributes[CORRELATION_ID] = current_correlation_id()
    if hook.query_text:
        attributes["db.query.text"] = statement
    if executemany:
        attributes["resilient_db.executemany"] = True
    span = hook._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    setattr(context, _SPAN_KEY, span)


def _statement_ended(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    span = getattr(context, _SPAN_KEY, None)
    if span is not None:
        delattr(context, _SPAN_KEY)
        span.end()


def _statement_failed(exception_context: Any) -> None:
    context = exception_context.execution_context
    span = getattr(context, _SPAN_KEY, None) if context is not None else None
    if span is None:
        return
    delattr(context, _SPAN_KEY)
    error_type, status = error_info(exception_context.original_exception)
    attributes = {"error.type": error_type}
    if status is not None:
        attributes["db.response.status_code"] = status
    span.set_attributes(attributes)
    span.set_status(Status(StatusCode.ERROR, error_type))
    span.end()
