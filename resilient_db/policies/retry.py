"""Retries with jittered exponential backoff, driven by tenacity.

The first attempt runs without any tenacity object: the happy path pays nothing for
retries. Only when it fails is a fresh ``tenacity.AsyncRetrying`` built — one per
call, never shared between coroutines (a shared one corrupts its state) — and fed
the first failure as its attempt 1, so that attempt numbers, statistics and stop
conditions are tenacity's own.

Stop conditions, checked before each backoff sleep, in this order:

1. ``retries`` additional attempts have been made;
2. the backoff sleep would end past the call's deadline (no point sleeping into it);
3. the retry budget is empty (checked last, so that a token is only spent on a
   retry that will happen).

Whatever a classifier says, ``CancelledError``, ``KeyboardInterrupt``,
``SystemExit`` and ``GeneratorExit`` are never retried (tenacity's own
``retry_if_not_exception_type`` would retry a cancellation).

When attempts run out, the caller gets the last original exception, with a note
(``add_note``) summarising the attempts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from .. import _validate as v
from .._classify import _EXIT_EXCEPTIONS
from .._scope import CallScope
from .budget import RetryBudget

__all__ = ["Backoff", "RetryPolicy", "is_testing", "set_testing"]

logger = logging.getLogger("resilient_db")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter.

    The n-th retry waits ``min(max, initial * multiplier ** (n - 1))``, reduced by a
    random fraction of up to ``jitter`` of itself. ``jitter=1`` is "full jitter"
    (uniform between 0 and the exponential value), which spreads a crowd of
    retrying clients best; ``jitter=0`` is plain exponential backoff.

    Durations are seconds (numbers or ``timedelta``), normalised when built.
    """

    initial: float = 0.05
    max: float = 2.0
    multiplier: float = 2.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "initial", v.required_seconds("backoff.initial", self.initial, allow_zero=True)
        )
        object.__setattr__(
            self, "max", v.required_seconds("backoff.max", self.max, allow_zero=True)
        )
        object.__setattr__(
            self,
            "multiplier",
            v.positive_number("backoff.multiplier", self.multiplier, minimum_exclusive=0.0),
        )
        if self.multiplier < 1:
            raise ValueError(f"backoff.multiplier must be a number >= 1; got {self.multiplier!r}")
        object.__setattr__(self, "jitter", v.fraction("backoff.jitter", self.jitter))
        if self.max < self.initial:
            raise ValueError(
                f"backoff.max must be >= backoff.initial ({self.initial}); got {self.max!r}"
            )

    def delay(self, retry_number: int, rand: float) -> float:
        """The wait before retry number ``retry_number`` (1-based), given ``rand`` in [0, 1)."""
        if retry_number > 64:
            base = self.max
        else:
            base = min(self.max, self.initial * self.multiplier ** (retry_number - 1))
        return base * (1.0 - self.jitter * rand)


@dataclass(slots=True)
class _TestingState:
    waits_disabled: bool = False


_TESTING = _TestingState()


class _TestingSwitch:
    """Returned by :func:`set_testing`; restores the previous setting when used with ``with``."""

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        _TESTING.waits_disabled = self._previous


def set_testing(on: bool = True) -> _TestingSwitch:
    """Turn backoff waits off (``on=True``) or back on, process-wide.

    Attempts, timeouts and breakers still apply; only the sleeps between attempts
    become zero. Use it directly (e.g. in a pytest fixture) or as a context manager,
    which restores the previous setting on exit::

        with set_testing():
            await flaky_repository_call()   # retries happen, without waiting
    """
    previous = _TESTING.waits_disabled
    _TESTING.waits_disabled = v.boolean("on", on)
    return _TestingSwitch(previous)


def is_testing() -> bool:
    """Whether backoff waits are turned off by :func:`set_testing`."""
    return _TESTING.waits_disabled


@dataclass(slots=True)
class _RetryRun:
    """Per-call bookkeeping shared by the stop, wait and hooks of one tenacity run."""

    scope: CallScope
    started: float
    delays: dict[int, float] = field(default_factory=dict)
    gave_up: str = ""
    reasons: list[str] = field(default_factory=list)


class RetryPolicy:
    """How a failed unit of work is retried.

    Args:
        retries: additional attempts after the first (0 disables retries).
        backoff: the wait between attempts.
        budget: shared retry budget, or ``None`` for no budget.
        clock: monotonic clock, used for the deadline checks.
        sleep: the coroutine that waits (inject a fake in tests).
        rand: random number source in [0, 1) for jitter.
    """

    __slots__ = ("backoff", "budget", "clock", "rand", "retries", "sleep")

    def __init__(
        self,
        *,
        retries: int = 3,
        backoff: Backoff | None = None,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.retries = v.integer("retries", retries, minimum=0)
        self.backoff = backoff if backoff is not None else Backoff()
        self.budget = budget
        self.clock = clock
        self.sleep = sleep
        self.rand = rand

    async def run(
        self,
        scope: CallScope,
        first_failure: BaseException,
        attempt: Callable[[], Awaitable[T]],
        should_retry: Callable[[BaseException, int], tuple[bool, str]],
        *,
        started: float,
        on_retry: Callable[[int, float, BaseException, str], None] | None = None,
    ) -> T:
        """Retry after ``first_failure`` until success or a stop condition.

        ``should_retry(exc, attempt_number)`` returns ``(retry?, reason)``; it sees
        every failure, the first included.
        """
        state = _RetryRun(scope=scope, started=started)
        pending: list[BaseException] = [first_failure]

        async def one_attempt() -> T:
            if pending:
                raise pending.pop()
            scope.attempt_number += 1
            return await attempt()

        def retry_predicate(retry_state: tenacity.RetryCallState) -> bool:
            outcome = retry_state.outcome
            if outcome is None or not outcome.failed:
                return False
            exc = outcome.exception()
            if exc is None or isinstance(exc, _EXIT_EXCEPTIONS):
                return False
            verdict, reason = should_retry(exc, retry_state.attempt_number)
            state.reasons.append(f"#{retry_state.attempt_number} {reason}")
            return verdict

        def next_delay(attempt_number: int) -> float:
            delay = state.delays.get(attempt_number)
            if delay is None:
                delay = self.backoff.delay(attempt_number, self.rand())
                state.delays[attempt_number] = delay
            return delay

        def wait(retry_state: tenacity.RetryCallState) -> float:
            return next_delay(retry_state.attempt_number)

        def stop(retry_state: tenacity.RetryCallState) -> bool:
            number = retry_state.attempt_number
            if number > self.retries:
                state.gave_up = f"all {number} attempts failed"
                return True
            if scope.deadline_at is not None:
                delay = 0.0 if _TESTING.waits_disabled else next_delay(number)
                if self.clock() + delay >= scope.deadline_at:
                    state.gave_up = (
                        f"the deadline would pass during the {delay:.3f}s backoff "
                        f"after attempt {number}"
                    )
                    return True
            if self.budget is not None and not self.budget.try_withdraw():
                state.gave_up = f"retry budget exhausted after attempt {number}"
                return True
            return False

        def before_sleep(retry_state: tenacity.RetryCallState) -> None:
            outcome = retry_state.outcome
            exc = outcome.exception() if outcome is not None else None
            delay = next_delay(retry_state.attempt_number)
            reason = state.reasons[-1] if state.reasons else ""
            if on_retry is not None and exc is not None:
                on_retry(retry_state.attempt_number, delay, exc, reason)

        async def do_sleep(delay: float) -> None:
            await self.sleep(0.0 if _TESTING.waits_disabled else delay)

        retrying: tenacity.AsyncRetrying = tenacity.AsyncRetrying(
            sleep=do_sleep,
            stop=stop,
            wait=wait,
            retry=retry_predicate,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return await retrying(one_attempt)
        except BaseException as exc:
            if not isinstance(exc, _EXIT_EXCEPTIONS) and (
                state.gave_up or scope.attempt_number > 1
            ):
                elapsed = self.clock() - state.started
                why = state.gave_up or (
                    f"attempt {scope.attempt_number} failed with a non-retryable error"
                )
                exc.add_note(
                    f"resilient_db: gave up after {scope.attempt_number} attempt(s) in "
                    f"{elapsed:.3f}s: {why}; failures: {'; '.join(state.reasons)}"
                )
            raise
