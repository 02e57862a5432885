"""Watch COMMITs and in-flight statements, so retries never repeat committed work
and timeouts are hard bounds.

A decorated function is the unit of retry, and the decorator does not see the
engine it uses. So resilient-db listens, at class level, to three cheap
SQLAlchemy events (each fires once per transaction, never per statement):

* ``commit`` fires just before COMMIT is sent: the running attempt records it;
* ``handle_error`` with no statement on a connection whose COMMIT is pending is
  the COMMIT's own failure: a definitive answer from the database (an
  ErrorResponse, e.g. a serialization failure detected at commit) means it did not
  commit; anything else (connection lost, cancelled) leaves it ambiguous;
* ``begin``/``rollback`` on that connection afterwards prove the COMMIT returned.

The retry policy then refuses to retry an attempt during which a COMMIT was sent
and not definitively rejected, unless the caller declared the unit idempotent —
this also covers SQLAlchemy 2.1, where ``sessionmaker.begin()`` runs COMMIT to
completion under a shield and re-raises the cancellation *after* it committed.

Two more listeners fire per statement, and only do work inside an attempt that
has a time limit (or, once per observed operation, to tell the instrumentation
which database it talks to): ``before_cursor_execute`` registers the SQLAlchemy
connection as busy for the attempt, ``after_cursor_execute`` unregisters it. When
the attempt's time runs out, those connections are aborted at the driver level
(see ``_abort``) instead of waiting for SQLAlchemy's graceful 2-second close. A
connection closed since (``Connection.close()`` cuts its link to the pooled
connection, which may belong to someone else by then) or invalidated is never
aborted.

Inside a guarded call, a 25006 (read-only transaction) on a write is turned into a
disconnect for SQLAlchemy, which then invalidates the whole pool: after a
failover, the pool must stop handing out connections to the demoted primary.

Outside a guarded call the listeners return at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine, ExceptionContext

from ._classify import _lookup_sqlstate, find_sqlstate, is_definitive_rejection
from ._scope import _SCOPE, CommitStatus

__all__ = ["install_commit_tracking", "uninstall_commit_tracking"]

logger = logging.getLogger("resilient_db")

_installed = False
_lock = threading.Lock()


def _register(conn: Connection, attempt: Any) -> None:
    inflight = attempt.inflight
    if inflight is None:
        attempt.inflight = {conn: None}
    else:
        inflight[conn] = None


def _on_commit(conn: Connection) -> None:
    scope = _SCOPE.get()
    if scope is None or not scope.in_call:
        return
    scope.attempt.record_commit(conn)
    if scope.attempt.timers:
        _register(conn, scope.attempt)


def _on_before_execute(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    scope = _SCOPE.get()
    if scope is not None:
        if scope.attempt.timers:
            _register(conn, scope.attempt)
        op = (scope.root or scope).telemetry
        if op is not None and op.wants_statement:
            # An observed operation learns its database (and, for a single
            # statement, its SQL) from its first statement.
            op.note_statement(conn, statement)


def _on_after_execute(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    scope = _SCOPE.get()
    if scope is not None:
        scope.attempt.unregister_inflight(conn)


def _on_handle_error(context: ExceptionContext) -> None:
    scope = _SCOPE.get()
    if scope is None or not scope.in_call:
        return
    code = None if context.is_disconnect else find_sqlstate(context.original_exception)
    rule = None if code is None else _lookup_sqlstate(code)
    if rule is not None and rule.failover:
        # A write refused as read-only (25006, the rule table's failover flag): the
        # pool probably points at a demoted primary after a failover. Treat it as a
        # disconnect, so that SQLAlchemy invalidates this connection and every other
        # one of its generation in the pool (each is closed and replaced at its next
        # checkout, in its own loop).
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = True
        logger.warning(
            "write refused by a read-only server (%s): invalidating the pool",
            code,
            extra={"resilient_db_event": "failover"},
        )
    scope.attempt.unregister_inflight(context.connection)
    if context.statement is not None:
        return
    record = scope.attempt.pending_commit(context.connection)
    if record is None:
        return
    record.error = context.original_exception
    if is_definitive_rejection(context.original_exception):
        record.status = CommitStatus.REJECTED
    else:
        record.status = CommitStatus.AMBIGUOUS


def _on_later_use(conn: Connection) -> None:
    scope = _SCOPE.get()
    if scope is None or not scope.in_call:
        return
    attempt = scope.attempt
    if attempt.commits:
        record = attempt.pending_commit(conn)
        if record is not None:
            record.status = CommitStatus.RETURNED
    attempt.unregister_inflight(conn)


_LISTENERS: tuple[tuple[type[Any], str, Any], ...] = (
    (Engine, "commit", _on_commit),
    (Engine, "handle_error", _on_handle_error),
    (Engine, "begin", _on_later_use),
    (Engine, "rollback", _on_later_use),
    (Engine, "before_cursor_execute", _on_before_execute),
    (Engine, "after_cursor_execute", _on_after_execute),
)


_FLAGGED: tuple[type[Any], ...] = (Engine, Dialect)
"""The classes whose ``_has_events`` flag a class-level listener sets: ``Engine``
(the connection events) and ``Dialect`` (``handle_error``)."""

_flags_before: dict[type[Any], bool] = {}


def _class_listeners_left(cls: type[Any]) -> bool:
    """Whether any class-level listener is still registered on ``cls``'s events
    (``True`` when SQLAlchemy's internals do not say: then nothing is reset)."""
    try:
        return any(
            any(getattr(cls.dispatch, name)._clslevel.values())
            for name in cls.dispatch._event_names
        )
    except AttributeError:
        return True


def install_commit_tracking() -> None:
    """Install the class-level listeners once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        for cls in _FLAGGED:
            _flags_before[cls] = bool(getattr(cls, "_has_events", False))
        for target, name, fn in _LISTENERS:
            event.listen(target, name, fn)
        _installed = True


def uninstall_commit_tracking() -> None:
    """Remove the listeners (benchmarks use it for a truly raw baseline).

    Removing a listener does not clear the class flag that listening set, and with
    ``Engine._has_events`` set every connection of every engine takes SQLAlchemy's
    event-dispatching path (a joined dispatcher per connection, looked up at each
    event point) even with no listener left: the flags go back to what they were
    before :func:`install_commit_tracking` when no class-level listener remains.
    """
    global _installed
    with _lock:
        if not _installed:
            return
        for target, name, fn in _LISTENERS:
            event.remove(target, name, fn)
        for cls in _FLAGGED:
            if not _flags_before.get(cls, True) and not _class_listeners_left(cls):
                cls._has_events = False
        _installed = False
