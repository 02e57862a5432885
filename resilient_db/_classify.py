"""What an exception means for a database call: retry it? count it against the database?

The default classifier knows the shapes errors take on the way up:

* asyncpg server errors reach SQLAlchemy code as the *base* ``DBAPIError`` (not
  ``OperationalError``); the reliable signal is the SQLSTATE on ``exc.orig`` or an
  exception in the ``__cause__`` chain (SQLAlchemy 2.0 and 2.1 both keep the
  asyncpg exception there). Connect-time errors arrive raw on SQLAlchemy 2.0.
* SQLite reports ``sqlite_errorcode`` (5 SQLITE_BUSY, 517 SQLITE_BUSY_SNAPSHOT...).
* A connection lost or killed shows as ``connection_invalidated``, asyncpg's
  "connection is closed", or a builtin ``OSError``.
* Pool exhaustion is ``sqlalchemy.exc.TimeoutError``: overload, neither retried
  (retrying amplifies saturation) nor counted by the breaker (the database may be
  perfectly healthy).

The full table is :data:`SQLSTATE_RULES` and is rendered in ``docs/errors.md``.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeAlias

from sqlalchemy import exc as sa_exc

from ._errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpenError,
    CommitOutcomeUnknown,
    ConcurrentSessionUse,
    DeadlineExceeded,
)

__all__ = [
    "SQLITE_RULES",
    "SQLSTATE_RULES",
    "Classification",
    "Classifier",
    "ErrorCategory",
    "Rule",
    "classify",
    "find_sqlite_code",
    "find_sqlstate",
]


class ErrorCategory(enum.Enum):
    """What kind of failure an exception is."""

    CONNECTION = "connection"
    """The connection was lost, refused or invalidated (08xxx, 57P01, a reset...)."""
    TIMEOUT = "timeout"
    """A time limit ran out: ours, ``asyncio``'s, or the server's ``statement_timeout``."""
    OVERLOAD = "overload"
    """Too much load: the server refuses connections, or our pool/bulkhead/breaker is full."""
    CONFLICT = "conflict"
    """A concurrency conflict the server resolved by aborting us: serialization, deadlock, lock."""
    PERMANENT = "permanent"
    """Retrying cannot help: constraint violations, bad SQL, bad data, auth, programming errors."""
    CANCELLED = "cancelled"
    """The caller was cancelled or the process is exiting; never retried, never counted."""


_CATEGORY_DEFAULTS: Final[dict[ErrorCategory, tuple[bool, bool]]] = {
    # category: (retryable, counts_for_breaker)
    ErrorCategory.CONNECTION: (True, True),
    ErrorCategory.TIMEOUT: (True, True),
    ErrorCategory.OVERLOAD: (False, False),
    ErrorCategory.CONFLICT: (True, False),
    ErrorCategory.PERMANENT: (False, False),
    ErrorCategory.CANCELLED: (False, False),
}


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one exception.

    Attributes:
        category: what kind of failure it is.
        retryable: whether a retry of the whole unit of work may succeed.
        counts_for_breaker: whether it is a sign of an unhealthy database that the
            circuit breaker should count as a failure.
        sqlstate: the PostgreSQL SQLSTATE, when there was one.
        sqlite_code: the SQLite extended result code, when there was one.
        reason: a short human-readable explanation (shown in retry notes).
        failover: the server refused a write as read-only (25006): the pool probably
            points at a demoted primary and should be emptied.
    """

    category: ErrorCategory
    retryable: bool
    counts_for_breaker: bool
    sqlstate: str | None = None
    sqlite_code: int | None = None
    reason: str = ""
    failover: bool = False

    @classmethod
    def of(
        cls,
        category: ErrorCategory,
        *,
        retryable: bool | None = None,
        counts_for_breaker: bool | None = None,
        reason: str = "",
    ) -> Classification:
        """Build a classification with the category's defaults.

        ======================  =========  ==================
        category                retryable  counts_for_breaker
        ======================  =========  ==================
        ``CONNECTION``          yes        yes
        ``TIMEOUT``             yes        yes
        ``OVERLOAD``            no         no
        ``CONFLICT``            yes        no
        ``PERMANENT``           no         no
        ``CANCELLED``           no         no
        ======================  =========  ==================

        Example, in a custom classifier::

            def classify_mine(exc: BaseException) -> Classification | None:
                if isinstance(exc, RateLimited):
                    return Classification.of(ErrorCategory.OVERLOAD, retryable=True)
                return None  # everything else: the default classifier decides
        """
        default_retry, default_count = _CATEGORY_DEFAULTS[category]
        return cls(
            category=category,
            retryable=default_retry if retryable is None else retryable,
            counts_for_breaker=default_count if counts_for_breaker is None else counts_for_breaker,
            reason=reason or category.value,
        )

    @property
    def is_database_answer(self) -> bool:
        """The database itself answered with this error (it is up and talking)."""
        return self.category in (ErrorCategory.CONFLICT, ErrorCategory.PERMANENT) and (
            self.sqlstate is not None or self.sqlite_code is not None
        )


Classifier: TypeAlias = Callable[[BaseException], Classification | None]
"""A user classifier: return a :class:`Classification`, or ``None`` to let the
default classifier decide."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the SQLSTATE / SQLite-code table."""

    category: ErrorCategory
    retryable: bool
    counts_for_breaker: bool
    name: str
    failover: bool = False


def _rule(
    category: ErrorCategory,
    name: str,
    *,
    retryable: bool | None = None,
    counts: bool | None = None,
    failover: bool = False,
) -> Rule:
    default_retry, default_count = _CATEGORY_DEFAULTS[category]
    return Rule(
        category=category,
        retryable=default_retry if retryable is None else retryable,
        counts_for_breaker=default_count if counts is None else counts,
        name=name,
        failover=failover,
    )


_C = ErrorCategory

SQLSTATE_RULES: Final[dict[str, Rule]] = {
    # Exact codes first; two-character keys are whole SQLSTATE classes.
    "40001": _rule(_C.CONFLICT, "serialization_failure"),
    "40P01": _rule(_C.CONFLICT, "deadlock_detected"),
    "55P03": _rule(_C.CONFLICT, "lock_not_available"),
    "57014": _rule(_C.TIMEOUT, "query_canceled (statement_timeout)"),
    "57P01": _rule(_C.CONNECTION, "admin_shutdown"),
    "57P02": _rule(_C.CONNECTION, "crash_shutdown"),
    "57P03": _rule(_C.OVERLOAD, "cannot_connect_now", retryable=True, counts=True),
    "57P04": _rule(_C.PERMANENT, "database_dropped"),
    "57P05": _rule(_C.CONNECTION, "idle_session_timeout"),
    "25006": _rule(_C.CONNECTION, "read_only_sql_transaction (failover?)", failover=True),
    "25P02": _rule(_C.PERMANENT, "in_failed_sql_transaction (symptom of an earlier error)"),
    "40003": _rule(_C.PERMANENT, "statement_completion_unknown"),
    "53400": _rule(_C.PERMANENT, "configuration_limit_exceeded"),
    "08": _rule(_C.CONNECTION, "connection_exception"),
    "53": _rule(_C.OVERLOAD, "insufficient_resources", retryable=True, counts=True),
    "58": _rule(_C.PERMANENT, "system_error (I/O)", counts=True),
    "XX": _rule(_C.PERMANENT, "internal_error", counts=True),
    "23": _rule(_C.PERMANENT, "integrity_constraint_violation"),
    "22": _rule(_C.PERMANENT, "data_exception"),
    "42": _rule(_C.PERMANENT, "syntax_error_or_access_rule_violation"),
    "28": _rule(_C.PERMANENT, "invalid_authorization_specification"),
    "3D": _rule(_C.PERMANENT, "invalid_catalog_name (no such database)"),
    "0A": _rule(_C.PERMANENT, "feature_not_supported"),
    "40": _rule(_C.PERMANENT, "transaction_rollback"),
    "25": _rule(_C.PERMANENT, "invalid_transaction_state"),
    "55": _rule(_C.PERMANENT, "object_not_in_prerequisite_state"),
    "57": _rule(_C.PERMANENT, "operator_intervention"),
}
"""SQLSTATE (exact code, or two-character class) → what we do. Anything else is permanent."""

SQLITE_RULES: Final[dict[int, Rule]] = {
    5: _rule(_C.CONFLICT, "SQLITE_BUSY"),
    261: _rule(_C.CONFLICT, "SQLITE_BUSY_RECOVERY"),
    517: _rule(_C.CONFLICT, "SQLITE_BUSY_SNAPSHOT"),
    773: _rule(_C.CONFLICT, "SQLITE_BUSY_TIMEOUT"),
    6: _rule(_C.CONFLICT, "SQLITE_LOCKED"),
    262: _rule(_C.CONFLICT, "SQLITE_LOCKED_SHAREDCACHE"),
    9: _rule(_C.TIMEOUT, "SQLITE_INTERRUPT"),
    13: _rule(_C.OVERLOAD, "SQLITE_FULL", counts=True),
}
"""SQLite extended result code → what we do. An extended code missing here falls back
to its primary code (the low 8 bits); anything else is permanent."""

_CONNECTION_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
    }
)

_EXIT_EXCEPTIONS: Final = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its DBAPI ``orig``, and its cause/context chain (bounded, no cycles)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 16:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            pending.append(orig)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)


def find_sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by ``exc`` or anything in its chain."""
    for item in _chain(exc):
        code = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def find_sqlite_code(exc: BaseException) -> int | None:
    """The SQLite extended result code carried by ``exc`` or anything in its chain."""
    for item in _chain(exc):
        code = getattr(item, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code
    return None


def _lookup_sqlstate(sqlstate: str) -> Rule | None:
    return SQLSTATE_RULES.get(sqlstate) or SQLSTATE_RULES.get(sqlstate[:2])


def _from_rule(
    rule: Rule, *, sqlstate: str | None = None, sqlite_code: int | None = None
) -> Classification:
    label = sqlstate if sqlstate is not None else f"sqlite {sqlite_code}"
    return Classification(
        category=rule.category,
        retryable=rule.retryable,
        counts_for_breaker=rule.counts_for_breaker,
        sqlstate=sqlstate,
        sqlite_code=sqlite_code,
        reason=f"{label} {rule.name}",
        failover=rule.failover,
    )


def _is_lost_connection(exc: BaseException) -> bool:
    for item in _chain(exc):
        if getattr(item, "connection_invalidated", False) is True:
            return True
        if isinstance(item, sa_exc.DisconnectionError):
            return True
        if isinstance(item, ConnectionError | socket.gaierror):
            return True
        if (
            isinstance(item, OSError)
            and not isinstance(item, TimeoutError)
            and item.errno in _CONNECTION_ERRNOS
        ):
            return True
        if _closed_before_sending(item):
            return True
        if type(item).__name__ == "ProgrammingError" and "closed database" in str(item):
            return True  # sqlite3 on a closed handle
    return False


def _closed_before_sending(item: BaseException) -> bool:
    """The driver refused to send anything because it knows the connection is dead.

    asyncpg raises ``InterfaceError("connection is closed")`` before writing to the
    socket; aiosqlite raises ``ValueError("no active connection" / "Connection
    closed")`` before queueing work for its thread (SQLAlchemy re-raises those as
    ``sqlite3.OperationalError``). Either way nothing reached the database.
    """
    name = type(item).__name__
    text = str(item).lower()
    if name == "InterfaceError":
        return "connection is closed" in text
    if name in ("ValueError", "OperationalError"):
        return text in ("no active connection", "connection closed")
    return False


def classify(exc: BaseException) -> Classification:
    """Classify an exception with resilient-db's default rules.

    >>> classify(TimeoutError()).category
    <ErrorCategory.TIMEOUT: 'timeout'>
    """
    if isinstance(exc, _EXIT_EXCEPTIONS):
        return Classification.of(ErrorCategory.CANCELLED, reason=type(exc).__name__)
    if isinstance(exc, AttemptTimeout):
        return Classification.of(ErrorCategory.TIMEOUT, reason="attempt timeout")
    if isinstance(exc, DeadlineExceeded):
        return Classification.of(ErrorCategory.TIMEOUT, retryable=False, reason="deadline exceeded")
    if isinstance(exc, CircuitOpenError | BulkheadFull):
        return Classification.of(ErrorCategory.OVERLOAD, reason=type(exc).__name__)
    if isinstance(exc, CommitOutcomeUnknown | ConcurrentSessionUse):
        return Classification.of(ErrorCategory.PERMANENT, reason=type(exc).__name__)
    if isinstance(exc, sa_exc.TimeoutError):
        return Classification.of(ErrorCategory.OVERLOAD, reason="connection pool exhausted")

    sqlstate = find_sqlstate(exc)
    if sqlstate is not None:
        rule = _lookup_sqlstate(sqlstate)
        if rule is not None:
            return _from_rule(rule, sqlstate=sqlstate)
        return Classification(
            ErrorCategory.PERMANENT, False, False, sqlstate=sqlstate, reason=f"{sqlstate}"
        )
    sqlite_code = find_sqlite_code(exc)
    if sqlite_code is not None:
        # An extended code without a rule of its own is judged by its primary code
        # (the low 8 bits), as SQLSTATEs fall back to their class.
        rule = SQLITE_RULES.get(sqlite_code) or SQLITE_RULES.get(sqlite_code & 0xFF)
        if rule is not None:
            return _from_rule(rule, sqlite_code=sqlite_code)
        if not _is_lost_connection(exc):
            return Classification(
                ErrorCategory.PERMANENT,
                False,
                False,
                sqlite_code=sqlite_code,
                reason=f"sqlite {sqlite_code}",
            )
    if _is_lost_connection(exc):
        return Classification.of(ErrorCategory.CONNECTION, reason="connection lost")
    if isinstance(exc, TimeoutError):
        return Classification.of(ErrorCategory.TIMEOUT, reason="timeout")
    return Classification.of(ErrorCategory.PERMANENT, reason=type(exc).__name__)


def resolve(classifier: Classifier | None, exc: BaseException) -> Classification:
    """Run a user classifier, falling back to :func:`classify` when it says ``None``.

    Exit exceptions are always CANCELLED, whatever a user classifier says: a retry
    predicate must never be able to swallow a cancellation or an interrupt.
    """
    if isinstance(exc, _EXIT_EXCEPTIONS):
        return Classification.of(ErrorCategory.CANCELLED, reason=type(exc).__name__)
    if classifier is not None:
        verdict = classifier(exc)
        if verdict is not None:
            if not isinstance(verdict, Classification):
                raise TypeError(
                    "a classifier must return a Classification or None; "
                    f"{classifier!r} returned {type(verdict).__name__}"
                )
            return verdict
    return classify(exc)


def is_definitive_rejection(exc: BaseException) -> bool:
    """The database answered an operation with an error: it certainly did not apply it.

    Used for COMMIT: an ErrorResponse to COMMIT (a serialization failure detected at
    commit, a deferred constraint) means the transaction was rolled back. A lost
    connection, a cancellation or a timeout during COMMIT means nobody knows.
    A driver that refused to send anything on a dead connection (asyncpg's
    "connection is closed", aiosqlite's "no active connection") is definitive too.
    """
    if isinstance(exc, (*_EXIT_EXCEPTIONS, TimeoutError)):
        return False
    if any(_closed_before_sending(item) for item in _chain(exc)):
        return True
    verdict = classify(exc)
    if verdict.category in (ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT):
        return False
    return verdict.sqlstate is not None or verdict.sqlite_code is not None
