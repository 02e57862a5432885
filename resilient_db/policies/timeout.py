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
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

from .. import _validate as v
from .._errors import AttemptTimeout, DeadlineExceeded, TimeoutExceeded
from .._scope import _SCOPE, AttemptState, CallScope

__all__ = ["ABORT_GRACE", "AttemptTimer", "TimeoutPolicy", "deadline", "remaining_time"]

ABORT_GRACE = 0.1
"""Seconds a timed-out attempt gives an aborted driver to fail on its own before the
task is cancelled. When the limit is reached, statements in flight are aborted at
the driver level (asyncpg: CancelRequest + terminate; aiosqlite: interrupt), which
usually surfaces the error within milliseconds; the documented bound on when the
caller gets its timeout error is ``limit + ABORT_GRACE``."""


_TIMER_CONTEXT: Final = contextvars.Context()
"""The timer's callbacks need no context variables. Without an explicit context,
``call_later`` would copy the caller's, and a cancelled timer keeps that copy — with
the call's scope in it — until asyncio purges cancelled timers, which only happens
when the loop runs: guarded calls that complete without suspending would pile up."""


class AttemptTimer:
    """One attempt's time limit: abort the I/O in flight first, then cancel the task.

    Cheaper than ``asyncio.timeout`` (one scheduled handle, no context manager), with
    the same bookkeeping: a cancellation is the timer's own only if the task's count
    of cancellation requests, once the timer's is withdrawn, is back to what it was
    when the attempt started — any other cancellation belongs to someone else and
    is propagated untouched.
    """

    __slots__ = ("_attempt", "_base", "_grace", "_handle", "_loop", "_task", "fired")

    def __init__(self, attempt: AttemptState, limit: float, loop: asyncio.AbstractEventLoop):
        task = asyncio.current_task(loop)
        assert task is not None, "a guarded call runs in a task"
        self._task = task
        self._base = task.cancelling()
        self._attempt = attempt
        self._loop = loop
        self._grace: asyncio.TimerHandle | None = None
        self.fired = False
        """The timer asked for the task to be cancelled."""
        self._handle = loop.call_later(limit, self._expire, context=_TIMER_CONTEXT)

    def _expire(self) -> None:
        attempt = self._attempt
        attempt.expired_by = self
        if attempt.abort_inflight():
            # The driver usually fails within milliseconds of the abort; give it
            # ABORT_GRACE before falling back to cancelling the task.
            self._grace = self._loop.call_later(ABORT_GRACE, self._cancel, context=_TIMER_CONTEXT)
        else:
            self._cancel()

    def _cancel(self) -> None:
        self.fired = True
        self._task.cancel()

    def disarm(self) -> None:
        """Stop the timer (it can no longer abort anything or cancel the task)."""
        self._handle.cancel()
        if self._grace is not None:
            self._grace.cancel()

    def settle(self, exc: BaseException | None) -> bool:
        """Disarm, withdraw our cancellation request, and say whether the attempt
        ended because of this timer (``exc`` is what ended it, if anything)."""
        self.disarm()
        if self._attempt.expired_by is not self:
            return False
        if self.fired:
            ours = self._task.uncancel() <= self._base
            if isinstance(exc, asyncio.CancelledError):
                return ours
        return exc is not None


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
    scope = _SCOPE.get()
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
    outer = _SCOPE.get()
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
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
