"""resilient-db: async database calls that survive failovers, blips and slow queries.

Timeouts, retries with backoff, circuit breakers and bulkheads for SQLAlchemy 2.x
async engines, built on what real databases do when they fail. Import everything
from here::

    from resilient_db import resilient

    @resilient(timeout=2, retries=3)
    async def place(order_id: str, amount: int) -> None: ...
"""

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
    "AttemptTimeout",
    "Backoff",
    "BreakerListener",
    "BreakerOutcome",
    "BreakerProtocol",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerTransition",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classification",
    "Classifier",
    "CommitOutcomeUnknown",
    "ConcurrentSessionUse",
    "DEFAULT",
    "DeadlineExceeded",
    "ErrorCategory",
    "GuardedConnection",
    "GuardedSession",
    "Policy",
    "ResilienceError",
    "ResilientEngine",
    "ResilientSessionmaker",
    "RetryBudget",
    "Rule",
    "SQLITE_RULES",
    "SQLSTATE_RULES",
    "TimeoutExceeded",
    "__version__",
    "classify",
    "deadline",
    "find_sqlite_code",
    "find_sqlstate",
    "get_breaker",
    "is_read_only",
    "registered_breakers",
    "remaining_time",
    "resilient",
    "resilient_engine",
]
