"""In-process fault injection for one SQLAlchemy async engine (asyncpg or aiosqlite).

No proxy and no TCP needed, so it works on aiosqlite too. The model is Polly's
chaos strategies: each :class:`Strategy` has a kind, an injection ``rate``, an
``enabled`` switch (a bool or a zero-argument predicate, changeable at run
time), an optional ``when`` filter on the operation, and a name::

    from resilient_db.chaos.injector import FaultInjector, disconnect, latency, sqlstate_error

    injector = FaultInjector(
        engine,
        disconnect(rate=0.05),
        sqlstate_error("40001", rate=0.1, when=r"^UPDATE"),
        latency(0.2, rate=0.3, name="slow"),
        seed=7,
    )
    with injector:              # attach() ... detach()
        await run_workload()
    print(injector.counts, injector.log[:3])

Where it acts (``on=``), always inside SQLAlchemy's own error handling, so that
an injected error is wrapped, classified as a disconnect or not, and invalidates
the connection exactly as a real one would:

* ``"statement"``: every statement the application sends (``before_cursor_execute``
  numbers it and decides; the ``do_execute`` / ``do_executemany`` /
  ``do_execute_no_params`` events carry the decision out around the driver call);
* ``"commit"``: every COMMIT (this engine's ``dialect.do_commit`` is wrapped: the
  ``commit`` event fires outside the error handling);
* ``"connect"``: every new driver connection (the ``do_connect`` event).

What each fault looks like to SQLAlchemy — the point of the exercise is that it
is indistinguishable from the real thing:

=====================  =========================================================
``disconnect()``       The driver connection is really closed first (asyncpg
                       ``terminate()``, aiosqlite ``close()``). ``phase="before"``:
                       the statement then goes to the driver, which raises its own
                       closed-connection error (asyncpg: ``InterfaceError``
                       "connection is closed"); nothing reached the database.
                       ``phase="after"``: the statement or COMMIT completes on the
                       database, then the connection drops and the reply is lost
                       (asyncpg: 08003 "connection was closed in the middle of
                       operation"). Either way SQLAlchemy's own ``is_disconnect``
                       recognises it: ``connection_invalidated`` is true and the
                       pool replaces the connection. ``on="commit",
                       phase="after"`` is the ambiguous commit: durable, but the
                       caller gets a disconnect error.
``sqlstate_error()``   PostgreSQL only. The server raises it on the same
                       connection (``RAISE ... USING ERRCODE``), so it arrives as
                       the asyncpg class for that SQLSTATE, wrapped by SQLAlchemy
                       with ``.orig.sqlstate``, and the transaction is aborted as
                       after a real one. ``"57P01"`` really terminates the backend
                       (asyncpg then reports 08003 with the server's message, as
                       it does for a real admin shutdown). ``on="commit"``: COMMIT
                       is answered with the error and nothing is committed.
                       ``on="connect"``: the asyncpg exception for the SQLSTATE
                       (e.g. ``53300``) is raised by the driver's connect call.
``sqlite_busy()``      SQLite only: ``sqlite3.OperationalError("database is
                       locked")`` with ``sqlite_errorcode`` 5, raised where the
                       driver call would have raised it.
``hang()``             The database never answers: waits until cancelled (or for
                       ``duration`` seconds, then raises ``TimeoutError``, as a
                       driver-level timeout does).
``latency()``          Adds a delay before the operation, which then runs.
``connect_failure()``  The driver's connect call raises ``ConnectionRefusedError``.
=====================  =========================================================

One departure: when an aiosqlite connection is closed before COMMIT, SQLAlchemy
2.1's adapter skips the COMMIT *silently* (the work is lost; the next user of the
pooled connection gets the error), where 2.0's raised "no active connection".
``disconnect(on="commit")`` raises that error at the COMMIT on both, so the fault
shows where it happens.

Determinism: whether strategy *S* fires on the *n*-th operation of its target
depends only on ``random.Random(f"{seed}:{S.name}:{n}")`` and ``S.rate``, so the
same seed and the same order of operations fault the same ordinals; adding a
strategy does not change the rolls of the others. On each operation every latency
strategy that fires adds its delay, then the first fault strategy (in the order
they were added) that fires is injected. Under concurrency the order in which
operations get their ordinals depends on scheduling. Every injection is recorded
in :attr:`FaultInjector.log` and counted in :attr:`FaultInjector.counts`.

Not provided: outcome strategies (Polly's "return this result instead"). A
fabricated result set cannot be made real to SQLAlchemy: its cursor description,
types and rowcount would have to match what the compiled statement expects, and a
result that SQLAlchemy does not believe would test nothing.

Limits: ``on="connect"`` needs connections made by the dialect (not an engine
created with ``async_creator=``, which bypasses the ``do_connect`` event). One
injector per engine at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import re
import secrets
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, Self, TypeAlias

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine, ExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import _validate as v
from .._sqla import inner_method, replace_inner_method, track_dialect
from ._drivers import AiosqliteOps, AsyncpgOps, DriverOps, await_, ops_for

__all__ = [
    "FaultInjector",
    "Injection",
    "Kind",
    "Operation",
    "Strategy",
    "Target",
    "connect_failure",
    "disconnect",
    "hang",
    "latency",
    "sqlite_busy",
    "sqlstate_error",
]


class Target(enum.StrEnum):
    """Where a strategy acts."""

    STATEMENT = "statement"
    """Every statement sent through a cursor (not SQLAlchemy's own first-connect queries)."""
    COMMIT = "commit"
    """Every COMMIT (``dialect.do_commit``)."""
    CONNECT = "connect"
    """Every new driver connection."""


class Kind(enum.StrEnum):
    """What a strategy does."""

    DISCONNECT = "disconnect"
    HANG = "hang"
    SQLSTATE = "sqlstate"
    SQLITE_BUSY = "sqlite_busy"
    CONNECT_FAILURE = "connect_failure"
    LATENCY = "latency"


Phase: TypeAlias = Literal["before", "after"]

_TARGETS: Final[dict[Kind, frozenset[Target]]] = {
    Kind.DISCONNECT: frozenset({Target.STATEMENT, Target.COMMIT}),
    Kind.HANG: frozenset(Target),
    Kind.SQLSTATE: frozenset(Target),
    Kind.SQLITE_BUSY: frozenset({Target.STATEMENT, Target.COMMIT}),
    Kind.CONNECT_FAILURE: frozenset({Target.CONNECT}),
    Kind.LATENCY: frozenset(Target),
}

_SQLSTATE_RE: Final = re.compile(r"[0-9A-Z]{5}")
_SNIPPET: Final = 120


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation the injector saw, as given to ``when`` predicates.

    Attributes:
        target: where it happens.
        ordinal: 1 for the first operation of this target the injector saw (ordinals
            run on across detach and attach; :meth:`FaultInjector.reset` restarts them).
        statement: the SQL for statements, ``"COMMIT"`` for commits, ``None`` for connects.
    """

    target: Target
    ordinal: int
    statement: str | None


@dataclass(frozen=True, slots=True)
class Injection:
    """One injected fault or delay, as recorded in :attr:`FaultInjector.log`.

    Attributes:
        ordinal: the operation's ordinal within its target.
        target: where it was injected.
        strategy: the strategy's name.
        kind: what was injected.
        statement: the start of the statement (``"COMMIT"`` for commits, ``None``
            for connects), whitespace collapsed.
    """

    ordinal: int
    target: Target
    strategy: str
    kind: Kind
    statement: str | None


Predicate: TypeAlias = Callable[[], bool]
When: TypeAlias = str | re.Pattern[str] | Callable[[Operation], bool]


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string; got {name!r}")
    return name


def _check_seconds(name: str, value: object, *, allow_none: bool) -> float | None:
    accepted = "a finite number of seconds > 0" + (", or None" if allow_none else "")
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return seconds


def _check_enabled(enabled: object) -> bool | Predicate:
    if isinstance(enabled, bool):
        return enabled
    if callable(enabled):
        predicate: Predicate = enabled
        return predicate
    raise TypeError(
        f"enabled must be True, False or a zero-argument callable returning bool; got {enabled!r}"
    )


def _compile_when(when: object) -> Callable[[Operation], bool] | None:
    if when is None:
        return None
    if isinstance(when, str):
        try:
            when = re.compile(when, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"when is not a valid regular expression: {exc}") from exc
    if isinstance(when, re.Pattern):
        pattern: re.Pattern[str] = when

        def matches(operation: Operation) -> bool:
            return (
                operation.statement is not None and pattern.search(operation.statement) is not None
            )

        return matches
    if callable(when):
        predicate: Callable[[Operation], bool] = when
        return predicate
    raise TypeError(
        "when must be a regular expression (str or re.Pattern, searched in the "
        f"statement) or a callable taking an Operation; got {when!r}"
    )


def _check_target(kind: Kind, on: object) -> Target:
    allowed = _TARGETS[kind]
    target = None
    if isinstance(on, str):  # a Target is a str too
        with contextlib.suppress(ValueError):
            target = Target(on)
    if target is None or target not in allowed:
        names = ", ".join(repr(t.value) for t in Target if t in allowed)
        raise ValueError(f"on must be one of {names} for {kind.value}; got {on!r}")
    return target


def _check_sqlstate(sqlstate: object) -> str:
    if not isinstance(sqlstate, str) or _SQLSTATE_RE.fullmatch(sqlstate) is None:
        raise ValueError(
            f"sqlstate must be five digits or capital letters (e.g. '40001'); got {sqlstate!r}"
        )
    if sqlstate[:2] in ("00", "01", "02"):
        raise ValueError(
            f"sqlstate must be an error code, not of class 00, 01 or 02; got {sqlstate!r}"
        )
    return sqlstate


class Strategy:
    """One chaos strategy: what to inject, where, how often, and when.

    Build strategies with :func:`disconnect`, :func:`hang`, :func:`sqlstate_error`,
    :func:`sqlite_busy`, :func:`latency` and :func:`connect_failure`, which document
    the arguments. Everything is validated when the strategy is built; only
    :attr:`enabled` can change afterwards.
    """

    __slots__ = (
        "_enabled",
        "_when",
        "delay",
        "kind",
        "name",
        "phase",
        "rate",
        "sqlstate",
        "target",
    )

    def __init__(
        self,
        *,
        kind: Kind,
        on: Target | str,
        rate: float,
        name: str,
        enabled: bool | Predicate = True,
        when: When | None = None,
        delay: float | None = None,
        sqlstate: str | None = None,
        phase: Phase = "before",
    ) -> None:
        self.kind: Final = Kind(kind)
        self.target: Final = _check_target(self.kind, on)
        self.rate: Final = v.fraction("rate", rate)
        self.name: Final = _check_name(name)
        self._enabled = _check_enabled(enabled)
        self._when = _compile_when(when)
        if self.kind is Kind.LATENCY:
            delay = _check_seconds("delay", delay, allow_none=False)
        elif self.kind is Kind.HANG:
            delay = _check_seconds("duration", delay, allow_none=True)
        elif delay is not None:
            raise ValueError(f"a delay applies to latency and hang only, not {self.kind.value}")
        if self.kind is Kind.SQLSTATE:
            sqlstate = _check_sqlstate(sqlstate)
        elif sqlstate is not None:
            raise ValueError(f"a sqlstate applies to sqlstate errors only, not {self.kind.value}")
        if phase not in ("before", "after"):
            raise ValueError(f"phase must be 'before' or 'after'; got {phase!r}")
        if phase == "after" and self.kind is not Kind.DISCONNECT:
            raise ValueError(f"phase='after' applies to disconnect only, not {self.kind.value}")
        self.delay: Final = delay
        """Latency: the delay. Hang: seconds before ``TimeoutError``, or ``None``."""
        self.sqlstate: Final = sqlstate
        """The SQLSTATE of a sqlstate error."""
        self.phase: Final = phase
        """Disconnect: whether the connection drops before or after the operation."""

    @property
    def enabled(self) -> bool | Predicate:
        """``True``, ``False``, or a zero-argument predicate asked at every operation."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool | Predicate) -> None:
        self._enabled = _check_enabled(value)

    def is_enabled(self) -> bool:
        """Whether the strategy may fire now."""
        enabled = self._enabled
        return bool(enabled()) if callable(enabled) else enabled

    def applies_to(self, operation: Operation) -> bool:
        """Whether ``operation`` passes the ``when`` filter (always, without one)."""
        return self._when is None or bool(self._when(operation))

    def fires(self, seed: int, operation: Operation) -> bool:
        """The seeded roll: ``True`` with probability ``rate``, the same every time."""
        if self.rate >= 1.0:
            return True
        if self.rate <= 0.0:
            return False
        roll = random.Random(f"{seed}:{self.name}:{operation.ordinal}").random()
        return roll < self.rate

    def __repr__(self) -> str:
        extra = ""
        if self.kind is Kind.DISCONNECT:
            extra = f", phase={self.phase!r}"
        elif self.kind is Kind.SQLSTATE:
            extra = f", sqlstate={self.sqlstate!r}"
        elif self.kind in (Kind.LATENCY, Kind.HANG):
            extra = f", delay={self.delay!r}"
        return (
            f"Strategy({self.name!r}, kind={self.kind.value}, on={self.target.value}, "
            f"rate={self.rate}{extra}, enabled={self._enabled!r})"
        )


def disconnect(
    *,
    rate: float,
    on: Literal["statement", "commit"] | Target = Target.STATEMENT,
    phase: Phase = "before",
    name: str = "disconnect",
    enabled: bool | Predicate = True,
    when: When | None = None,
) -> Strategy:
    """Drop the connection: close the driver connection, then let the driver fail.

    Args:
        rate: probability in [0, 1] that an eligible operation is faulted.
        on: ``"statement"`` or ``"commit"``.
        phase: ``"before"``: the connection drops before the operation is sent (the
            driver raises its closed-connection error; nothing happened on the
            database). ``"after"``: the operation completes on the database, then the
            connection drops and its reply is lost. With ``on="commit"`` that is the
            ambiguous commit: the transaction is durable, the caller gets a
            disconnect error.
        name: unique within an injector.
        enabled: a bool, or a zero-argument predicate asked at every operation.
        when: only operations whose statement matches this regular expression
            (case-insensitive), or for which this predicate returns true.
    """
    return Strategy(
        kind=Kind.DISCONNECT, on=on, rate=rate, name=name, enabled=enabled, when=when, phase=phase
    )


def hang(
    *,
    rate: float,
    duration: float | None = None,
    on: Literal["statement", "commit", "connect"] | Target = Target.STATEMENT,
    name: str = "hang",
    enabled: bool | Predicate = True,
    when: When | None = None,
) -> Strategy:
    """The database never answers: wait until cancelled, or ``duration`` s then ``TimeoutError``.

    Nothing is sent. When the caller's timeout cancels the wait, SQLAlchemy handles
    the cancellation as it handles a cancelled driver call (it invalidates the
    connection).

    Args:
        rate: probability in [0, 1] that an eligible operation hangs.
        duration: seconds (> 0) after which ``TimeoutError`` is raised, as a
            driver-level timeout does; ``None`` waits until cancelled.
        on: ``"statement"``, ``"commit"`` or ``"connect"``.
        name: see :func:`disconnect`.
        enabled: see :func:`disconnect`.
        when: see :func:`disconnect`.
    """
    return Strategy(
        kind=Kind.HANG,
        on=on,
        rate=rate,
        name=name,
        enabled=enabled,
        when=when,
        delay=duration,
    )


def sqlstate_error(
    sqlstate: str,
    *,
    rate: float,
    on: Literal["statement", "commit", "connect"] | Target = Target.STATEMENT,
    name: str | None = None,
    enabled: bool | Predicate = True,
    when: When | None = None,
) -> Strategy:
    """A PostgreSQL error with this SQLSTATE, raised by the server itself.

    Examples: ``"40001"`` serialization failure, ``"40P01"`` deadlock, ``"55P03"``
    lock not available, ``"57014"`` statement timeout, ``"57P01"`` admin shutdown
    (really terminates the backend), ``"25006"`` read-only transaction. On
    ``on="connect"``: ``"53300"`` too many connections, ``"57P03"`` starting up.

    Args:
        sqlstate: five characters, digits and capital letters, not of class 00, 01
            or 02 (those are not errors).
        rate: probability in [0, 1] that an eligible operation fails.
        on: ``"statement"``, ``"commit"`` (the COMMIT is answered with the error and
            does not commit) or ``"connect"``.
        name: default ``"sqlstate_<code>"``.
        enabled: see :func:`disconnect`.
        when: see :func:`disconnect`.
    """
    return Strategy(
        kind=Kind.SQLSTATE,
        on=on,
        rate=rate,
        name=f"sqlstate_{_check_sqlstate(sqlstate)}" if name is None else name,
        enabled=enabled,
        when=when,
        sqlstate=sqlstate,
    )


def sqlite_busy(
    *,
    rate: float,
    on: Literal["statement", "commit"] | Target = Target.STATEMENT,
    name: str = "sqlite_busy",
    enabled: bool | Predicate = True,
    when: When | None = None,
) -> Strategy:
    """SQLite's "database is locked" (SQLITE_BUSY, result code 5) instead of the operation.

    Args:
        rate: probability in [0, 1] that an eligible operation fails.
        on: ``"statement"`` or ``"commit"`` (the COMMIT fails; the transaction stays open).
        name: see :func:`disconnect`.
        enabled: see :func:`disconnect`.
        when: see :func:`disconnect`.
    """
    return Strategy(kind=Kind.SQLITE_BUSY, on=on, rate=rate, name=name, enabled=enabled, when=when)


def latency(
    delay: float,
    *,
    rate: float,
    on: Literal["statement", "commit", "connect"] | Target = Target.STATEMENT,
    name: str = "latency",
    enabled: bool | Predicate = True,
    when: When | None = None,
) -> Strategy:
    """A slow operation: wait ``delay`` seconds, then run it.

    Latency strategies combine: every one that fires adds its delay, and a fault
    strategy may fire on the same operation after the delay.

    Args:
        delay: seconds (> 0).
        rate: probability in [0, 1] that an eligible operation is delayed.
        on: ``"statement"``, ``"commit"`` or ``"connect"``.
        name: see :func:`disconnect`.
        enabled: see :func:`disconnect`.
        when: see :func:`disconnect`.
    """
    return Strategy(
        kind=Kind.LATENCY,
        on=on,
        rate=rate,
        name=name,
        enabled=enabled,
        when=when,
        delay=delay,
    )


def connect_failure(
    *,
    rate: float,
    name: str = "connect_failure",
    enabled: bool | Predicate = True,
) -> Strategy:
    """The driver's connect call raises ``ConnectionRefusedError`` (nothing listening).

    Args:
        rate: probability in [0, 1] that a new connection is refused.
        name: see :func:`disconnect`.
        enabled: see :func:`disconnect`.
    """
    return Strategy(
        kind=Kind.CONNECT_FAILURE, on=Target.CONNECT, rate=rate, name=name, enabled=enabled
    )


_Plan: TypeAlias = tuple[Operation, list[Strategy], Strategy | None]
"""An operation, the latency strategies that fire on it, and the fault (if any)."""

_attached: weakref.WeakKeyDictionary[Engine, FaultInjector] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()


def _snippet(statement: str | None) -> str | None:
    if statement is None:
        return None
    text = " ".join(statement.split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _hang(duration: float | None, name: str) -> NoReturn:
    if duration is None:
        # Only cancellation ends this wait.
        await_(asyncio.get_running_loop().create_future())
        raise AssertionError("a future nobody resolves was resolved")  # pragma: no cover
    await_(asyncio.sleep(duration))
    raise TimeoutError(f"no answer from the database in {duration:g} s (injected hang {name!r})")


class FaultInjector:
    """Inject faults into one :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.

    Args:
        engine: a ``postgresql+asyncpg`` or ``sqlite+aiosqlite`` async engine.
        *strategies: the strategies, in order: on each operation, every latency
            strategy that fires adds its delay, then the first fault strategy that
            fires is injected.
        seed: makes the injections reproducible; default: a random seed, kept in
            :attr:`seed` so that a run can be replayed.
        enabled: the master switch (:attr:`enabled`), changeable at run time.

    Nothing happens until :meth:`attach` (or ``with injector:`` /
    ``async with injector:``); :meth:`detach` removes every listener.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *strategies: Strategy,
        seed: int | None = None,
        enabled: bool = True,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"engine must be a sqlalchemy.ext.asyncio.AsyncEngine; got {type(engine).__name__}"
            )
        if seed is None:
            seed = secrets.randbits(32)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None; got {type(seed).__name__} {seed!r}")
        self._engine = engine
        self._sync_engine: Engine = engine.sync_engine
        self._dialect: Dialect = self._sync_engine.dialect
        self._ops: DriverOps = ops_for(self._dialect)
        self._seed = seed
        self._enabled = v.boolean("enabled", enabled)
        self._strategies: dict[str, Strategy] = {}
        self._lock = threading.Lock()
        self._ordinals: dict[Target, int] = dict.fromkeys(Target, 0)
        self._log: list[Injection] = []
        self._counts: Counter[str] = Counter()
        # What before_cursor_execute decided for the statement each connection is
        # about to send; the do_execute hooks carry it out.
        self._planned: weakref.WeakKeyDictionary[Connection, _Plan] = weakref.WeakKeyDictionary()
        self._original_do_commit: Callable[[Any], None] | None = None
        self._attached = False
        for strategy in strategies:
            self.add(strategy)

    # -- configuration ------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The engine faults are injected into."""
        return self._engine

    @property
    def seed(self) -> int:
        """The seed of every injection decision."""
        return self._seed

    @property
    def enabled(self) -> bool:
        """Master switch: while false, operations are counted but nothing is injected."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = v.boolean("enabled", value)

    @property
    def strategies(self) -> tuple[Strategy, ...]:
        """The strategies, in the order they are consulted."""
        return tuple(self._strategies.values())

    def __getitem__(self, name: str) -> Strategy:
        """The strategy called ``name`` (``KeyError`` if none)."""
        return self._strategies[name]

    def add(self, strategy: Strategy) -> Strategy:
        """Add a strategy (consulted after those already added) and return it.

        Raises:
            ValueError: the name is taken, or the engine's database cannot produce
                this fault (SQLSTATE errors need PostgreSQL, busy errors SQLite).
        """
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy; got {strategy!r}")
        if strategy.name in self._strategies:
            raise ValueError(
                f"a strategy named {strategy.name!r} is already added; give each strategy "
                "a distinct name="
            )
        if strategy.kind is Kind.SQLSTATE and not isinstance(self._ops, AsyncpgOps):
            raise ValueError(
                f"strategy {strategy.name!r}: SQLSTATE errors need a postgresql+asyncpg "
                f"engine; this one uses {self._ops.name} (use sqlite_busy() for SQLite)"
            )
        if strategy.kind is Kind.SQLITE_BUSY and not isinstance(self._ops, AiosqliteOps):
            raise ValueError(
                f"strategy {strategy.name!r}: SQLite busy errors need a sqlite+aiosqlite "
                f"engine; this one uses {self._ops.name} (use sqlstate_error() for PostgreSQL)"
            )
        self._strategies[strategy.name] = strategy
        self._counts.setdefault(strategy.name, 0)
        return strategy

    def remove(self, name: str) -> Strategy:
        """Remove the strategy called ``name`` and return it (``KeyError`` if none)."""
        return self._strategies.pop(name)

    # -- what happened ------------------------------------------------------------------

    @property
    def log(self) -> list[Injection]:
        """Every injection so far, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    @property
    def counts(self) -> dict[str, int]:
        """Injections per strategy name (0 for strategies that never fired)."""
        with self._lock:
            return dict(self._counts)

    @property
    def operations(self) -> dict[Target, int]:
        """How many operations of each target were seen while attached."""
        with self._lock:
            return dict(self._ordinals)

    def faulted(self, target: Target | str = Target.STATEMENT) -> list[int]:
        """The ordinals of the ``target`` operations that got a fault or delay."""
        wanted = Target(target)
        return [entry.ordinal for entry in self.log if entry.target is wanted]

    def reset(self) -> None:
        """Forget the log and counts and restart ordinals at 1 (strategies are kept)."""
        with self._lock:
            self._log.clear()
            self._counts = Counter(dict.fromkeys(self._strategies, 0))
            self._ordinals = dict.fromkeys(Target, 0)
            self._planned.clear()

    # -- attaching ----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the listeners are installed."""
        return self._attached

    def _listeners(self) -> list[tuple[str, Callable[..., Any]]]:
        return [
            ("before_cursor_execute", self._before_cursor_execute),
            ("do_execute", self._do_execute),
            ("do_executemany", self._do_executemany),
            ("do_execute_no_params", self._do_execute_no_params),
            ("do_connect", self._do_connect),
        ]

    def attach(self) -> Self:
        """Install the listeners on the engine (no-op when already attached).

        Raises:
            RuntimeError: another injector is attached to the same engine.
        """
        with _attached_lock:
            current = _attached.get(self._sync_engine)
            if current is self:
                return self
            if current is not None:
                raise RuntimeError(
                    "another FaultInjector is attached to this engine; detach it first"
                )
            for name, listener in self._listeners():
                event.listen(self._sync_engine, name, listener)
            dialect = self._dialect
            # The commit event fires outside SQLAlchemy's error handling, so faults
            # at COMMIT replace this engine's own COMMIT: beneath resilient-db's
            # COMMIT tracking (which wraps the dialect instance's do_commit), so
            # that the tracking sees the faults as it would see the driver's errors.
            # Other engines are untouched; detach() puts it back.
            track_dialect(dialect)
            self._original_do_commit = inner_method(dialect, "do_commit")
            replace_inner_method(dialect, "do_commit", self._do_commit)
            _attached[self._sync_engine] = self
            self._attached = True
        return self

    def detach(self) -> None:
        """Remove every listener and restore COMMIT (no-op when not attached)."""
        with _attached_lock:
            if _attached.get(self._sync_engine) is not self:
                return
            for name, listener in self._listeners():
                event.remove(self._sync_engine, name, listener)
            if (
                self._original_do_commit is not None
                and inner_method(self._dialect, "do_commit") == self._do_commit
            ):
                replace_inner_method(self._dialect, "do_commit", self._original_do_commit)
            self._original_do_commit = None
            del _attached[self._sync_engine]
            self._attached = False
            self._planned.clear()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    async def __aenter__(self) -> Self:
        return self.attach()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"FaultInjector({self._ops.name}, seed={self._seed}, {state}, "
            f"enabled={self._enabled}, strategies={list(self._strategies)})"
        )

    # -- deciding -----------------------------------------------------------------------

    def _plan(self, target: Target, statement: str | None) -> _Plan:
        """Number the operation; pick the delays and the fault that apply to it."""
        with self._lock:
            self._ordinals[target] += 1
            operation = Operation(target, self._ordinals[target], statement)
        delays: list[Strategy] = []
        if not self._enabled:
            return operation, delays, None
        for strategy in tuple(self._strategies.values()):
            if (
                strategy.target is not target
                or not strategy.is_enabled()
                or not strategy.applies_to(operation)
                or not strategy.fires(self._seed, operation)
            ):
                continue
            if strategy.kind is Kind.LATENCY:
                delays.append(strategy)
            else:
                return operation, delays, strategy
        return operation, delays, None

    def _record(self, strategy: Strategy, operation: Operation) -> None:
        entry = Injection(
            operation.ordinal,
            operation.target,
            strategy.name,
            strategy.kind,
            _snippet(operation.statement),
        )
        with self._lock:
            self._log.append(entry)
            self._counts[strategy.name] += 1

    def _delay(self, delays: list[Strategy], operation: Operation) -> None:
        for strategy in delays:
            self._record(strategy, operation)
            assert strategy.delay is not None
            await_(asyncio.sleep(strategy.delay))

    def _raise_error(self, connection: Any, fault: Strategy) -> None:
        """Carry out a fault that is not a disconnect (statements and COMMITs alike)."""
        if fault.kind is Kind.HANG:
            _hang(fault.delay, fault.name)
        elif fault.kind is Kind.SQLSTATE:
            self._raise_server_error(connection, fault)
        elif fault.kind is Kind.SQLITE_BUSY:
            self._raise_busy()

    def _raise_server_error(self, connection: Any, strategy: Strategy) -> NoReturn:
        ops = self._ops
        assert isinstance(ops, AsyncpgOps)  # checked by add()
        assert strategy.sqlstate is not None
        ops.raise_server_error(connection, strategy.sqlstate)

    def _raise_busy(self) -> NoReturn:
        ops = self._ops
        assert isinstance(ops, AiosqliteOps)  # checked by add()
        raise ops.busy_error()

    # -- the hooks (run inside SQLAlchemy's greenlet) -----------------------------------

    def _before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        # Only plan here: on SQLAlchemy 2.0 this event fires outside the error
        # handling, so what is injected happens in the do_execute hooks below.
        operation, delays, fault = self._plan(Target.STATEMENT, statement)
        if delays or fault is not None:
            self._planned[conn] = (operation, delays, fault)
        else:
            self._planned.pop(conn, None)

    def _do_execute(
        self, cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._inject(
            context, lambda: self._dialect.do_execute(cursor, statement, parameters, context)
        )

    def _do_executemany(
        self, cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._inject(
            context, lambda: self._dialect.do_executemany(cursor, statement, parameters, context)
        )

    def _do_execute_no_params(self, cursor: Any, statement: str, context: ExecutionContext) -> bool:
        return self._inject(
            context, lambda: self._dialect.do_execute_no_params(cursor, statement, context)
        )

    def _inject(self, context: ExecutionContext, execute: Callable[[], None]) -> bool:
        """Inject what was planned for this statement, in place of the driver call.

        Returns whether the driver call was made here (``False``: SQLAlchemy makes it).
        Statements SQLAlchemy runs for itself on first connect have no plan.
        """
        conn = context.root_connection
        plan = self._planned.pop(conn, None)
        if plan is None:
            return False
        operation, delays, fault = plan
        self._delay(delays, operation)
        if fault is None:
            return False
        self._record(fault, operation)
        proxied = conn.connection
        if fault.kind is Kind.DISCONNECT:
            if fault.phase == "after":
                execute()
                self._ops.drop(proxied)
                self._ops.raise_lost(proxied)
            # The statement goes on to the driver, which raises its own error.
            self._ops.drop(proxied)
        else:
            self._raise_error(proxied, fault)
        return False

    def _do_commit(self, dbapi_connection: Any) -> None:
        original = self._original_do_commit
        if original is None:  # detached by another thread after the lookup
            (inner_method(self._dialect, "do_commit") or self._dialect.do_commit)(dbapi_connection)
            return
        operation, delays, fault = self._plan(Target.COMMIT, "COMMIT")
        self._delay(delays, operation)
        if fault is None:
            original(dbapi_connection)
            return
        self._record(fault, operation)
        if fault.kind is Kind.DISCONNECT:
            if fault.phase == "after":
                original(dbapi_connection)  # durable from here on
                self._ops.drop(dbapi_connection)
                self._ops.raise_lost(dbapi_connection)
            self._ops.drop(dbapi_connection)
            # asyncpg refuses a COMMIT on a closed connection by itself (so does
            # SQLAlchemy 2.0's aiosqlite adapter); 2.1's skips it silently, so raise
            # what the driver raises when it is used closed.
            original(dbapi_connection)
            self._ops.raise_closed(dbapi_connection)
        else:
            self._raise_error(dbapi_connection, fault)

    def _do_connect(
        self, dialect: Dialect, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]
    ) -> None:
        operation, delays, fault = self._plan(Target.CONNECT, None)
        self._delay(delays, operation)
        if fault is None:
            return
        self._record(fault, operation)
        if fault.kind is Kind.HANG:
            # asyncpg's own connect timeout reaches the caller untranslated too.
            _hang(fault.delay, fault.name)
        error: Exception
        if fault.kind is Kind.SQLSTATE:
            ops = self._ops
            assert isinstance(ops, AsyncpgOps)  # checked by add()
            assert fault.sqlstate is not None
            error = ops.connect_error(fault.sqlstate)
        else:
            error = self._ops.refused_error(cparams)

        async def failing_connect(*args: Any, **kwargs: Any) -> NoReturn:
            # Called by the SQLAlchemy adapter in place of the driver's connect(), so
            # the error is translated (or not) exactly as a real connect error is.
            raise error

        cparams["async_creator_fn"] = failing_connect
