"""Circuit breaker: stop calling a database that is down, and find out when it is back.

States::

    CLOSED ──(N consecutive failures, or failure/slow rate over the window)──▶ OPEN
    OPEN ──(reset_timeout elapsed, checked lazily on the next call)──▶ HALF_OPEN
    HALF_OPEN ──(success_threshold probe successes)──▶ CLOSED
    HALF_OPEN ──(a probe fails)──▶ OPEN
    any ──force_open()──▶ OPEN (forced: stays open until reset())
    any ──reset()──▶ CLOSED

Why not aiobreaker's state machine (see DB-FAILURE-FACTS.md): it mixes naive
``utcnow()`` with local ``now()`` for its reopen time, lets every concurrent call
through in half-open, cannot see timeouts applied outside it, and replaces the
tripping call's own error with its ``CircuitBreakerError``. Here:

* time is a monotonic, injectable clock (``time.monotonic`` by default);
* half-open admits ``half_open_max_calls`` probes and rejects everything else;
* a cancelled call is neutral: it counts neither way and gives its probe slot back;
* only what the classifier calls an infrastructure failure counts (connection,
  timeout, server overload); an ``IntegrityError`` or a serialization conflict
  proves the database is up and counts as a success;
* the call that trips the breaker gets its own error; later calls get
  :class:`~resilient_db.CircuitOpenError` without touching the database.

The breaker is not thread-safe: share one per event loop thread (the usual case).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from .. import _validate as v
from .._correlation import _lookup
from .._errors import CircuitOpenError

__all__ = [
    "BreakerListener",
    "BreakerOutcome",
    "BreakerProtocol",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "get_breaker",
    "registered_breakers",
]

logger = logging.getLogger("resilient_db")


class BreakerState(enum.Enum):
    """The state of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOutcome(enum.Enum):
    """How one guarded call ended, from the breaker's point of view."""

    SUCCESS = "success"
    """The database answered (with rows or with an error that proves it is up)."""
    FAILURE = "failure"
    """An infrastructure failure: connection, timeout, server overload."""
    IGNORED = "ignored"
    """Says nothing about the database (cancelled, pool exhausted): counted neither way."""


# The hot paths compare with these module globals: on Python 3.11 reading a member
# from an Enum class is a generic attribute lookup every time (~5x a global load).
_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_SUCCESS: Final = BreakerOutcome.SUCCESS
_FAILURE: Final = BreakerOutcome.FAILURE
_IGNORED: Final = BreakerOutcome.IGNORED


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """Handed to state-change listeners."""

    breaker: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float
    """The breaker clock's reading at the transition (monotonic seconds)."""


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A read-only view of a breaker at one instant."""

    name: str
    state: BreakerState
    forced: bool
    consecutive_failures: int
    window_calls: int
    window_failures: int
    window_slow_calls: int
    failure_rate: float
    slow_call_rate: float
    probes_in_flight: int
    retry_after: float | None
    """Seconds until a probe is admitted (OPEN), else ``None``."""


BreakerListener: TypeAlias = Callable[[BreakerTransition], "Awaitable[None] | None"]
"""A state-change listener: a plain function, or an ``async def`` (run as a task)."""

Permit: TypeAlias = int
"""A token from :meth:`CircuitBreaker.acquire`, handed back to :meth:`~CircuitBreaker.record`."""


class BreakerProtocol(Protocol):
    """What the policy stack needs from a breaker (ours, or an adapter)."""

    @property
    def name(self) -> str: ...

    def acquire(self) -> Permit:
        """Admit a call or raise :class:`CircuitOpenError`."""
        ...

    def record(self, permit: Permit, outcome: BreakerOutcome, duration: float) -> None:
        """Report how an admitted call ended (exactly once per permit)."""
        ...


_BUCKETS: Final = 10


class CircuitBreaker:
    """A circuit breaker for one database (or one dependency).

    Args:
        name: shown in errors, logs, spans and metrics.
        failure_threshold: open after this many consecutive failures (``None``: off).
        failure_rate_threshold: open when the failure rate over the window reaches
            this fraction, once ``minimum_calls`` calls are in it (``None``: off).
        minimum_calls: calls needed in the window before rates are judged.
        window: length of the sliding window in seconds (kept in 10 buckets).
        slow_call_duration: a successful call slower than this counts as slow
            (``None``: slow calls are not tracked).
        slow_call_rate_threshold: open when the slow-call rate over the window
            reaches this fraction.
        reset_timeout: how long to stay open before admitting probes.
        half_open_max_calls: probes admitted at once in half-open; the rest are
            rejected.
        success_threshold: probe successes needed to close (default:
            ``half_open_max_calls``).
        clock: monotonic clock in seconds (inject a fake one in tests).
        listeners: called on every state change.

    Example::

        breaker = CircuitBreaker("orders-db", failure_threshold=5, reset_timeout=10)
        breaker.add_listener(lambda t: print(t.old, "->", t.new))

        @resilient(timeout=2, breaker=breaker)
        async def load(order_id: str) -> Order: ...
    """

    __slots__ = (
        "__weakref__",
        "_b_calls",
        "_b_failures",
        "_b_slow",
        "_bucket_ends",
        "_bucket_width",
        "_clock",
        "_consecutive",
        "_cur_calls",
        "_cur_failures",
        "_cur_slow",
        "_forced",
        "_generation",
        "_last_epoch",
        "_listeners",
        "_opened_at",
        "_probe_successes",
        "_probes",
        "_state",
        "_tasks",
        "_total_calls",
        "_total_failures",
        "_total_slow",
        "failure_rate_threshold",
        "failure_threshold",
        "half_open_max_calls",
        "minimum_calls",
        "name",
        "reset_timeout",
        "slow_call_duration",
        "slow_call_rate_threshold",
        "success_threshold",
        "window",
    )

    def __init__(
        self,
        name: str = "default",
        *,
        failure_threshold: int | None = 5,
        failure_rate_threshold: float | None = 0.5,
        minimum_calls: int = 20,
        window: v.Seconds = 10.0,
        slow_call_duration: v.Seconds | None = None,
        slow_call_rate_threshold: float = 0.8,
        reset_timeout: v.Seconds = 10.0,
        half_open_max_calls: int = 1,
        success_threshold: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[BreakerListener] = (),
    ) -> None:
        self.name = v.name_string("name", name)
        self.failure_threshold = (
            None
            if failure_threshold is None
            else v.integer("failure_threshold", failure_threshold, minimum=1)
        )
        self.failure_rate_threshold = (
            None
            if failure_rate_threshold is None
            else v.fraction("failure_rate_threshold", failure_rate_threshold, allow_zero=False)
        )
        self.minimum_calls = v.integer("minimum_calls", minimum_calls, minimum=1)
        self.window = v.required_seconds("window", window)
        self.slow_call_duration = v.seconds(
            "slow_call_duration", slow_call_duration, allow_none=True
        )
        self.slow_call_rate_threshold = v.fraction(
            "slow_call_rate_threshold", slow_call_rate_threshold, allow_zero=False
        )
        self.reset_timeout = v.required_seconds("reset_timeout", reset_timeout)
        self.half_open_max_calls = v.integer("half_open_max_calls", half_open_max_calls, minimum=1)
        self.success_threshold = (
            self.half_open_max_calls
            if success_threshold is None
            else v.integer("success_threshold", success_threshold, minimum=1)
        )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds; got {clock!r}")
        self._clock = clock
        self._listeners: list[BreakerListener] = []
        for listener in listeners:
            self.add_listener(listener)
        self._tasks: set[asyncio.Task[None]] = set()
        self._bucket_width = self.window / _BUCKETS
        self._state = BreakerState.CLOSED
        self._forced = False
        self._generation = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0
        self._consecutive = 0
        self._clear_window()

    # -- configuration that affects equality of named breakers -------------------------

    def settings(self) -> dict[str, object]:
        """The settings this breaker was built with (used by the named registry)."""
        return {
            "failure_threshold": self.failure_threshold,
            "failure_rate_threshold": self.failure_rate_threshold,
            "minimum_calls": self.minimum_calls,
            "window": self.window,
            "slow_call_duration": self.slow_call_duration,
            "slow_call_rate_threshold": self.slow_call_rate_threshold,
            "reset_timeout": self.reset_timeout,
            "half_open_max_calls": self.half_open_max_calls,
            "success_threshold": self.success_threshold,
        }

    # -- the hot path --------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose timeout has elapsed reads HALF_OPEN)."""
        if (
            self._state is BreakerState.OPEN
            and not self._forced
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            return BreakerState.HALF_OPEN
        return self._state

    def acquire(self) -> Permit:
        """Admit a call, or raise :class:`CircuitOpenError` without calling anything."""
        state = self._state
        if state is _CLOSED:
            return self._generation
        if state is _OPEN:
            if self._forced:
                raise CircuitOpenError(self.name, None)
            now = self._clock()
            elapsed = now - self._opened_at
            # Same comparison as the `state` property, so both always agree.
            if elapsed < self.reset_timeout:
                raise CircuitOpenError(self.name, self.reset_timeout - elapsed)
            self._transition(BreakerState.HALF_OPEN, "reset timeout elapsed", now)
        if self._probes >= self.half_open_max_calls:
            raise CircuitOpenError(self.name, None)
        self._probes += 1
        return self._generation

    def record(self, permit: Permit, outcome: BreakerOutcome, duration: float) -> None:
        """Report the outcome of an admitted call; stale permits are ignored."""
        if permit != self._generation:
            # Admitted under an earlier state (e.g. a slow call that started before the
            # breaker opened): its outcome must not re-trip or close the breaker.
            return
        state = self._state
        if state is _CLOSED:
            if outcome is _IGNORED:
                return
            # The current bucket's counts live in plain attributes: a success in a
            # closed breaker (every healthy call) is a clock read, a comparison and
            # two stores (see _advance).
            clock = self._clock  # `self._clock()` would be an unspecializable method load
            now = clock()
            if now >= self._bucket_ends:
                self._advance(now)
            self._cur_calls += 1
            if outcome is _FAILURE:
                self._cur_failures += 1
                self._consecutive += 1
                self._check_trip(now)
                return
            self._consecutive = 0
            slow = self.slow_call_duration
            if slow is not None and duration >= slow:
                self._cur_slow += 1
                self._check_trip(now)
            return
        if state is BreakerState.HALF_OPEN:
            self._probes -= 1
            if outcome is _IGNORED:
                return
            if outcome is _FAILURE:
                self._open("probe failed", self._clock())
                return
            if self.slow_call_duration is not None and duration >= self.slow_call_duration:
                self._open("probe was slow", self._clock())
                return
            self._probe_successes += 1
            if self._probe_successes >= self.success_threshold:
                self._transition(BreakerState.CLOSED, "probes succeeded", self._clock())

    # -- operator controls ---------------------------------------------------------------

    def force_open(self) -> None:
        """Open the breaker and keep it open (no probes) until :meth:`reset`."""
        self._forced = True
        if self._state is BreakerState.OPEN:
            return
        self._open("forced open", self._clock())

    def reset(self) -> None:
        """Close the breaker and forget all counts (also ends a forced open)."""
        self._forced = False
        if self._state is BreakerState.CLOSED:
            self._generation += 1
            self._consecutive = 0
            self._clear_window()
            return
        self._transition(BreakerState.CLOSED, "reset", self._clock())

    def snapshot(self) -> BreakerSnapshot:
        """A consistent read-only view of the breaker now."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            self._advance(now)
        calls = self._total_calls + self._cur_calls
        failures = self._total_failures + self._cur_failures
        slow = self._total_slow + self._cur_slow
        state = self.state
        retry_after: float | None = None
        if state is BreakerState.OPEN and not self._forced:
            retry_after = max(0.0, self.reset_timeout - (now - self._opened_at))
        return BreakerSnapshot(
            name=self.name,
            state=state,
            forced=self._forced,
            consecutive_failures=self._consecutive,
            window_calls=calls,
            window_failures=failures,
            window_slow_calls=slow,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slow / calls if calls else 0.0,
            probes_in_flight=self._probes if self._state is BreakerState.HALF_OPEN else 0,
            retry_after=retry_after,
        )

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener`` on every state change (sync, or async run as a task)."""
        if not callable(listener):
            raise TypeError(f"listener must be callable; got {listener!r}")
        self._listeners.append(listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    async def drain_listeners(self) -> None:
        """Wait for async listeners scheduled so far (handy in tests and at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.value}>"

    # -- internals -----------------------------------------------------------------------

    def _clear_window(self) -> None:
        self._b_calls = [0] * _BUCKETS
        self._b_failures = [0] * _BUCKETS
        self._b_slow = [0] * _BUCKETS
        self._total_calls = 0
        self._total_failures = 0
        self._total_slow = 0
        self._cur_calls = 0
        self._cur_failures = 0
        self._cur_slow = 0
        epoch = int(self._clock() // self._bucket_width)
        self._last_epoch = epoch
        self._bucket_ends = (epoch + 1) * self._bucket_width

    def _advance(self, now: float) -> None:
        """Move the window to ``now``'s bucket.

        The window is ``_BUCKETS`` buckets of ``window / _BUCKETS`` seconds. The
        current bucket (``_last_epoch``) counts in ``_cur_*``; the earlier ones
        still in the window are in the ``_b_*`` rings (slot = epoch % _BUCKETS),
        summed in ``_total_*``. Moving on folds the current bucket into its slot
        and empties the slots of the buckets skipped, the new one's included (it
        counts in ``_cur_*`` until it ends)."""
        width = self._bucket_width
        epoch = int(now // width)
        last = self._last_epoch
        if epoch <= last:
            return  # the same bucket (or `now` passed _bucket_ends by a rounding hair)
        slot = last % _BUCKETS
        self._b_calls[slot] = self._cur_calls
        self._b_failures[slot] = self._cur_failures
        self._b_slow[slot] = self._cur_slow
        self._total_calls += self._cur_calls
        self._total_failures += self._cur_failures
        self._total_slow += self._cur_slow
        self._cur_calls = self._cur_failures = self._cur_slow = 0
        for step in range(last + 1, min(epoch, last + _BUCKETS) + 1):
            slot = step % _BUCKETS
            self._total_calls -= self._b_calls[slot]
            self._total_failures -= self._b_failures[slot]
            self._total_slow -= self._b_slow[slot]
            self._b_calls[slot] = 0
            self._b_failures[slot] = 0
            self._b_slow[slot] = 0
        self._last_epoch = epoch
        self._bucket_ends = (epoch + 1) * width

    def _check_trip(self, now: float) -> None:
        if self.failure_threshold is not None and self._consecutive >= self.failure_threshold:
            self._open(f"{self._consecutive} consecutive failures", now)
            return
        calls = self._total_calls + self._cur_calls
        if calls < self.minimum_calls:
            return
        failures = self._total_failures + self._cur_failures
        if (
            self.failure_rate_threshold is not None
            and failures / calls >= self.failure_rate_threshold
        ):
            self._open(f"failure rate {failures}/{calls} over {self.window:g}s", now)
            return
        slow = self._total_slow + self._cur_slow
        if self.slow_call_duration is not None and slow / calls >= self.slow_call_rate_threshold:
            self._open(f"slow-call rate {slow}/{calls} over {self.window:g}s", now)

    def _open(self, reason: str, now: float) -> None:
        self._opened_at = now
        self._transition(BreakerState.OPEN, reason, now)

    def _transition(self, new: BreakerState, reason: str, now: float) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._probes = 0
        self._probe_successes = 0
        if new is BreakerState.CLOSED:
            self._consecutive = 0
            self._clear_window()
        elif new is BreakerState.OPEN:
            self._consecutive = 0
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        # The call whose outcome (or admission) caused the transition, when there is one.
        correlation_id = _lookup(False)
        logger.log(
            level,
            "breaker %s %s -> %s (%s)",
            self.name,
            old.value,
            new.value,
            reason,
            extra={
                "resilient_db_event": "breaker_transition",
                "breaker": self.name,
                "breaker_old_state": old.value,
                "breaker_new_state": new.value,
                "breaker_reason": reason,
                "correlation_id": correlation_id,
            },
        )
        transition = None
        if self._listeners:
            transition = BreakerTransition(self.name, old, new, reason, now)
            self._notify(transition)
        for observer in _OBSERVERS:
            if transition is None:
                transition = BreakerTransition(self.name, old, new, reason, now)
            try:
                observer(transition)
            except Exception:
                logger.exception("breaker %s: transition observer %r failed", self.name, observer)

    def _notify(self, transition: BreakerTransition) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(transition)
            except Exception:
                logger.exception("breaker %s: state-change listener %r failed", self.name, listener)
                continue
            if inspect.isawaitable(result):
                self._schedule(listener, result)

    def _schedule(self, listener: BreakerListener, awaitable: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("breaker %s: state-change listener %r failed", self.name, listener)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No loop to run it on (a transition forced from synchronous code):
            # run it to completion here rather than drop it.
            asyncio.run(run())
            return
        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_OBSERVERS: list[Callable[[BreakerTransition], None]] = []
"""Process-wide transition observers (the instrumentation dispatch registers itself)."""


def _add_transition_observer(observer: Callable[[BreakerTransition], None]) -> None:
    if observer not in _OBSERVERS:
        _OBSERVERS.append(observer)


_REGISTRY: dict[str, CircuitBreaker] = {}


def get_breaker(name: str, **settings: object) -> CircuitBreaker:
    """The process-wide breaker called ``name``, created on first use.

    Decorated functions that name the same breaker (``@resilient(breaker="orders-db")``)
    trip it together: one breaker per database. Asking again with settings that differ
    from the existing breaker's raises ``ValueError`` rather than silently ignoring them.
    """
    v.name_string("breaker name", name)
    existing = _REGISTRY.get(name)
    if existing is None:
        breaker = CircuitBreaker(name, **settings)  # type: ignore[arg-type]
        _REGISTRY[name] = breaker
        return breaker
    if settings:
        probe = CircuitBreaker(name, **settings)  # type: ignore[arg-type]
        if probe.settings() != existing.settings():
            raise ValueError(
                f"breaker {name!r} already exists with settings {existing.settings()}; "
                f"got different settings {probe.settings()}"
            )
    return existing


def registered_breakers() -> dict[str, CircuitBreaker]:
    """A copy of the named-breaker registry (for health endpoints and metrics)."""
    return dict(_REGISTRY)


def _clear_registry() -> None:
    _REGISTRY.clear()
