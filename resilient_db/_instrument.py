"""Instrumentation: what resilient-db reports, to whom, and what it costs when nobody listens.

A hook (:class:`InstrumentationHook`) is told about every *observed operation* —
a decorated call, a unit of work, a statement or a checkout run through
:class:`ResilientEngine` — and each of its attempts, and about rare events
(a retry scheduled, a breaker transition or rejection, a COMMIT whose outcome is
unknown). The policy calls the dispatch functions below; it never imports a
telemetry library.

Default hooks: :class:`LoggingInstrumentation` (always) and
:class:`OpenTelemetryInstrumentation` (opentelemetry-api is a core dependency; the
hook only switches itself on when a real SDK provider is configured). Replace them
with :func:`set_instrumentation`.

Zero cost when off: operations are observed only while some hook's ``enabled()``
says so. Whether any does is cached, and re-evaluated at most once a second
(``REFRESH_INTERVAL``, on ``time.monotonic``) when an operation starts — so an
OpenTelemetry provider configured after the first database call is picked up
within a second — and at once by :func:`set_instrumentation` and
:func:`refresh_instrumentation`. With no hook enabled, a guarded call allocates
nothing for instrumentation: one clock read and two attribute loads.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias

from ._classify import _EXIT_EXCEPTIONS, find_sqlite_code, find_sqlstate
from ._correlation import current_correlation_id
from ._errors import CircuitOpenError, CommitOutcomeUnknown
from ._scope import AttemptState, CallScope, CommitStatus, _get_scope
from .policies.breaker import (
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    _add_transition_observer,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "AttemptEnded",
    "AttemptStarted",
    "CommitOutcome",
    "DatabaseTarget",
    "InstrumentationEvent",
    "InstrumentationHook",
    "BreakerRejected",
    "OperationEnded",
    "OperationStarted",
    "RetryScheduled",
    "UnknownCommitOutcome",
    "get_instrumentation",
    "refresh_instrumentation",
    "set_instrumentation",
]

logger = logging.getLogger("resilient_db")

REFRESH_INTERVAL: Final = 1.0
"""Seconds between re-evaluations of the hooks' ``enabled()`` (see the module docstring)."""

CommitOutcome: TypeAlias = Literal["committed", "rejected", "unknown"]
"""What is known of the COMMITs an attempt sent: it returned, the server refused it
(nothing was committed), or nobody knows (the work may be durable)."""


_SYSTEM_NAMES: Final = {"mssql": "microsoft.sql_server", "oracle": "oracle.db"}


# -- what hooks are told ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    """The database an operation talks to, in OpenTelemetry's terms.

    Attributes:
        system: ``db.system.name`` (``"postgresql"``, ``"sqlite"``...).
        namespace: ``db.namespace``: the database name (the file, for SQLite).
        address: ``server.address``: host name or IP (``None`` for SQLite).
        port: ``server.port``, when the URL gives one.
    """

    system: str
    namespace: str | None = None
    address: str | None = None
    port: int | None = None

    @classmethod
    def from_url(cls, url: URL, dialect_name: str | None = None) -> DatabaseTarget:
        """Build from a SQLAlchemy URL (credentials are never read)."""
        name = dialect_name or url.get_backend_name()
        system = _SYSTEM_NAMES.get(name, name)
        port = url.port
        if port is None and system == "postgresql" and url.host:
            port = 5432
        return cls(system, url.database or None, url.host or None, port)


@dataclass(frozen=True, slots=True)
class OperationStarted:
    """An observed operation begins.

    Attributes:
        name: a low-cardinality name: ``{db.operation.name} {db.namespace}`` for a
            single statement (``"SELECT orders"``), else the unit of work's name (the
            policy's ``name=``, or the function's qualified name).
        correlation_id: the correlation ID the operation runs under.
        target: the database, when known at the start (always through
            :class:`ResilientEngine`; learned from the first statement otherwise, and
            reported again at the end).
        db_operation: ``db.operation.name`` (``"SELECT"``), for single statements.
        pool_name: for a pool checkout (``ResilientEngine.connect()``), the pool's
            ``db.client.connection.pool.name``; ``None`` for database operations.
    """

    name: str
    correlation_id: str
    target: DatabaseTarget | None
    db_operation: str | None
    pool_name: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """An attempt of an observed operation begins.

    Attributes:
        number: 1 for the first attempt.
        backoff: seconds waited before this attempt (0.0 for the first).
        deadline_remaining: seconds left before the call's deadline, if it has one.
        breaker: the name of the breaker guarding the attempt, if any.
        breaker_state: that breaker's state as the attempt begins, when it has one.
        retry_budget: tokens left in the retry budget (retries only).
    """

    number: int
    backoff: float
    deadline_remaining: float | None
    breaker: str | None
    breaker_state: BreakerState | None
    retry_budget: float | None


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    """An attempt ended.

    Attributes:
        number: the attempt's number.
        duration: seconds, on the policy's clock.
        error: what it raised, or ``None``.
        error_type: ``error.type``: the SQLSTATE (or SQLite code), ``"timeout"``,
            ``"cancelled"``, or the exception's qualified class name.
        status_code: ``db.response.status_code``: the SQLSTATE (or SQLite code).
        commit_outcome: what is known of the COMMITs it sent (``None``: none sent).
        target: the database, when known.
        query_text: the first SQL statement sent, for single-statement operations.
    """

    number: int
    duration: float
    error: BaseException | None
    error_type: str | None
    status_code: str | None
    commit_outcome: CommitOutcome | None
    target: DatabaseTarget | None
    query_text: str | None


@dataclass(frozen=True, slots=True)
class OperationEnded:
    """An observed operation ended (the caller gets its result or ``error`` now).

    Attributes are those of :class:`AttemptEnded`, for the operation as a whole,
    plus ``name``, ``correlation_id``, ``db_operation``, ``pool_name`` (as in
    :class:`OperationStarted`) and ``attempts`` (how many attempts were started).
    """

    name: str
    correlation_id: str
    duration: float
    attempts: int
    error: BaseException | None
    error_type: str | None
    status_code: str | None
    commit_outcome: CommitOutcome | None
    target: DatabaseTarget | None
    db_operation: str | None
    query_text: str | None
    pool_name: str | None = None


@dataclass(frozen=True, slots=True)
class PoolCheckout:
    """What a pool checkout operation runs, in place of a statement: which pool."""

    pool_name: str


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """A failed attempt will be retried after ``delay`` seconds.

    Attributes:
        operation: the operation's name.
        correlation_id: its correlation ID.
        attempt: the number of the attempt that failed.
        delay: the backoff before the next attempt (seconds).
        error: the failed attempt's error; ``error_type``: as in :class:`AttemptEnded`.
        reason: why it is retried (the classification).
        retry_budget: tokens left in the retry budget after this retry, if any.
    """

    operation: str
    correlation_id: str
    attempt: int
    delay: float
    error: BaseException
    error_type: str
    reason: str
    retry_budget: float | None


@dataclass(frozen=True, slots=True)
class BreakerRejected:
    """A breaker rejected an attempt (nothing was sent to the database).

    Attributes:
        breaker: the breaker's name.
        retry_after: seconds until it admits a probe, when known.
        operation: the operation's name, inside an observed operation.
        correlation_id: the correlation ID of the rejected call.
    """

    breaker: str
    retry_after: float | None
    operation: str | None
    correlation_id: str


@dataclass(frozen=True, slots=True)
class UnknownCommitOutcome:
    """A COMMIT was sent and its outcome could not be established.

    Reported once per call that ends this way: with
    :class:`~resilient_db.CommitOutcomeUnknown`, or cancelled after sending a COMMIT
    (``cancelled=True``: the cancellation propagates, the work may be durable).

    Attributes:
        operation: the operation's name.
        correlation_id: its correlation ID.
        cause: the class name of the error that interrupted the COMMIT, if any.
        status_code: its SQLSTATE, if any.
        xid: the PostgreSQL transaction id, when captured.
        status: what ``pg_xact_status`` said, when verified.
        cancelled: the call was cancelled rather than failed.
    """

    operation: str
    correlation_id: str
    cause: str | None
    status_code: str | None
    xid: int | None
    status: str | None
    cancelled: bool


InstrumentationEvent: TypeAlias = (
    RetryScheduled | BreakerRejected | BreakerTransition | UnknownCommitOutcome
)
"""The rare events every hook is told about, enabled or not."""


class InstrumentationHook(Protocol):
    """What resilient-db reports to (logging, OpenTelemetry, your own metrics).

    ``operation_started`` returns whatever the hook wants handed back for that
    operation (its span, a start time...), and ``attempt_started`` likewise for the
    attempt. Operation and attempt callbacks run in the task making the call, in
    order; they are only called while ``enabled()`` (cached, see
    :func:`refresh_instrumentation`) returns ``True``. ``event`` is always called,
    with the hook's operation state (or ``None``). A hook that raises is logged and
    ignored: it never breaks a database call.
    """

    def enabled(self) -> bool:
        """Whether operation and attempt callbacks are wanted now."""
        ...

    def operation_started(self, details: OperationStarted) -> Any:
        """An operation begins; return this hook's state for it."""
        ...

    def attempt_started(self, operation: Any, details: AttemptStarted) -> Any:
        """An attempt begins; return this hook's state for it."""
        ...

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        """An attempt ended."""
        ...

    def operation_ended(self, operation: Any, details: OperationEnded) -> None:
        """The operation ended."""
        ...

    def event(self, operation: Any, event: InstrumentationEvent) -> None:
        """A rare event; ``operation`` is this hook's state, or ``None`` outside one."""
        ...


_METHODS: Final = (
    "enabled",
    "operation_started",
    "attempt_started",
    "attempt_ended",
    "operation_ended",
    "event",
)


# -- the installed hooks ----------------------------------------------------------------


class _State:
    __slots__ = ("active", "custom", "hooks", "recheck_at")

    def __init__(self) -> None:
        self.hooks: tuple[InstrumentationHook, ...] = ()
        self.active: tuple[InstrumentationHook, ...] = ()
        self.recheck_at = 0.0
        self.custom = False


_STATE: Final = _State()
_FAILED: set[tuple[int, str]] = set()


def default_hooks() -> tuple[InstrumentationHook, ...]:
    """Logging, and OpenTelemetry (idle until an SDK provider is configured)."""
    from ._logging import LoggingInstrumentation
    from ._otel import OpenTelemetryInstrumentation

    return (LoggingInstrumentation(), OpenTelemetryInstrumentation())


class _InstrumentationSwitch:
    """Returned by :func:`set_instrumentation`; restores the previous hooks in ``with``."""

    def __init__(self, previous: tuple[InstrumentationHook, ...] | None) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        set_instrumentation(self._previous)


def set_instrumentation(
    hooks: Iterable[InstrumentationHook] | None = None,
) -> _InstrumentationSwitch:
    """Replace the instrumentation hooks, process-wide (``None``: the defaults).

    Usable as a context manager, which restores the previous hooks on exit::

        otel = OpenTelemetryInstrumentation(tracer_provider=provider, query_text=True)
        set_instrumentation([LoggingInstrumentation(), otel])

    An empty list turns everything off, the log lines of :class:`LoggingInstrumentation`
    included (breakers still log their own transitions).
    """
    previous = _STATE.hooks if _STATE.custom else None
    if hooks is None:
        _STATE.hooks = default_hooks()
        _STATE.custom = False
    else:
        chosen = tuple(hooks)
        for hook in chosen:
            missing = [m for m in _METHODS if not callable(getattr(hook, m, None))]
            if missing:
                raise TypeError(
                    f"hooks must implement InstrumentationHook; {hook!r} lacks {missing}"
                )
        _STATE.hooks = chosen
        _STATE.custom = True
    refresh_instrumentation()
    return _InstrumentationSwitch(previous)


def get_instrumentation() -> tuple[InstrumentationHook, ...]:
    """The hooks currently installed."""
    if not _STATE.hooks and not _STATE.custom:
        _STATE.hooks = default_hooks()
    return _STATE.hooks


def refresh_instrumentation() -> None:
    """Ask every hook's ``enabled()`` now instead of within the next second.

    Call it after configuring an OpenTelemetry provider if the very next database
    call must be traced.
    """
    active = []
    for hook in get_instrumentation():
        try:
            if hook.enabled():
                active.append(hook)
        except Exception as exc:
            _hook_failed(hook, "enabled", exc)
    _STATE.active = tuple(active)
    _STATE.recheck_at = time.monotonic() + REFRESH_INTERVAL


def _hook_failed(hook: object, method: str, exc: Exception) -> None:
    key = (id(hook), method)
    if key in _FAILED:
        logger.debug("instrumentation hook %r failed in %s: %r", hook, method, exc)
        return
    _FAILED.add(key)
    logger.error(
        "instrumentation hook %r failed in %s (ignored; later failures are logged at DEBUG)",
        hook,
        method,
        exc_info=exc,
    )


# -- facts about errors and commits -----------------------------------------------------


def error_info(exc: BaseException) -> tuple[str, str | None]:
    """``(error.type, db.response.status_code)`` for an exception."""
    if isinstance(exc, _EXIT_EXCEPTIONS):
        return "cancelled", None
    code = find_sqlstate(exc)
    if code is None:
        sqlite = find_sqlite_code(exc)
        if sqlite is not None:
            code = str(sqlite)
    if isinstance(exc, TimeoutError):
        return "timeout", code
    if code is not None:
        return code, code
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__, None
    if module.startswith("resilient_db."):
        module = "resilient_db"  # the public name, not the private module
    return f"{module}.{cls.__qualname__}", None


def commit_outcome(attempt: AttemptState, failed: bool) -> CommitOutcome | None:
    """What is known of the COMMITs an attempt sent (``None``: it sent none)."""
    commits = attempt.commits
    if not commits:
        return None
    statuses = {record.status for record in commits}
    if CommitStatus.AMBIGUOUS in statuses or (failed and CommitStatus.PENDING in statuses):
        return "unknown"
    if statuses == {CommitStatus.REJECTED}:
        return "rejected"
    return "committed"


_SQL_VERB_SKIP: Final = frozenset({"/*", "--"})


_VERBS_BY_CONSTRUCT: Final = {
    "select": "SELECT",
    "compound_select": "SELECT",
    "insert": "INSERT",
    "update": "UPDATE",
    "delete": "DELETE",
}


def operation_name(statement: Any) -> str | None:
    """``db.operation.name`` for a statement: its SQL verb, uppercased (``None``
    when it cannot be read cheaply: statements are never compiled for this)."""
    if statement is None:
        return None
    if isinstance(statement, str):
        sql = statement
    else:
        text = getattr(statement, "text", None)  # TextClause
        if not isinstance(text, str):
            visit = getattr(statement, "__visit_name__", None)
            return _VERBS_BY_CONSTRUCT.get(visit) if isinstance(visit, str) else None
        sql = text
    words = sql.lstrip("( \t\r\n").split(None, 1)
    if not words or words[0][:2] in _SQL_VERB_SKIP:
        return None
    verb = words[0].rstrip(";").upper()
    return verb if verb.isalpha() else None


# -- one observed operation -------------------------------------------------------------


class _Operation:
    """The dispatch record of one observed operation (stored on the root scope)."""

    __slots__ = (
        "attempt_states",
        "attempts",
        "backoff",
        "clock",
        "correlation_id",
        "db_operation",
        "hooks",
        "name",
        "pool_name",
        "query_text",
        "start",
        "states",
        "target",
        "wants_statement",
    )

    def __init__(
        self,
        hooks: tuple[InstrumentationHook, ...],
        clock: Callable[[], float],
        start: float,
        name: str,
        correlation_id: str,
        target: DatabaseTarget | None,
        db_operation: str | None,
        pool_name: str | None = None,
    ) -> None:
        self.hooks = hooks
        self.clock = clock
        self.start = start
        self.name = name
        self.correlation_id = correlation_id
        self.target = target
        self.db_operation = db_operation
        self.pool_name = pool_name
        self.query_text: str | None = None
        self.wants_statement = target is None or db_operation is not None
        self.attempts = 0
        self.backoff = 0.0
        self.states: list[Any] = []
        self.attempt_states: list[Any] = []
        details = OperationStarted(name, correlation_id, target, db_operation, pool_name)
        for hook in hooks:
            try:
                state = hook.operation_started(details)
            except Exception as exc:
                _hook_failed(hook, "operation_started", exc)
                state = None
            self.states.append(state)

    def state_of(self, hook: InstrumentationHook) -> Any:
        for index, candidate in enumerate(self.hooks):
            if candidate is hook:
                return self.states[index]
        return None

    def note_statement(self, target_of: Any, statement: str) -> None:
        """The first statement of the operation: learn the target and the query text."""
        if self.target is None:
            self.target = target_for(target_of)
        if self.db_operation is not None and self.query_text is None:
            self.query_text = statement
        self.wants_statement = False

    def attempt_started(self, scope: CallScope, breaker: Any, budget: Any) -> None:
        self.attempts += 1
        number = scope.attempt_number
        # Adapters may read their state from remote storage: only ours is asked.
        state = breaker.state if isinstance(breaker, CircuitBreaker) else None
        details = AttemptStarted(
            number,
            self.backoff,
            scope.remaining(),
            None if breaker is None else breaker.name,
            state,
            None if number == 1 or budget is None else budget.available,
        )
        states = self.attempt_states
        states.clear()
        for index, hook in enumerate(self.hooks):
            try:
                states.append(hook.attempt_started(self.states[index], details))
            except Exception as exc:
                _hook_failed(hook, "attempt_started", exc)
                states.append(None)

    def attempt_ended(self, scope: CallScope, started: float, error: BaseException | None) -> None:
        if error is None:
            error_type = status = None
        else:
            error_type, status = error_info(error)
        details = AttemptEnded(
            scope.attempt_number,
            self.clock() - started,
            error,
            error_type,
            status,
            commit_outcome(scope.attempt, error is not None),
            self.target,
            self.query_text,
        )
        states = self.attempt_states
        for index, hook in enumerate(self.hooks):
            try:
                hook.attempt_ended(states[index] if index < len(states) else None, details)
            except Exception as exc:
                _hook_failed(hook, "attempt_ended", exc)

    def ended(self, scope: CallScope, error: BaseException | None) -> None:
        if error is None:
            error_type = status = None
        else:
            error_type, status = error_info(error)
        outcome = commit_outcome(scope.attempt, error is not None)
        if isinstance(error, CommitOutcomeUnknown):
            outcome = "unknown"
        details = OperationEnded(
            self.name,
            self.correlation_id,
            self.clock() - self.start,
            self.attempts,
            error,
            error_type,
            status,
            outcome,
            self.target,
            self.db_operation,
            self.query_text,
            self.pool_name,
        )
        for index, hook in enumerate(self.hooks):
            try:
                hook.operation_ended(self.states[index], details)
            except Exception as exc:
                _hook_failed(hook, "operation_ended", exc)


def begin(
    scope: CallScope,
    clock: Callable[[], float],
    start: float,
    label: Any,
    target: DatabaseTarget | None,
    statement: Any,
) -> _Operation:
    """Start observing the operation of ``scope`` (a root scope); only when active."""
    name, db_operation = describe(label, target, statement)
    correlation_id = current_correlation_id()
    pool_name = statement.pool_name if isinstance(statement, PoolCheckout) else None
    op = _Operation(
        _STATE.active, clock, start, name, correlation_id, target, db_operation, pool_name
    )
    scope.telemetry = op
    return op


def describe(label: Any, target: DatabaseTarget | None, statement: Any) -> tuple[str, str | None]:
    """An operation's name and ``db.operation.name``: ``SELECT orders`` for a single
    statement, else ``label`` (a name, or a function named by its qualified name)."""
    db_operation = (
        None
        if statement is _NO_STATEMENT or isinstance(statement, PoolCheckout)
        else operation_name(statement)
    )
    if db_operation is not None:
        namespace = target.namespace if target is not None else None
        return (f"{db_operation} {namespace}" if namespace else db_operation), db_operation
    if isinstance(label, str):
        return label, None
    return (_qualified_name(label) if label is not None else "call"), None


def _qualified_name(fn: Any) -> str:
    """``OrderRepo.place``; for a function defined in a function, from there on."""
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        return repr(fn)
    return name.rpartition("<locals>.")[2]


_NO_STATEMENT: Final[Any] = object()
"""Passed as ``statement`` for operations that are not a single statement."""


def _current_operation(scope: CallScope | None) -> _Operation | None:
    if scope is None:
        return None
    op = scope.top().telemetry
    return op if isinstance(op, _Operation) else None


def _emit(op: _Operation | None, event: InstrumentationEvent) -> None:
    for hook in get_instrumentation():
        state = op.state_of(hook) if op is not None else None
        try:
            hook.event(state, event)
        except Exception as exc:
            _hook_failed(hook, "event", exc)


def retry_scheduled(
    scope: CallScope,
    name: str,
    attempt: int,
    delay: float,
    error: BaseException,
    reason: str,
    budget: Any,
) -> None:
    op = _current_operation(scope)
    if op is not None:
        op.backoff = delay
    correlation_id = current_correlation_id()
    _emit(
        op,
        RetryScheduled(
            op.name if op is not None else name,
            correlation_id,
            attempt,
            delay,
            error,
            error_info(error)[0],
            reason,
            None if budget is None else budget.available,
        ),
    )


def breaker_rejected(scope: CallScope, error: CircuitOpenError) -> None:
    op = _current_operation(scope)
    correlation_id = current_correlation_id()
    _emit(
        op,
        BreakerRejected(
            error.breaker, error.retry_after, op.name if op is not None else None, correlation_id
        ),
    )


def commit_outcome_unknown(
    scope: CallScope,
    name: str,
    error: CommitOutcomeUnknown | None,
    cause: BaseException | None,
    *,
    cancelled: bool = False,
) -> None:
    op = _current_operation(scope)
    correlation_id = current_correlation_id()
    _emit(
        op,
        UnknownCommitOutcome(
            op.name if op is not None else name,
            correlation_id,
            None if cause is None else type(cause).__name__,
            None if cause is None else find_sqlstate(cause),
            None if error is None else error.xid,
            None if error is None else error.status,
            cancelled,
        ),
    )


def _on_breaker_transition(transition: BreakerTransition) -> None:
    _emit(_current_operation(_get_scope()), transition)


_add_transition_observer(_on_breaker_transition)


# -- what the metric callbacks read -----------------------------------------------------

_BREAKERS: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()
_TARGETS: dict[tuple[Any, str], DatabaseTarget] = {}


def track_breaker(breaker: object) -> None:
    """Report this breaker's state in the breaker-state gauge."""
    if isinstance(breaker, CircuitBreaker):
        _BREAKERS.add(breaker)


def tracked_breakers() -> list[CircuitBreaker]:
    from .policies.breaker import registered_breakers

    seen = {id(b): b for b in list(_BREAKERS)}
    for breaker in registered_breakers().values():
        seen.setdefault(id(breaker), breaker)
    return list(seen.values())


def track_engine(engine: Any) -> None:
    """Report this ResilientEngine's pools in the connection-count metrics."""
    _ENGINES.add(engine)


def tracked_engines() -> list[Any]:
    return list(_ENGINES)


_TARGETS_BY_ENGINE: weakref.WeakKeyDictionary[Any, DatabaseTarget | None] = (
    weakref.WeakKeyDictionary()
)


def target_for(connection_or_engine: Any) -> DatabaseTarget | None:
    """The target of a SQLAlchemy (sync) connection or engine, cached per engine."""
    engine = getattr(connection_or_engine, "engine", connection_or_engine)
    try:
        return _TARGETS_BY_ENGINE[engine]
    except (KeyError, TypeError):
        pass
    url = getattr(engine, "url", None)
    dialect = getattr(getattr(engine, "dialect", None), "name", None)
    target = None
    if url is not None and isinstance(dialect, str):
        key = (url, dialect)
        target = _TARGETS.get(key)
        if target is None:
            if len(_TARGETS) > 256:
                _TARGETS.clear()
            target = _TARGETS[key] = DatabaseTarget.from_url(url, dialect)
    with contextlib.suppress(TypeError):  # not weak-referenceable: just not cached
        _TARGETS_BY_ENGINE[engine] = target
    return target
