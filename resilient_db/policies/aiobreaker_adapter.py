"""Use an existing ``aiobreaker.CircuitBreaker`` as the breaker of a policy.

For teams that already run aiobreaker (its Redis storage, its listeners, its
dashboards): pass ``AiobreakerAdapter(cb)`` as ``breaker=``. aiobreaker keeps its
own state and counting; the adapter fixes what would otherwise go wrong around it
(see DB-FAILURE-FACTS.md):

* timeouts applied by our policy are reported to it as failures (aiobreaker only
  sees exceptions raised through its own ``call``);
* only errors our classifier counts reach its failure counter (others are
  reported as successes, as aiobreaker does for its excluded exceptions);
* the call that trips it gets its own error, never ``CircuitBreakerError``;
* half-open admits ``half_open_max_calls`` probes at a time instead of everyone;
* rejections raise our :class:`~resilient_db.CircuitOpenError`, with a
  ``retry_after`` computed on aiobreaker's own (naive UTC) clock so that it is right
  whatever the machine's time zone.

What stays aiobreaker's: its wall-clock timing, and a Redis storage that blocks the
event loop on every call. Prefer :class:`~resilient_db.CircuitBreaker` for new code.

This drives aiobreaker 1.2's state objects (``before_call``, ``_handle_success``,
``_handle_error``), the only way to feed it outcomes without running the call
through it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .. import _validate as v
from .._errors import CircuitOpenError
from .breaker import BreakerOutcome, BreakerState, Permit

__all__ = ["AiobreakerAdapter"]


class _CountedFailure(Exception):
    """Stands for a failure we decided to count (aiobreaker wants an exception)."""


class AiobreakerAdapter:
    """Present an ``aiobreaker.CircuitBreaker`` through resilient-db's breaker protocol.

    Example::

        import aiobreaker
        legacy = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))

        @resilient(timeout=2, breaker=AiobreakerAdapter(legacy))
        async def load(order_id: str) -> Order: ...
    """

    __slots__ = ("_cb", "_generation", "_probes", "half_open_max_calls")

    def __init__(self, breaker: Any, *, half_open_max_calls: int = 1) -> None:
        try:
            import aiobreaker
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "AiobreakerAdapter needs aiobreaker: pip install 'resilient-db[aiobreaker]'"
            ) from exc
        if not isinstance(breaker, aiobreaker.CircuitBreaker):
            raise TypeError(f"breaker must be an aiobreaker.CircuitBreaker; got {breaker!r}")
        self._cb = breaker
        self.half_open_max_calls = v.integer("half_open_max_calls", half_open_max_calls, minimum=1)
        self._probes = 0
        self._generation = 0

    @property
    def name(self) -> str:
        """aiobreaker's name for the breaker (or ``"aiobreaker"``)."""
        return str(self._cb.name or "aiobreaker")

    @property
    def wrapped(self) -> Any:
        """The ``aiobreaker.CircuitBreaker`` being adapted."""
        return self._cb

    @property
    def state(self) -> BreakerState:
        """aiobreaker's state, in our terms."""
        return BreakerState(self._cb.current_state.name.lower())

    def _retry_after(self) -> float | None:
        opened_at: datetime | None = self._cb._state_storage.opened_at
        if opened_at is None:
            return None
        # aiobreaker stamps opened_at with naive utcnow(): compare like with like.
        reopen: datetime = opened_at + self._cb.timeout_duration
        now = datetime.now(UTC).replace(tzinfo=None)
        return max(0.0, (reopen - now).total_seconds())

    def acquire(self) -> Permit:
        """Admit a call (moving OPEN to HALF_OPEN when aiobreaker's timeout elapsed)."""
        from aiobreaker.state import CircuitBreakerError

        state = self._cb.state  # syncs with the storage
        name = state.state.name
        if name == "CLOSED":
            return self._generation
        if name == "OPEN":
            try:
                state.before_call(None)
            except CircuitBreakerError:
                raise CircuitOpenError(self.name, self._retry_after()) from None
            self._cb.half_open()
            self._probes = 0
        if self._probes >= self.half_open_max_calls:
            raise CircuitOpenError(self.name, None)
        self._probes += 1
        return self._generation

    def record(self, permit: Permit, outcome: BreakerOutcome, duration: float) -> None:
        """Feed the outcome to aiobreaker's counters and state."""
        from aiobreaker.state import CircuitBreakerError

        if permit != self._generation:
            return
        state = self._cb.state
        half_open = state.state.name == "HALF_OPEN"
        if half_open:
            self._probes = max(0, self._probes - 1)
        if outcome is BreakerOutcome.IGNORED:
            return
        try:
            if outcome is BreakerOutcome.FAILURE:
                state._handle_error(None, _CountedFailure())
            else:
                state._handle_success()
        except (_CountedFailure, CircuitBreakerError):
            # aiobreaker re-raises (or replaces) the failure; the caller gets its own error.
            pass
        if state.state.name != self._cb.current_state.name:
            self._generation += 1
            self._probes = 0

    def __repr__(self) -> str:
        return f"<AiobreakerAdapter {self.name!r} {self.state.value}>"
