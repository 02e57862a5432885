"""Watch COMMITs on every SQLAlchemy engine, so retries never repeat committed work.

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

Outside a guarded call the listeners return at once.
"""

from __future__ import annotations

import threading

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from ._classify import is_definitive_rejection
from ._scope import _SCOPE, CommitStatus

__all__ = ["install_commit_tracking", "uninstall_commit_tracking"]

_installed = False
_lock = threading.Lock()


def _on_commit(conn: Connection) -> None:
    scope = _SCOPE.get()
    if scope is None or not scope.in_call:
        return
    scope.attempt.record_commit(conn)


def _on_handle_error(context: ExceptionContext) -> None:
    if context.statement is not None:
        return
    scope = _SCOPE.get()
    if scope is None or not scope.in_call:
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
    record = scope.attempt.pending_commit(conn)
    if record is not None:
        record.status = CommitStatus.RETURNED


def install_commit_tracking() -> None:
    """Install the class-level listeners once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        event.listen(Engine, "commit", _on_commit)
        event.listen(Engine, "handle_error", _on_handle_error)
        event.listen(Engine, "begin", _on_later_use)
        event.listen(Engine, "rollback", _on_later_use)
        _installed = True


def uninstall_commit_tracking() -> None:
    """Remove the listeners (benchmarks use it for a truly raw baseline)."""
    global _installed
    with _lock:
        if not _installed:
            return
        event.remove(Engine, "commit", _on_commit)
        event.remove(Engine, "handle_error", _on_handle_error)
        event.remove(Engine, "begin", _on_later_use)
        event.remove(Engine, "rollback", _on_later_use)
        _installed = False
