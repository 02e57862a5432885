"""Event-loop lag: how long the loop was blocked, measured by a late timer.

Blocking the event loop (a synchronous driver call, a CPU-bound loop, a
``time.sleep``) is the most common failure of async database code, and it looks
like a slow database: every query on the loop waits. A probe asks the loop to
run a callback every ``interval`` seconds and records how late it ran. It costs
one timer callback per interval, and nothing on the database path.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from types import TracebackType

from . import _validate as v

__all__ = ["EventLoopLagProbe"]

logger = logging.getLogger("resilient_db")

_PROBES: weakref.WeakSet[EventLoopLagProbe] = weakref.WeakSet()


def live_probes() -> list[EventLoopLagProbe]:
    """The probes currently running (read by the ``resilient_db.event_loop.lag`` gauge)."""
    return [probe for probe in list(_PROBES) if probe.running]


class EventLoopLagProbe:
    """Measure event-loop lag and report it as the ``resilient_db.event_loop.lag`` gauge.

    Opt-in: start one per event loop, e.g. in the application's lifespan. The gauge
    reports, per probe, the largest lag measured since it was last read (a blocked
    loop is a spike: an average would hide it).

    Args:
        interval: seconds between two measurements.
        warn_after: log a WARNING (``resilient_db_event="event_loop_lag"``) for any
            lag at least this long (``None``: never).
        name: the ``resilient_db.event_loop.probe`` attribute of the gauge.

    Example::

        async with EventLoopLagProbe(interval=0.25, warn_after=0.1):
            await serve()
    """

    __slots__ = (
        "__weakref__",
        "_due",
        "_handle",
        "_loop",
        "_peak",
        "interval",
        "last",
        "max",
        "name",
        "samples",
        "warn_after",
    )

    def __init__(
        self,
        *,
        interval: v.Seconds = 0.5,
        warn_after: v.Seconds | None = None,
        name: str = "default",
    ) -> None:
        self.interval = v.required_seconds("interval", interval)
        self.warn_after = v.seconds("warn_after", warn_after, allow_none=True)
        self.name = v.name_string("name", name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._peak = 0.0
        self.last: float | None = None
        """The lag measured last (seconds), ``None`` before the first measurement."""
        self.max = 0.0
        """The largest lag measured since :meth:`start`."""
        self.samples = 0
        """How many measurements were taken."""

    @property
    def running(self) -> bool:
        """Whether the probe is measuring."""
        return self._handle is not None

    def start(self) -> None:
        """Start measuring the running event loop (``RuntimeError`` outside one)."""
        if self._handle is not None:
            raise RuntimeError("this EventLoopLagProbe is already running")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)
        _PROBES.add(self)

    def stop(self) -> None:
        """Stop measuring (idempotent)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        _PROBES.discard(self)

    async def __aenter__(self) -> EventLoopLagProbe:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _tick(self) -> None:
        loop = self._loop
        if loop is None or self._handle is None:
            return
        now = loop.time()
        lag = max(0.0, now - self._due)
        self.last = lag
        self.samples += 1
        if lag > self.max:
            self.max = lag
        if lag > self._peak:
            self._peak = lag
        if self.warn_after is not None and lag >= self.warn_after:
            logger.warning(
                "event loop blocked for %.3fs (probe %s)",
                lag,
                self.name,
                extra={"resilient_db_event": "event_loop_lag", "lag": lag, "probe": self.name},
            )
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def _take_peak(self) -> float:
        """The largest lag since the previous call (what the gauge reports)."""
        peak, self._peak = self._peak, 0.0
        return peak

    def __repr__(self) -> str:
        return f"<EventLoopLagProbe {self.name!r} interval={self.interval} max={self.max:.4f}>"
