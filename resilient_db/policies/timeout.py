"""Per-attempt timeouts and the overall deadline shared through a contextvar.

``timeout`` bounds one attempt; ``deadline`` bounds the whole call, retries and
backoff included. The deadline is stored as an absolute time in a contextvar, so
that everything the call does — nested decorated calls, the engine wrapper, the
server-side ``statement_timeout`` it derives — works with the *remaining* budget.

An attempt with no time left is not started (:class:`DeadlineExceeded`), and a
backoff sleep that would run past the deadline is not slept: the last error is
raised at once instead.

Users can also open a deadline without a policy, e.g. once per HTTP request::

    async with deadline(2.5):
        await repo.place(order)   # every guarded call inside shares the 2.5 s
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

from .. import _validate as v
from .._abort import abort_connection
from .._errors import AttemptTimeout, DeadlineExceeded, TimeoutExceeded
from .._scope import AttemptState, CallScope, _get_scope, _reset_scope, _set_scope

__all__ = [
    "ABORT_GRACE",
    "AttemptTimer",
    "ConnectionTimer",
    "TimeoutPolicy",
    "deadline",
    "remaining_time",
]

ABORT_GRACE = 0.1
"""Seconds a timed-out attempt gives an aborted driver to fail on its own before the
task is cancelled. When the limit is reached, statements in flight are aborted at
the driver level (asyncpg: CancelRequest + terminate; aiosqlite: interrupt), which
usually surfaces the error within milliseconds; the documented bound on when the
caller gets its timeout error is ``limit + ABORT_GRACE``."""


_monotonic: Final = time.monotonic


_RUNNING_TASKS: Final[dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None] = (
    getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
)
"""Python 3.11: the running task of each loop, which ``asyncio.current_task()`` reads
from a Python frame (it is implemented in C from 3.12 on); every attempt with a
time limit asks for it."""
_get_running_loop: Final = asyncio.get_running_loop

_TIMER_CONTEXT: Final = contextvars.Context()
"""The timer's callbacks need no context variables. Without an explicit context,
asyncio would copy the caller's, and keep that copy — with the call's scope in it —
as long as the callback (or a cancelled grace handle) is referenced."""


class _Watched(Protocol):
    """What the watchdog watches: :class:`AttemptTimer`, :class:`ConnectionTimer`."""

    due: float

    def expire_threadsafe(self, due: float) -> None:
        """Its time, ``due``, is up (called by the watchdog's thread)."""


class _Watchdog:
    """Watches every armed timer of the process from one daemon thread.

    Why not ``loop.call_later``: while a timer handle is pending, every iteration of
    the event loop waits in ``epoll`` with a timeout instead of blocking, and reads
    the clock twice more. On a unit of work of three round trips that measured about
    9 µs of CPU per attempt (docs/performance.md) — more than the rest of the policy
    together — for a timer that almost never fires.

    Here arming a timer adds it to a set and compares its due time with
    ``wake_at``, when the thread looks next; only a timer due earlier than that
    takes the lock to wake the thread. Disarming removes it from the set. The thread
    sleeps until the earliest armed timer is due and hands each expiry to the
    timer's own event loop with ``call_soon_threadsafe``: everything an expiry
    does runs in that loop.

    No timer is missed: the thread publishes ``wake_at`` *before* its last look at
    the set, so a timer armed after that look sees the new ``wake_at`` and, if it
    is due earlier, waits on the lock (held until the thread sleeps) to wake it.
    """

    def __init__(self) -> None:
        self.armed: set[_Watched] = set()
        self.wake_at = math.inf
        """When the thread looks next (``inf``: only when woken)."""
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def wake(self, due: float) -> None:
        """A timer due at ``due``, earlier than ``wake_at``, was armed."""
        with self._lock:
            if due >= self.wake_at:
                return  # the thread looked again in the meantime
            self.wake_at = due
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="resilient-db-attempt-timers", daemon=True
                )
                self._thread.start()
            else:
                self._wakeup.notify()

    def _snapshot(self) -> list[_Watched]:
        # The event loops' threads add and discard timers without the lock; copying
        # the set is atomic unless a garbage collection runs Python code halfway.
        while True:
            try:
                return list(self.armed)
            except RuntimeError:  # pragma: no cover - changed size during the copy
                continue

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                soonest = math.inf
                for timer in self._snapshot():
                    due = timer.due  # one read: a ConnectionTimer may be armed again
                    if due <= now:
                        self.armed.discard(timer)
                        timer.expire_threadsafe(due)
                    elif due < soonest:
                        soonest = due
                self.wake_at = soonest
                if any(timer.due < soonest for timer in self._snapshot()):
                    continue  # armed during the scan, before wake_at was published
                self._wakeup.wait(None if soonest == math.inf else soonest - now)


_WATCHDOG = _Watchdog()


def _new_watchdog_after_fork() -> None:  # pragma: no cover - runs in a forked child
    global _WATCHDOG
    _WATCHDOG = _Watchdog()  # the parent's thread does not exist in the child


os.register_at_fork(after_in_child=_new_watchdog_after_fork)


class AttemptTimer:
    """One attempt's time limit: abort the I/O in flight first, then cancel the task.

    Armed on the process's timer thread (see :class:`_Watchdog`), not as a handle on
    the event loop; the expiry itself runs in the attempt's loop. Same bookkeeping as
    ``asyncio.timeout``: a cancellation is the timer's own only if the task's count
    of cancellation requests, once the timer's is withdrawn, is back to what it was
    when the attempt started — any other cancellation belongs to someone else and
    is propagated untouched.
    """

    __slots__ = ("_attempt", "_base", "_grace", "_live", "_outer_deadline", "_task", "due", "fired")

    def __init__(self, attempt: AttemptState, limit: float, start: float | None = None):
        """Arm a timer of ``limit`` seconds for ``attempt``, and register it there
        until :meth:`settle`: in ``attempt.timers``, and in ``attempt.deadline_at``
        as ``start + limit`` (``start``: on the policy's clock; ``None``: leave the
        deadline alone) if nothing armed earlier ends sooner."""
        tasks = _RUNNING_TASKS
        task = asyncio.current_task() if tasks is None else tasks.get(_get_running_loop())
        assert task is not None, "a guarded call runs in a task"
        self._task = task
        self._base = task.cancelling()
        self._attempt = attempt
        self._grace: asyncio.TimerHandle | None = None
        self._live = True
        self.fired = False
        """The timer asked for the task to be cancelled."""
        self.due = due = _monotonic() + limit
        """When it runs out, on ``time.monotonic``."""
        watchdog = _WATCHDOG
        watchdog.armed.add(self)
        if due < watchdog.wake_at:
            watchdog.wake(due)
        self._outer_deadline = outer = attempt.deadline_at
        if start is not None and (outer is None or start + limit < outer):
            attempt.deadline_at = start + limit
        timers = attempt.timers
        if timers is None:
            attempt.timers = [self]
        else:
            timers.append(self)

    def expire_threadsafe(self, due: float) -> None:
        """Called by the timer thread when the time is up (``due``: one timer
        object is armed once)."""
        # A closed loop raises: then there is nothing left to stop.
        with contextlib.suppress(Exception):
            self._task.get_loop().call_soon_threadsafe(self._expire, context=_TIMER_CONTEXT)

    def _expire(self) -> None:
        if not self._live:
            return  # disarmed while the expiry was on its way to the loop
        attempt = self._attempt
        other = attempt.expired_by
        if isinstance(other, AttemptTimer) and other is not self and other._live:
            # Nested guarded calls arm timers on the same attempt, often due within
            # microseconds of each other: the first to expire owns the outcome. A
            # second cancellation would be taken for someone else's.
            return
        attempt.expired_by = self
        if attempt.abort_inflight():
            # The driver usually fails within milliseconds of the abort; give it
            # ABORT_GRACE before falling back to cancelling the task.
            self._grace = self._task.get_loop().call_later(
                ABORT_GRACE, self._cancel, context=_TIMER_CONTEXT
            )
        else:
            self._cancel()

    def _cancel(self) -> None:
        self.fired = True
        self._task.cancel()

    def disarm(self) -> None:
        """Stop the timer (it can no longer abort anything or cancel the task)."""
        if self._live:
            self._live = False
            _WATCHDOG.armed.discard(self)
        if self._grace is not None:
            self._grace.cancel()

    def resume(self, paused: float) -> None:
        """Arm again after :meth:`disarm`, due ``paused`` seconds later (a timer
        still armed, or settled, is left alone)."""
        if self._live or self not in (self._attempt.timers or ()):
            return
        self._live = True
        self._grace = None
        self.due = due = self.due + paused
        watchdog = _WATCHDOG
        watchdog.armed.add(self)
        if due < watchdog.wake_at:
            watchdog.wake(due)

    @property
    def live(self) -> bool:
        """Whether it is armed (not disarmed, not settled)."""
        return self._live

    def settle(self, exc: BaseException | None) -> bool:
        """Disarm, unregister from the attempt, withdraw our cancellation request,
        and say whether the attempt ended because of this timer (``exc`` is what
        ended it, if anything). Call it once."""
        if self._live:
            self._live = False
            _WATCHDOG.armed.discard(self)
        attempt = self._attempt
        attempt.deadline_at = self._outer_deadline
        timers = attempt.timers
        if timers is not None:
            timers.remove(self)
        if attempt.expired_by is None:
            # No timer of this attempt expired: none fired, no grace is pending.
            return False
        if self._grace is not None:
            self._grace.cancel()
        ours = True
        if self.fired:
            # Withdraw our cancellation request in every case, or the task stays
            # marked as cancelling.
            ours = self._task.uncancel() <= self._base
        if attempt.expired_by is not self:
            return False
        if isinstance(exc, asyncio.CancelledError):
            # Only a cancellation we requested is ours. Before it is requested (the
            # ABORT_GRACE window after aborting the I/O) a cancellation is someone
            # else's: the caller's, to be propagated, never retried as a timeout.
            return self.fired and ours
        return exc is not None

    _settle_timer = settle
    """:meth:`settle`, under the name :class:`ConnectionTimer` uses (the policy's
    attempt settles either kind)."""


_TIMER_SLOTS: Final = ("_timer_base", "_timer_grace", "_timer_state", "_timer_task", "due")
"""The slots a :class:`ConnectionTimer` subclass declares for it."""


class ConnectionTimer:
    """A time limit on work whose connection is known in advance — a connection's
    release, and its own statements outside a transaction — kept in slots of the
    object that owns that connection.

    When the time is up it does what :class:`AttemptTimer` does for an attempt:
    abort the connection's I/O in flight, and cancel the task only if the driver did
    not give up within :data:`ABORT_GRACE` (or nothing was in flight). Unlike an
    attempt timer it has no attempt to register in and no deadline to share, so
    arming it allocates nothing: it runs at every such statement and every release.
    The connection aborted is the statement's, as the dialect would have registered
    it with an attempt timer (the policy arms it: ``Policy._invoke(timed=...)``).

    A subclass declares the slots annotated here (``__slots__ = (..., *_TIMER_SLOTS)``)
    and says which SQLAlchemy ``Connection`` is timed (:meth:`_timed_connection`).
    One timer per object, armed and settled in turn.
    """

    if not TYPE_CHECKING:
        # Empty, so that it mixes into a class with slots of its own (the subclass
        # declares the ones annotated below); hidden from mypy, which would take
        # the annotations for attributes outside the slots.
        __slots__ = ()

    due: float
    """When it runs out, on ``time.monotonic`` (read by the watchdog)."""
    _timer_task: asyncio.Task[Any] | None
    """The task it bounds while armed; ``None`` once settled."""
    _timer_base: int
    _timer_state: int
    """0: quiet; 1: the I/O in flight was aborted; 2: the task was cancelled."""
    _timer_grace: asyncio.TimerHandle | None

    def _timed_connection(self) -> Any:
        """The SQLAlchemy ``Connection`` whose I/O to abort (``None``: none)."""
        raise NotImplementedError

    def _arm_timer(self, limit: float) -> Self:
        """Arm it: due ``limit`` seconds from now, for the running task."""
        tasks = _RUNNING_TASKS
        task = asyncio.current_task() if tasks is None else tasks.get(_get_running_loop())
        assert task is not None, "a guarded call runs in a task"
        self._timer_task = task
        self._timer_base = task.cancelling()
        self._timer_state = 0
        self.due = due = _monotonic() + limit
        watchdog = _WATCHDOG
        watchdog.armed.add(self)
        if due < watchdog.wake_at:
            watchdog.wake(due)
        return self

    def _settle_timer(self, exc: BaseException | None) -> bool:
        """Disarm it, withdraw its cancellation request, and say whether the work
        ended because of it (``exc``: what ended the work, if anything)."""
        task = self._timer_task
        self._timer_task = None
        _WATCHDOG.armed.discard(self)
        state = self._timer_state
        if state == 0 or task is None:
            return False
        grace = self._timer_grace
        if grace is not None:
            grace.cancel()
        ours = state == 2 and task.uncancel() <= self._timer_base
        if isinstance(exc, asyncio.CancelledError):
            # Only a cancellation it requested is its own (see AttemptTimer.settle).
            return ours
        return exc is not None

    def expire_threadsafe(self, due: float) -> None:
        """Called by the timer thread when the arming due at ``due`` ran out."""
        task = self._timer_task
        if task is None:
            return  # settled meanwhile
        if self.due != due:
            # Settled and armed again between the thread's look and its discard,
            # which may have taken the new arming out of the watch: put it back.
            _WATCHDOG.armed.add(self)
            return
        with contextlib.suppress(Exception):  # a closed loop: nothing left to stop
            task.get_loop().call_soon_threadsafe(
                self._timer_expired, task, due, context=_TIMER_CONTEXT
            )

    def _armed_as(self, task: asyncio.Task[Any], due: float) -> bool:
        """Whether it is still the arming that ran out: armed for ``task``, due at
        ``due``. The object is armed again and again (each statement, the release),
        often by the same task: an expiry that reaches the loop after its arming was
        settled must not act on the next one."""
        return self._timer_task is task and self.due == due

    def _timer_expired(self, task: asyncio.Task[Any], due: float) -> None:
        if not self._armed_as(task, due):
            return
        self._timer_state = 1
        self._timer_grace = None
        connection = self._timed_connection()
        if connection is not None and abort_connection(connection):
            self._timer_grace = task.get_loop().call_later(
                ABORT_GRACE, self._timer_cancel, task, due, context=_TIMER_CONTEXT
            )
        else:
            self._timer_cancel(task, due)

    def _timer_cancel(self, task: asyncio.Task[Any], due: float) -> None:
        if self._armed_as(task, due):
            self._timer_state = 2
            task.cancel()


@dataclass(frozen=True, slots=True)
class TimeoutPolicy:
    """Per-attempt ``timeout`` and overall ``deadline``, validated and in seconds."""

    timeout: float | None = None
    deadline: float | None = None

    @classmethod
    def build(cls, timeout: v.Seconds | None, deadline: v.Seconds | None) -> TimeoutPolicy:
        return cls(
            timeout=v.seconds("timeout", timeout, allow_none=True),
            deadline=v.seconds("deadline", deadline, allow_none=True),
        )

    def attempt_limit(self, scope: CallScope, attempt: int) -> tuple[float | None, bool]:
        """How long the next attempt may run, and whether the deadline is what binds.

        Raises :class:`DeadlineExceeded` when no time is left to start it.
        """
        limit = self.timeout
        if scope.deadline_at is None:
            return limit, False
        remaining = scope.deadline_at - scope.clock()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"deadline exceeded before attempt {attempt} could start",
                float(self.deadline or 0.0),
            )
        if limit is None or remaining < limit:
            return remaining, True
        return limit, False

    def expired(self, limit: float, by_deadline: bool, attempt: int) -> TimeoutExceeded:
        """The error for an attempt whose limit ran out."""
        if by_deadline:
            return DeadlineExceeded(
                f"deadline exceeded during attempt {attempt} ({limit:.3f}s were left)", limit
            )
        return AttemptTimeout(f"attempt {attempt} timed out after {limit:.3f}s", limit)


def remaining_time() -> float | None:
    """Seconds left before the current deadline, or ``None`` when there is none."""
    scope = _get_scope()
    if scope is None:
        return None
    return scope.remaining()


@asynccontextmanager
async def deadline(
    seconds: v.Seconds, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[None]:
    """Give everything inside at most ``seconds``, shared by every guarded call.

    Nested deadlines only ever shorten the budget. This sets the budget; it does not
    interrupt code that is not guarded (wrap that in ``asyncio.timeout``).
    """
    budget = v.required_seconds("seconds", seconds)
    outer = _get_scope()
    deadline_at = clock() + budget
    if outer is not None and outer.deadline_at is not None:
        deadline_at = min(deadline_at, outer.deadline_at)
    if outer is not None:
        scope = CallScope(
            clock,
            deadline_at,
            in_call=outer.in_call,
            attempt=outer.attempt,
            attempt_number=outer.attempt_number,
            guards=outer.guards,
            root=outer.top(),
        )
    else:
        scope = CallScope(clock, deadline_at, in_call=False)
    token = _set_scope(scope)
    try:
        yield
    finally:
        _reset_scope(token)
        scope.end()
