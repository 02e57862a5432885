"""The state one guarded call shares with everything it calls, kept in a contextvar.

A :class:`CallScope` carries the call's absolute deadline, so nested decorated calls
and the engine wrapper share the remaining budget, and an :class:`AttemptState`
that lower layers (the SQLAlchemy commit tracker, the engine wrapper) fill in while
an attempt runs, so that the retry decision can see what the attempt did — above
all, whether it sent a COMMIT.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._errors import CommitOutcomeUnknown

__all__ = [
    "AttemptState",
    "CallScope",
    "CommitRecord",
    "CommitStatus",
    "current_scope",
]


class CommitStatus(enum.Enum):
    """What is known of one COMMIT sent during an attempt."""

    PENDING = "pending"
    """Sent; the driver's commit call has not returned yet."""
    RETURNED = "returned"
    """Sent, and the driver's commit call returned."""
    REJECTED = "rejected"
    """The database answered COMMIT with an error: the transaction did not commit."""
    AMBIGUOUS = "ambiguous"
    """Failed without an answer (connection lost, cancelled, timed out): may be durable."""


@dataclass(slots=True)
class CommitRecord:
    """One COMMIT seen during an attempt."""

    connection: object
    status: CommitStatus = CommitStatus.PENDING
    error: BaseException | None = None
    xid: int | None = None
    """PostgreSQL transaction id, when the engine wrapper captured it."""
    xid_read: bool = False
    """Whether it was read (``xid`` ``None`` then means: the transaction wrote nothing)."""
    task: object = None
    """The task that sent it (tasks a unit starts share its attempt)."""


@dataclass(slots=True, init=False)
class AttemptState:
    """What one attempt did, filled in by lower layers while it runs."""

    commits: list[CommitRecord] | None
    replacement: CommitOutcomeUnknown | None
    """The error the caller gets instead of the attempt's own (``CommitOutcomeUnknown``)."""
    inflight: dict[Any, None] | None
    """Connections with a statement (SQLAlchemy ``Connection``) or a COMMIT (the
    pool's connection proxy) in flight for this attempt, registered for the duration
    of the DBAPI call by the dialect wrappers in ``_sqla`` (see ``_abort``)."""
    expired_by: object
    """The timer whose time ran out (set just before it aborts the I/O in flight)."""
    deadline_at: float | None
    """When the nearest armed timer runs out (policy clock), for server-side timeouts."""
    timers: list[Any] | None
    """The armed ``AttemptTimer``s, nested calls' included (see :meth:`disarm`); empty
    or ``None`` when no timer watches the attempt."""

    def __init__(self) -> None:
        # Written out (not generated): one is made for every attempt.
        self.commits = None
        self.replacement = None
        self.inflight = None
        self.expired_by = None
        self.deadline_at = None
        self.timers = None

    def disarm(self) -> None:
        """Stop the armed timers from cancelling the task (used while a COMMIT's
        outcome is being verified: that has a budget of its own). A timer that has
        already cancelled the task cannot take it back: that cancellation then ends
        the verification like any other."""
        for timer in self.timers or ():
            timer.disarm()

    def rearm(self, paused: float) -> None:
        """Arm again the timers :meth:`disarm` stopped, ``paused`` seconds later than
        they were due (what follows the verification stays bounded; the time the
        verification took was its own). Not after one of them expired."""
        if self.expired_by is not None:
            return
        for timer in self.timers or ():
            timer.resume(paused)

    def unregister_inflight(self, connection: Any) -> None:
        """The statement (or COMMIT) on ``connection`` is no longer in flight."""
        if self.inflight:
            self.inflight.pop(connection, None)

    def abort_inflight(self) -> bool:
        """Abort the driver connection of every statement still in flight for this
        attempt; ``True`` if any was aborted.

        A connection that was closed (back in the pool: it may belong to someone
        else now) or invalidated since it was registered is left alone.
        """
        from ._abort import abort_connection

        if not self.inflight:
            return False
        aborted = False
        for connection in list(self.inflight):
            if abort_connection(connection):
                aborted = True
        self.inflight = None
        return aborted

    def record_commit(self, connection: object) -> CommitRecord:
        record = CommitRecord(connection)
        if self.commits is None:
            self.commits = [record]
        else:
            self.commits.append(record)
        return record

    def unsafe_commits(self) -> list[CommitRecord]:
        """Commits that may have taken effect (anything not definitively rejected)."""
        if self.commits is None:
            return []
        return [r for r in self.commits if r.status is not CommitStatus.REJECTED]


@dataclass(slots=True, init=False)
class CallScope:
    """The context of one guarded call (or of a bare :func:`deadline` block)."""

    clock: Callable[[], float]
    deadline_at: float | None
    in_call: bool
    """True inside a guarded call: nested guarded calls must not retry on their own."""
    attempt: AttemptState
    attempt_number: int
    guards: tuple[object, ...]
    """Breakers and bulkheads already applied by enclosing calls (applied once only)."""
    root: CallScope | None
    """The scope of the outermost guarded call, for the scopes nested in it (``None``
    for that scope itself): what belongs to the whole call lives there."""
    telemetry: Any
    """The call's observed operation (``_instrument._Operation``), on the root scope,
    when instrumentation is on."""
    correlation_id: str | None
    """The correlation ID generated for the call (root scope only), when none was set."""

    def __init__(
        self,
        clock: Callable[[], float],
        deadline_at: float | None,
        in_call: bool,
        attempt: AttemptState | None = None,
        attempt_number: int = 1,
        guards: tuple[object, ...] = (),
        root: CallScope | None = None,
    ) -> None:
        # Written out (not generated): one is made for every guarded call.
        self.clock = clock
        self.deadline_at = deadline_at
        self.in_call = in_call
        self.attempt = AttemptState() if attempt is None else attempt
        self.attempt_number = attempt_number
        self.guards = guards
        self.root = root
        self.telemetry = None
        self.correlation_id = None

    def top(self) -> CallScope:
        """The root scope of the call (this one, when it is the root)."""
        return self.root or self

    def end(self) -> None:
        """The call (or ``deadline`` block) is over. A task it started keeps this scope
        in its copy of the context; if that task outlives the call, it is no longer
        part of it: its guarded calls are calls of their own, under no deadline of
        this one."""
        self.in_call = False
        self.deadline_at = None
        self.telemetry = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or ``None``."""
        if self.deadline_at is None:
            return None
        return self.deadline_at - self.clock()


_SCOPE: ContextVar[CallScope | None] = ContextVar("resilient_db_scope", default=None)

# The variable's methods, bound once: every guarded statement reads the scope, and
# on Python 3.11 an attribute of a ContextVar is looked up anew at each use (the
# interpreter never specializes it), whereas a module global is one cached load.
_get_scope: Final = _SCOPE.get
_set_scope: Final = _SCOPE.set
_reset_scope: Final = _SCOPE.reset


def current_scope() -> CallScope | None:
    """The scope of the guarded call running in this context, if any."""
    return _get_scope()
