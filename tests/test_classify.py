"""The default classifier on the shapes errors really take (see DB-FAILURE-FACTS.md)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from resilient_db import (
    SQLSTATE_RULES,
    AttemptTimeout,
    BulkheadFull,
    CircuitOpenError,
    DeadlineExceeded,
    ErrorCategory,
    classify,
    find_sqlstate,
)


def wrapped(orig: BaseException) -> sa_exc.DBAPIError:
    """The SQLAlchemy 2.1 shape: the base DBAPIError, asyncpg error as __cause__ of orig."""
    adapted = Exception(str(orig))
    adapted.sqlstate = getattr(orig, "sqlstate", None)  # type: ignore[attr-defined]
    adapted.__cause__ = orig
    return sa_exc.DBAPIError("SELECT 1", {}, adapted)


def asyncpg_error(sqlstate: str) -> BaseException:
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)  # type: ignore[attr-defined]
    return cls("server said no")  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("sqlstate", "category", "retryable", "counts"),
    [
        ("40001", ErrorCategory.CONFLICT, True, False),
        ("40P01", ErrorCategory.CONFLICT, True, False),
        ("55P03", ErrorCategory.CONFLICT, True, False),
        ("57014", ErrorCategory.TIMEOUT, True, True),
        ("25006", ErrorCategory.CONNECTION, True, True),
        ("08003", ErrorCategory.CONNECTION, True, True),
        ("57P01", ErrorCategory.CONNECTION, True, True),
        ("53300", ErrorCategory.OVERLOAD, True, True),
        ("57P03", ErrorCategory.OVERLOAD, True, True),
        ("23505", ErrorCategory.PERMANENT, False, False),
        ("22012", ErrorCategory.PERMANENT, False, False),
        ("42601", ErrorCategory.PERMANENT, False, False),
        ("28P01", ErrorCategory.PERMANENT, False, False),
        ("3D000", ErrorCategory.PERMANENT, False, False),
        ("25P02", ErrorCategory.PERMANENT, False, False),
    ],
)
def test_sqlstates_through_sqlalchemy_21_shape(
    sqlstate: str, category: ErrorCategory, retryable: bool, counts: bool
) -> None:
    verdict = classify(wrapped(asyncpg_error(sqlstate)))
    assert (verdict.category, verdict.retryable, verdict.counts_for_breaker) == (
        category,
        retryable,
        counts,
    )
    assert verdict.sqlstate == sqlstate


def test_raw_asyncpg_connect_error_sqlalchemy_20_shape() -> None:
    verdict = classify(asyncpg_error("53300"))  # too many connections, unwrapped
    assert (verdict.category, verdict.sqlstate) == (ErrorCategory.OVERLOAD, "53300")


def test_read_only_transaction_flags_a_failover() -> None:
    assert classify(wrapped(asyncpg_error("25006"))).failover


def test_connection_closed_interface_error_is_connection_lost() -> None:
    orig = asyncpg.exceptions.InterfaceError("connection is closed")
    error = sa_exc.InterfaceError("SELECT 1", {}, orig, connection_invalidated=True)
    assert classify(error).category is ErrorCategory.CONNECTION


def test_invalidated_connection_without_sqlstate_is_connection_lost() -> None:
    error = sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert classify(error).category is ErrorCategory.CONNECTION


def test_pool_exhaustion_is_overload_neither_retried_nor_counted() -> None:
    verdict = classify(sa_exc.TimeoutError("QueuePool limit reached"))
    assert (verdict.category, verdict.retryable, verdict.counts_for_breaker) == (
        ErrorCategory.OVERLOAD,
        False,
        False,
    )


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        OSError(errno.EHOSTUNREACH, "no route"),
    ],
)
def test_os_level_connection_errors(error: OSError) -> None:
    assert classify(error).category is ErrorCategory.CONNECTION


def test_unrelated_os_errors_are_permanent() -> None:
    assert classify(FileNotFoundError(errno.ENOENT, "nope")).category is ErrorCategory.PERMANENT


@pytest.mark.parametrize("code", [5, 517, 518])  # 518 SQLITE_LOCKED_VTAB: by its primary, 6
def test_sqlite_busy_codes_are_conflicts(code: int) -> None:
    orig = sqlite3.OperationalError("database is locked")
    orig.sqlite_errorcode = code
    verdict = classify(sa_exc.OperationalError("INSERT", {}, orig))
    assert (verdict.category, verdict.sqlite_code) == (ErrorCategory.CONFLICT, code)


def test_cancellation_and_exit_are_cancelled() -> None:
    for error in (asyncio.CancelledError(), KeyboardInterrupt(), SystemExit()):
        assert classify(error).category is ErrorCategory.CANCELLED


def test_our_own_errors() -> None:
    assert classify(AttemptTimeout("t", 1.0)).retryable
    assert not classify(DeadlineExceeded("d", 1.0)).retryable
    rejected = classify(CircuitOpenError("db", 1.0))
    assert (rejected.retryable, rejected.counts_for_breaker) == (False, False)
    assert classify(BulkheadFull("b", 1, 0, "full")).category is ErrorCategory.OVERLOAD


def test_unknown_exceptions_are_permanent() -> None:
    assert classify(ValueError("bug")).category is ErrorCategory.PERMANENT


def test_find_sqlstate_walks_the_cause_chain() -> None:
    outer = RuntimeError("wrapper")
    outer.__cause__ = RuntimeError("middle")
    outer.__cause__.__cause__ = asyncpg_error("40001")
    assert find_sqlstate(outer) == "40001"


def test_every_rule_key_is_a_sqlstate_or_a_class() -> None:
    assert all(len(key) in (2, 5) for key in SQLSTATE_RULES)


@pytest.mark.parametrize("message", ["no active connection", "Connection closed"])
def test_aiosqlite_closed_connection_is_lost_and_nothing_was_sent(message: str) -> None:
    from resilient_db._classify import is_definitive_rejection

    orig = sqlite3.OperationalError(message)
    orig.__cause__ = ValueError(message)
    error = sa_exc.OperationalError("COMMIT", {}, orig, connection_invalidated=True)
    assert classify(error).category is ErrorCategory.CONNECTION
    assert is_definitive_rejection(error)


def test_asyncpg_connection_closed_before_sending_is_a_definitive_rejection() -> None:
    from resilient_db._classify import is_definitive_rejection

    orig = asyncpg.exceptions.InterfaceError("connection is closed")
    assert is_definitive_rejection(sa_exc.InterfaceError("COMMIT", {}, orig))
    lost = asyncpg.exceptions.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    )
    assert not is_definitive_rejection(sa_exc.DBAPIError("COMMIT", {}, lost))
