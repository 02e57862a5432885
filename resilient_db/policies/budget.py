"""Retry budget: retries may add at most a fraction on top of first attempts.

During an outage every caller fails, and a naive retry policy multiplies the load
on a database that is trying to come back by ``retries + 1``. A budget (as in
Finagle and gRPC) caps retries to a ratio of the real traffic::

    each first attempt deposits ``ratio`` tokens (up to ``max_tokens``);
    each retry withdraws one token;
    a floor of ``min_per_second`` tokens per second (burst of one second's worth)
    lets a quiet service still retry a lone failure.

Over any period of ``D`` seconds with ``N`` first attempts, retries are bounded by
``max_tokens + ratio * N + min_per_second * (D + 1)``; when the budget is empty the
caller gets the original error at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import _validate as v

__all__ = ["RetryBudget"]


class RetryBudget:
    """A token bucket shared by every call of a policy (or an engine).

    Args:
        ratio: tokens deposited per first attempt (0.2: retries add at most 20 %).
        min_per_second: floor of retries allowed per second whatever the traffic.
        max_tokens: cap on banked tokens, so a long healthy period cannot fund a
            retry storm later.
        clock: monotonic clock in seconds (inject a fake one in tests).

    Example::

        shared = RetryBudget(ratio=0.1)
        reads = Policy(retries=3, retry_budget=shared)
        writes = Policy(retries=1, retry_budget=shared)
    """

    __slots__ = (
        "_clock",
        "_floor",
        "_floor_at",
        "_floor_cap",
        "_synced",
        "_tokens",
        "deposits",
        "max_tokens",
        "min_per_second",
        "ratio",
        "rejected",
        "withdrawals",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        max_tokens: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = v.fraction("ratio", ratio)
        self.min_per_second = v.non_negative_number("min_per_second", min_per_second)
        self.max_tokens = v.non_negative_number("max_tokens", max_tokens)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds; got {clock!r}")
        self._clock = clock
        self._tokens = 0.0
        self._synced = 0
        """``deposits`` already added into ``_tokens`` (see :meth:`_banked`)."""
        # The floor's bucket holds one second's worth, and at least one token: with
        # min_per_second below 1 it must still fill up to a whole retry.
        self._floor_cap = max(1.0, self.min_per_second) if self.min_per_second > 0 else 0.0
        self._floor = self._floor_cap
        self._floor_at = clock()
        self.deposits = 0
        self.withdrawals = 0
        self.rejected = 0

    def deposit(self) -> None:
        """Record a first attempt."""
        # Every first attempt deposits: only count it here. Adding n deposits at
        # once, capped, is what adding them one at a time, capped each time, gives
        # (all are positive; equal up to float rounding), so the tokens are brought
        # up to date when a retry asks for one.
        self.deposits += 1

    def _banked(self) -> float:
        """The banked tokens, with the deposits made since the last withdrawal
        attempt (capped; not stored: only :meth:`try_withdraw` folds them in, so
        that reading :attr:`available` never changes what a retry is allowed)."""
        tokens = self._tokens + (self.deposits - self._synced) * self.ratio
        return tokens if tokens < self.max_tokens else self.max_tokens

    def try_withdraw(self) -> bool:
        """Take one token for a retry; ``False`` when the budget is spent."""
        self._tokens = self._banked()
        self._synced = self.deposits
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.withdrawals += 1
            return True
        if self.min_per_second > 0:
            now = self._clock()
            refill = (now - self._floor_at) * self.min_per_second
            self._floor_at = now
            self._floor = min(self._floor_cap, self._floor + refill)
            if self._floor >= 1.0:
                self._floor -= 1.0
                self.withdrawals += 1
                return True
        self.rejected += 1
        return False

    @property
    def available(self) -> float:
        """Tokens available now (banked plus floor), for telemetry."""
        now = self._clock()
        floor = min(self._floor_cap, self._floor + (now - self._floor_at) * self.min_per_second)
        return self._banked() + floor

    def __repr__(self) -> str:
        return (
            f"<RetryBudget ratio={self.ratio} min_per_second={self.min_per_second} "
            f"available={self.available:.2f}>"
        )
