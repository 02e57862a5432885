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

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .. import _validate as v
from .._errors import AttemptTimeout, DeadlineExceeded, TimeoutExceeded
from .._scope import _SCOPE, CallScope

__all__ = ["ABORT_GRACE", "TimeoutPolicy", "deadline", "remaining_time"]

ABORT_GRACE = 0.1
"""Seconds a timed-out attempt gives an aborted driver to fail on its own before the
task is cancelled. When the limit is reached, statements in flight are aborted at
the driver level (asyncpg: CancelRequest + terminate; aiosqlite: interrupt), which
usually surfaces the error within milliseconds; the documented bound on when the
caller gets its timeout error is ``limit + ABORT_GRACE``."""


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
