"""Helpers for testing code that uses resilient-db.

* :func:`set_testing` turns backoff waits off (process-wide; also a context manager).
* :class:`FakeClock` is a monotonic clock you move by hand, with a matching
  ``sleep``: breakers, budgets and retry deadlines run on it in zero real time.
* :func:`reset_breakers` forgets every named breaker (between tests).

Example::

    from resilient_db import CircuitBreaker, CircuitOpenError
    from resilient_db.testing import FakeClock

    clock = FakeClock()
    breaker = CircuitBreaker("db", failure_threshold=2, reset_timeout=5, clock=clock)
    ...
    clock.advance(5)      # the breaker now admits a probe
"""

from __future__ import annotations

import asyncio

from . import _validate as v
from .policies.breaker import _clear_registry
from .policies.retry import is_testing, set_testing

__all__ = ["FakeClock", "is_testing", "reset_breakers", "set_testing"]


class FakeClock:
    """A monotonic clock that only moves when told to.

    Call it to read the time; :meth:`advance` moves it; :meth:`sleep` is an
    ``asyncio.sleep`` replacement that advances the clock instead of waiting (it
    still yields to the event loop once, so other tasks run).

    >>> clock = FakeClock(start=100.0)
    >>> clock.advance(2.5)
    >>> clock()
    102.5
    """

    __slots__ = ("_now", "sleeps")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self.sleeps: list[float] = []
        """Every delay passed to :meth:`sleep`, in order."""

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0)."""
        self._now += v.non_negative_number("seconds", seconds)

    async def sleep(self, seconds: float) -> None:
        """Record the delay, advance the clock by it, and yield once."""
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"FakeClock({self._now})"


def reset_breakers() -> None:
    """Forget every named breaker, so that the next test starts from CLOSED."""
    _clear_registry()
