"""Watch COMMITs and in-flight statements, so retries never repeat committed work
and timeouts are hard bounds.

A decorated function is the unit of retry, and the decorator does not see the
engine it uses. So resilient-db watches every SQLAlchemy dialect the process
connects with. It wraps five methods of a dialect instance, once —
``do_execute``, ``do_execute_no_params``, ``do_executemany`` (the DBAPI call of
every statement), ``do_commit`` (the DBAPI COMMIT) and ``do_rollback`` (a ROLLBACK,
the pool's reset on release included) — for the engines that exist
when the listeners are installed (found through the garbage collector, once), for
every engine whose pool opens a connection later (a class-level pool ``connect``
listener: it runs once per new DBAPI connection, never on a checkout), and for the
engine a ``ResilientEngine`` wraps, when it is built. Outside a guarded call a
wrapper adds one context-variable lookup. Inside one:

* a COMMIT is recorded by the running attempt before it is sent, and its outcome
  when the call returns: it returned; the database answered it with an error (an
  ErrorResponse, e.g. a serialization failure detected at commit: it did not
  commit); or anything else (connection lost, cancelled, timed out) — ambiguous;
* while an attempt has a time limit, the statement (COMMIT, ROLLBACK) is registered as in
  flight for the duration of the DBAPI call. When the attempt's time runs out,
  those connections are aborted at the driver level (see ``_abort``) instead of
  waiting for SQLAlchemy's graceful 2-second close;
* an observed operation learns its database (and, for a single statement, its SQL)
  from its first statement.

The retry policy then refuses to retry an attempt during which a COMMIT was sent
and not definitively rejected, unless the caller declared the unit idempotent —
this also covers SQLAlchemy 2.1, where ``sessionmaker.begin()`` runs COMMIT to
completion under a shield and re-raises the cancellation *after* it committed.

Why not SQLAlchemy's connection events (``commit``, ``before_cursor_execute``...)?
Any listener on them sets ``Engine._has_events``, and that flag alone puts every
connection of every engine in the process on SQLAlchemy's event-dispatching path —
a dispatcher joined per connection, its listener collections built again at each
event point: about 890 bytecodes, 6-10 % of a ``connect``, ``SELECT 1``,
``release`` unit on PostgreSQL (``python -m bench.bytecodes``), paid whether or not
the unit is guarded. Pool and dialect events dispatch from objects that live as
long as their pool or dialect, so the ``handle_error`` listener stays (a dialect
event): inside a guarded call, a 25006 (read-only transaction) on a write is turned into a
disconnect for SQLAlchemy, which then invalidates the whole pool: after a
failover, the pool must stop handing out connections to the demoted primary.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine, ExceptionContext
from sqlalchemy.pool import Pool

from ._classify import _lookup_sqlstate, find_sqlstate, is_definitive_rejection
from ._scope import AttemptState, CommitRecord, CommitStatus, _get_scope

__all__ = [
    "XID_READER",
    "inner_method",
    "install_commit_tracking",
    "replace_inner_method",
    "track_dialect",
    "uninstall_commit_tracking",
]

logger = logging.getLogger("resilient_db")

_installed = False
_lock = threading.Lock()

_WRAPPED = "_resilient_db_wrapped"
"""Key of a tracked dialect instance's ``_Wrapped`` in its ``__dict__``."""

XID_READER: ContextVar[Callable[[Any, CommitRecord], None] | None] = ContextVar(
    "resilient_db_xid_reader", default=None
)
"""Set by the engine wrapper around a COMMIT it will verify: called with the DBAPI
connection and the COMMIT's record just before the COMMIT is sent — after every
flush, ``before_commit`` hooks included — to note the transaction id there (a
session bound to several engines sends one COMMIT each; the reader skips what is
not PostgreSQL). A context variable, so a task started earlier in the same unit is
not asked."""

_tracked: weakref.WeakSet[Dialect] = weakref.WeakSet()
_untracked: weakref.WeakSet[Dialect] = weakref.WeakSet()
"""Dialects unwrapped by :func:`uninstall_commit_tracking`, or first connected while
it was uninstalled: wrapped when the tracking is installed again (without searching
the whole process a second time)."""
_searched = False
"""Whether :func:`_track_existing` has searched the process once."""
_track_lock = threading.Lock()


def _register(connection: object, attempt: AttemptState) -> None:
    inflight = attempt.inflight
    if inflight is None:
        attempt.inflight = {connection: None}
    else:
        inflight[connection] = None


def _wrap_statement(inner: dict[str, Any], name: str) -> Callable[..., Any]:
    """``do_execute`` and ``do_executemany``: ``(cursor, statement, parameters,
    context=None)``, as SQLAlchemy's dialects define them (named parameters, not
    ``*args``: this runs for every statement of every engine in the process)."""

    def run_statement(cursor: Any, statement: str, parameters: Any, context: Any = None) -> Any:
        scope = _get_scope()
        if scope is None or context is None:
            return inner[name](cursor, statement, parameters, context)
        op = (scope.root or scope).telemetry
        if op is not None and op.wants_statement:
            # An observed operation learns its database (and, for a single
            # statement, its SQL) from its first statement.
            op.note_statement(context.root_connection, statement)
        attempt = scope.attempt
        if not attempt.timers:
            # No attempt timer to abort it (none, or the statement's connection
            # times it itself: ConnectionTimer).
            return inner[name](cursor, statement, parameters, context)
        # (An attribute of SQLAlchemy's execution context: a lookup the interpreter
        # cannot specialize, read only when needed.)
        connection = context.root_connection
        # In flight for the duration of the DBAPI call: the attempt's timer aborts
        # it at the driver level when the time runs out (see `_abort`). Written out,
        # not called: this runs for every guarded statement.
        inflight = attempt.inflight
        if inflight is None:
            attempt.inflight = {connection: None}
        else:
            inflight[connection] = None
        try:
            return inner[name](cursor, statement, parameters, context)
        finally:
            inflight = attempt.inflight  # None once aborted
            if inflight:
                inflight.pop(connection, None)

    return run_statement


def _wrap_no_params(inner: dict[str, Any], name: str) -> Callable[..., Any]:
    """``do_execute_no_params``, ``(cursor, statement, context=None)``: the statement
    wrapper around an adapter that drops the parameters (and still calls whatever
    ``inner`` holds at the time)."""

    def call(cursor: Any, statement: str, parameters: Any, context: Any) -> Any:
        return inner[name](cursor, statement, context)

    wrapped = _wrap_statement({name: call}, name)

    def run_statement(cursor: Any, statement: str, context: Any = None) -> Any:
        return wrapped(cursor, statement, None, context)

    return run_statement


def _wrap_commit(inner: dict[str, Any], name: str = "do_commit") -> Callable[[Any], None]:
    def run_commit(dbapi_connection: Any) -> None:
        scope = _get_scope()
        if scope is None or not scope.in_call:
            inner[name](dbapi_connection)
            return
        attempt = scope.attempt
        record = attempt.record_commit(dbapi_connection)
        record.task = _current_task()
        registered = bool(attempt.timers)
        if registered:
            _register(dbapi_connection, attempt)
        try:
            reader = XID_READER.get()
            if reader is not None:
                try:
                    reader(dbapi_connection, record)
                except BaseException as exc:
                    record.error = exc
                    record.status = CommitStatus.REJECTED  # the COMMIT was not sent
                    raise
            inner[name](dbapi_connection)
        except BaseException as exc:
            if record.status is CommitStatus.REJECTED:
                raise
            record.error = exc
            if is_definitive_rejection(exc):
                record.status = CommitStatus.REJECTED
            else:
                record.status = CommitStatus.AMBIGUOUS
            raise
        else:
            record.status = CommitStatus.RETURNED
        finally:
            if registered:
                attempt.unregister_inflight(dbapi_connection)

    return run_commit


def _current_task() -> object:
    """The running task, or ``None`` (a sync engine in a worker thread)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _wrap_rollback(inner: dict[str, Any], name: str = "do_rollback") -> Callable[[Any], None]:
    """``do_rollback``, which the pool's reset on release calls too: in flight, like
    a statement, while an attempt timer watches (a rollback on a frozen server
    would otherwise hang the release past any bound)."""

    def run_rollback(dbapi_connection: Any) -> None:
        scope = _get_scope()
        if scope is None or not scope.in_call or not scope.attempt.timers:
            inner[name](dbapi_connection)
            return
        attempt = scope.attempt
        _register(dbapi_connection, attempt)
        try:
            inner[name](dbapi_connection)
        finally:
            attempt.unregister_inflight(dbapi_connection)

    return run_rollback


class _Wrapped:
    """A tracked dialect's wrappers, what each calls (``inner``, which the fault
    injector may replace beneath the tracking) and the instance attributes they
    shadowed."""

    __slots__ = ("inner", "shadowed", "wrappers")

    def __init__(self) -> None:
        self.inner: dict[str, Any] = {}
        self.shadowed: dict[str, Any] = {}
        self.wrappers: dict[str, Any] = {}


_METHODS: tuple[tuple[str, Callable[[dict[str, Any], str], Callable[..., Any]]], ...] = (
    ("do_execute", _wrap_statement),
    ("do_execute_no_params", _wrap_no_params),
    ("do_executemany", _wrap_statement),
    ("do_commit", _wrap_commit),
    ("do_rollback", _wrap_rollback),
)
"""The wrapped methods, with what wraps each."""


def track_dialect(dialect: Dialect) -> None:
    """Wrap ``dialect``'s statement, COMMIT and ROLLBACK methods (once per dialect instance;
    again for a method someone replaced since)."""
    with _track_lock:
        wrapped: _Wrapped | None = dialect.__dict__.get(_WRAPPED)
        if wrapped is None:
            wrapped = _Wrapped()
        own = dialect.__dict__
        for name, wrap in _METHODS:
            if name in own and own[name] is wrapped.wrappers.get(name):
                continue
            if name in own and name not in wrapped.shadowed:
                wrapped.shadowed[name] = own[name]
            wrapped.inner[name] = getattr(dialect, name)
            wrapper = wrap(wrapped.inner, name)
            wrapped.wrappers[name] = wrapper
            setattr(dialect, name, wrapper)
        own[_WRAPPED] = wrapped
        _tracked.add(dialect)


def inner_method(dialect: Dialect, name: str) -> Any:
    """What the tracking wrapper of ``dialect.<name>`` calls (``None`` if the dialect
    is not tracked: :func:`track_dialect`)."""
    wrapped: _Wrapped | None = dialect.__dict__.get(_WRAPPED)
    return None if wrapped is None else wrapped.inner[name]


def replace_inner_method(dialect: Dialect, name: str, method: Any) -> None:
    """Make the tracking wrapper of ``dialect.<name>`` call ``method`` (the fault
    injector's COMMIT, beneath the tracking so that the tracking sees its faults);
    nothing if the dialect is no longer tracked."""
    wrapped: _Wrapped | None = dialect.__dict__.get(_WRAPPED)
    if wrapped is not None:
        wrapped.inner[name] = method


def _untrack_all() -> None:
    with _track_lock:
        for dialect in list(_tracked):
            wrapped: _Wrapped | None = dialect.__dict__.pop(_WRAPPED, None)
            if wrapped is None:
                continue
            for name in wrapped.wrappers:
                if name in wrapped.shadowed:
                    setattr(dialect, name, wrapped.shadowed[name])
                else:
                    dialect.__dict__.pop(name, None)
            _untracked.add(dialect)
        _tracked.clear()


def _on_connect(dbapi_connection: Any, record: Any) -> None:
    # A new DBAPI connection (rare: a pool reuses them). Its pool, if made by an
    # engine, knows the engine's dialect; a pool made without an engine has a
    # placeholder that is not a Dialect. The record names its pool privately only.
    pool = getattr(record, "_ConnectionRecord__pool", None)
    dialect = getattr(pool, "_dialect", None)
    if isinstance(dialect, Dialect) and _WRAPPED not in dialect.__dict__:
        if _installed:
            track_dialect(dialect)
        else:
            # Uninstalled (the benchmarks' raw rounds): the engine must stay raw
            # now and be tracked when the tracking is installed again.
            _untracked.add(dialect)


def _track_existing() -> None:
    """Track the dialects of engines made before the listeners were installed: their
    pools may hold connections already, and a pool reuses them for as long as they
    live. Python keeps no list of engines, so the first installation asks the
    garbage collector for every object (a few milliseconds, once); a later one (after
    :func:`uninstall_commit_tracking`, which the benchmarks toggle) wraps the
    dialects that uninstalling unwrapped or that connected meanwhile."""
    global _searched
    if _searched:
        found: list[Any] = list(_untracked)
    else:
        found = [obj for obj in gc.get_objects() if isinstance(obj, Dialect)]
        _searched = True
    _untracked.clear()
    for dialect in found:
        if _WRAPPED not in dialect.__dict__:
            track_dialect(dialect)


def _on_handle_error(context: ExceptionContext) -> None:
    scope = _get_scope()
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


_LISTENERS: tuple[tuple[type[Any], str, Any], ...] = ((Engine, "handle_error", _on_handle_error),)
"""Removed by :func:`uninstall_commit_tracking`. The pool ``connect`` listener stays
once installed (it runs only for new DBAPI connections, and while uninstalled it
only remembers the engines to track)."""


_dialect_flag_before = True
"""``Dialect._has_events`` before our ``handle_error`` listener set it (the only
event flag we set: we listen to no connection event)."""


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
    global _installed, _dialect_flag_before
    with _lock:
        if _installed:
            return
        _dialect_flag_before = bool(Dialect._has_events)
        for target, name, fn in _LISTENERS:
            event.listen(target, name, fn)
        if not _searched:  # the first installation (see _LISTENERS)
            event.listen(Pool, "connect", _on_connect)
        _installed = True
        _track_existing()


def uninstall_commit_tracking() -> None:
    """Remove the listeners and unwrap the dialects (benchmarks use it for a truly
    raw baseline).

    Removing a listener does not clear the class flag that listening set (a set
    ``_has_events`` keeps SQLAlchemy on its event-dispatching path with no listener
    left): ``Dialect._has_events`` goes back to what it was before
    :func:`install_commit_tracking` when no class-level listener remains.
    """
    global _installed
    with _lock:
        if not _installed:
            return
        for target, name, fn in _LISTENERS:
            event.remove(target, name, fn)
        _untrack_all()
        if not _dialect_flag_before and not _class_listeners_left(Dialect):
            Dialect._has_events = False
        _installed = False
