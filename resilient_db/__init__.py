"""resilient-db: async database calls that survive failovers, blips and slow queries.

Timeouts, retries with backoff, circuit breakers and bulkheads for SQLAlchemy 2.x
async engines, built on what real databases do when they fail. Import everything
from here::

    from resilient_db import resilient

    @resilient(timeout=2, retries=3)
    async def place(order_id: str, amount: int) -> None: ...

Spans, metrics and correlation IDs for every operation, attempt, retry and breaker
transition come with it: see ``docs/observability.md``.
"""

from ._asgi import CorrelationIdMiddleware
from ._classify import (
    SQLITE_RULES,
    SQLSTATE_RULES,
    Classification,
    Classifier,
    ErrorCategory,
    Rule,
    classify,
    find_sqlite_code,
    find_sqlstate,
)
from ._correlation import correlation_context, current_correlation_id
from ._engine import (
    GuardedConnection,
    GuardedSession,
    ResilientEngine,
    ResilientSessionmaker,
    is_read_only,
    resilient_engine,
)
from ._errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpenError,
    CommitOutcomeUnknown,
    ConcurrentSessionUse,
    DeadlineExceeded,
    ResilienceError,
    TimeoutExceeded,
)
from ._instrument import (
    AttemptEnded,
    AttemptStarted,
    BreakerRejected,
    CommitOutcome,
    DatabaseTarget,
    InstrumentationEvent,
    InstrumentationHook,
    OperationEnded,
    OperationStarted,
    RetryScheduled,
    UnknownCommitOutcome,
    get_instrumentation,
    refresh_instrumentation,
    set_instrumentation,
)
from ._logging import CorrelationIdFilter, LoggingInstrumentation
from ._looplag import EventLoopLagProbe
from ._otel import OpenTelemetryInstrumentation, metric_views
from ._policy import DEFAULT, Policy, resilient
from ._version import __version__
from .policies.aiobreaker_adapter import AiobreakerAdapter
from .policies.breaker import (
    BreakerListener,
    BreakerOutcome,
    BreakerProtocol,
    BreakerSnapshot,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    get_breaker,
    registered_breakers,
)
from .policies.budget import RetryBudget
from .policies.bulkhead import Bulkhead
from .policies.retry import Backoff
from .policies.timeout import deadline, remaining_time

__all__ = [
    "AiobreakerAdapter",
    "AttemptEnded",
    "AttemptStarted",
    "AttemptTimeout",
    "Backoff",
    "BreakerListener",
    "BreakerOutcome",
    "BreakerProtocol",
    "BreakerRejected",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerTransition",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classification",
    "Classifier",
    "CommitOutcome",
    "CommitOutcomeUnknown",
    "ConcurrentSessionUse",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "DEFAULT",
    "DatabaseTarget",
    "DeadlineExceeded",
    "ErrorCategory",
    "EventLoopLagProbe",
    "GuardedConnection",
    "GuardedSession",
    "InstrumentationEvent",
    "InstrumentationHook",
    "LoggingInstrumentation",
    "OpenTelemetryInstrumentation",
    "OperationEnded",
    "OperationStarted",
    "Policy",
    "ResilienceError",
    "ResilientEngine",
    "ResilientSessionmaker",
    "RetryBudget",
    "RetryScheduled",
    "Rule",
    "SQLITE_RULES",
    "SQLSTATE_RULES",
    "TimeoutExceeded",
    "UnknownCommitOutcome",
    "__version__",
    "classify",
    "correlation_context",
    "current_correlation_id",
    "deadline",
    "find_sqlite_code",
    "find_sqlstate",
    "get_breaker",
    "get_instrumentation",
    "is_read_only",
    "metric_views",
    "refresh_instrumentation",
    "registered_breakers",
    "remaining_time",
    "resilient",
    "resilient_engine",
    "set_instrumentation",
]
