"""Bulkhead: at most N calls at once, a bounded queue, then :class:`BulkheadFull`.

A database has a fixed number of connections; letting a thousand coroutines queue
for them turns a slow query into a pile-up of timeouts. A bulkhead sheds the excess
early, where it is cheap, and tells the caller so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from .. import _validate as v
from .._errors import BulkheadFull, DeadlineExceeded

__all__ = ["Bulkhead"]


class Bulkhead:
    """Limit concurrent calls, with an optional bounded FIFO queue.

    Args:
        max_concurrent: calls allowed to run at once.
        max_queue: calls allowed to wait for a slot (0: reject at once when full).
        queue_timeout: longest wait for a slot, in seconds (``None``: wait as long
            as the caller's deadline allows).
        name: shown in errors and telemetry.

    Example::

        reports = Bulkhead(4, max_queue=16, queue_timeout=0.5, name="reports")

        @resilient(timeout=30, bulkhead=reports)
        async def monthly_report() -> Report: ...
    """

    __slots__ = ("_active", "_waiters", "max_concurrent", "max_queue", "name", "queue_timeout")

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queue: int = 0,
        queue_timeout: v.Seconds | None = None,
        name: str = "bulkhead",
    ) -> None:
        self.max_concurrent = v.integer("max_concurrent", max_concurrent, minimum=1)
        self.max_queue = v.integer("max_queue", max_queue, minimum=0)
        self.queue_timeout = v.seconds(
            "queue_timeout", queue_timeout, allow_none=True, allow_zero=True
        )
        self.name = v.name_string("name", name)
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def try_acquire(self) -> bool:
        """Take a slot if one is free right now (never waits)."""
        if self._active < self.max_concurrent and not self._waiters:
            self._active += 1
            return True
        return False

    async def acquire(self, deadline_remaining: float | None = None) -> None:
        """Take a slot, waiting in the queue if allowed.

        Raises :class:`BulkheadFull` when the queue is full or the wait times out,
        and :class:`DeadlineExceeded` when the caller's remaining deadline (shorter
        than ``queue_timeout``) ran out first.
        """
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            raise BulkheadFull(self.name, self.max_concurrent, self.max_queue, "queue full")
        wait = self.queue_timeout
        deadline_bound = deadline_remaining is not None and (
            wait is None or deadline_remaining < wait
        )
        if deadline_bound:
            wait = deadline_remaining
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if wait is None:
                await waiter
            else:
                async with asyncio.timeout(wait):
                    await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the timer fired: pass it on.
                self.release()
            if deadline_bound:
                raise DeadlineExceeded(
                    f"deadline ran out after waiting {wait:.3f}s for bulkhead {self.name!r}",
                    float(wait or 0.0),
                ) from None
            raise BulkheadFull(
                self.name, self.max_concurrent, self.max_queue, f"waited {wait}s for a slot"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self) -> None:
        """Give a slot back, handing it straight to the longest waiter if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                # The slot moves to the waiter: _active stays the same.
                waiter.set_result(None)
                return
        self._active -= 1

    def __repr__(self) -> str:
        return (
            f"<Bulkhead {self.name!r} active={self._active}/{self.max_concurrent} "
            f"queued={self.queued}/{self.max_queue}>"
        )
