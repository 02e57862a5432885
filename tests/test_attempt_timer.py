"""The attempt timer: armed off the event loop, and never aborting someone else's connection."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from resilient_db import AttemptTimeout, DeadlineExceeded, resilient
from resilient_db._scope import AttemptState
from resilient_db._sqla import install_commit_tracking
from resilient_db.policies import timeout as timeout_module
from resilient_db.policies.timeout import _TIMER_SLOTS, AttemptTimer, ConnectionTimer


async def test_an_armed_attempt_timer_schedules_nothing_on_the_event_loop() -> None:
    # A pending loop timer makes every loop iteration wait in epoll with a timeout
    # (docs/performance.md): the timer thread watches the attempt instead.
    loop = asyncio.get_running_loop()
    scheduled_before = len(loop._scheduled)  # type: ignore[attr-defined]
    timer = AttemptTimer(AttemptState(), 30.0)
    try:
        assert len(loop._scheduled) == scheduled_before  # type: ignore[attr-defined]
        assert timer in timeout_module._WATCHDOG.armed
    finally:
        timer.settle(None)


async def test_a_settled_timer_leaves_the_watchdog() -> None:
    timer = AttemptTimer(AttemptState(), 30.0)
    timer.settle(None)
    assert timer not in timeout_module._WATCHDOG.armed


async def test_a_timer_due_before_the_watchdogs_next_look_still_fires_on_time() -> None:
    # The thread sleeps until the earliest armed timer (30 s away); a 50 ms timer
    # armed after it must wake the thread rather than wait for that.
    far = AttemptTimer(AttemptState(), 30.0)
    try:

        @resilient(timeout=0.05, retries=0, breaker=False)
        async def hangs() -> None:
            await asyncio.Event().wait()

        started = time.monotonic()
        with pytest.raises(AttemptTimeout):
            await hangs()
        assert time.monotonic() - started < 5.0  # generous: 0.05 s expected
    finally:
        far.settle(None)


async def test_an_expiry_that_arrives_after_the_timer_was_settled_cancels_nothing() -> None:
    attempt = AttemptState()
    timer = AttemptTimer(attempt, 30.0)
    timer.settle(None)
    timer._expire()  # what the thread's call_soon_threadsafe would run, too late
    await asyncio.sleep(0)  # a cancellation would be delivered here
    assert attempt.expired_by is None
    assert not timer.fired


async def test_an_expired_attempt_leaves_a_connection_closed_since_alone(
    pg_engine: AsyncEngine,
) -> None:
    # A statement registered as in flight, whose connection then went back to the
    # pool (and out again, to someone else), must not be aborted by the old attempt.
    install_commit_tracking()
    attempt = AttemptState()
    async with pg_engine.connect() as first:
        await first.execute(text("SELECT 1"))
        attempt.inflight = {first.sync_connection: None}
    async with pg_engine.connect() as second:
        raw = await second.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        assert not attempt.abort_inflight()
        assert not driver.is_closed()
        assert (await second.execute(text("SELECT 2"))).scalar() == 2


async def test_an_expired_attempt_aborts_the_connection_of_its_statement(
    pg_engine: AsyncEngine,
) -> None:
    attempt = AttemptState()
    async with pg_engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        attempt.inflight = {conn.sync_connection: None}
        assert attempt.abort_inflight()
        assert driver.is_closed()
        await conn.invalidate()


async def test_nested_calls_sharing_a_deadline_raise_it_not_a_cancellation() -> None:
    # The inner guarded call arms a second timer on the same attempt, due within
    # microseconds of the outer one; both expire in one pass of the watchdog.
    @resilient(breaker=False, retries=0, retry_budget=None)
    async def inner() -> None:
        await asyncio.sleep(5)  # no statement in flight: the timers cancel the task

    @resilient(deadline=0.1, breaker=False, retries=0, retry_budget=None)
    async def outer() -> None:
        await inner()

    for _ in range(5):
        with pytest.raises(DeadlineExceeded):
            await outer()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # every request withdrawn


async def test_a_cancellation_during_the_abort_grace_is_the_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After aborting the I/O in flight the timer waits ABORT_GRACE before cancelling;
    # a cancellation from outside in that window is the caller's: it must propagate,
    # never be retried as a timeout.
    monkeypatch.setattr(AttemptState, "abort_inflight", lambda self: True)
    calls = 0

    @resilient(timeout=0.1, retries=2, backoff=None, breaker=False, retry_budget=None)
    async def unit() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)

    task = asyncio.ensure_future(unit())
    await asyncio.sleep(0.1 + timeout_module.ABORT_GRACE / 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


class _Timed(ConnectionTimer):
    """A ConnectionTimer on a stand-in owner (GuardedConnection is the real one)."""

    __slots__ = ("_abortable", *_TIMER_SLOTS)

    def __init__(self, abortable: bool = False) -> None:
        self._abortable = abortable

    def _timed_connection(self) -> object | None:
        return self if self._abortable else None


def _armed_again() -> tuple[_Timed, float]:
    """A connection timer armed, settled and armed again (a statement, then the
    release), and the due time of its first arming."""
    owner = _Timed()
    owner._arm_timer(30.0)
    first_due = owner.due
    owner._settle_timer(None)
    owner._arm_timer(30.0)
    return owner, first_due


async def test_a_connection_timer_armed_and_settled_in_time_cancels_nothing() -> None:
    owner = _Timed()
    owner._arm_timer(30.0)
    assert owner in timeout_module._WATCHDOG.armed
    assert not owner._settle_timer(None)
    assert owner not in timeout_module._WATCHDOG.armed
    owner._timer_expired(asyncio.current_task(), owner.due)  # type: ignore[arg-type]  # too late
    await asyncio.sleep(0)  # a cancellation would be delivered here
    assert owner._timer_state == 0


async def test_a_late_expiry_does_not_act_on_the_next_arming_by_the_same_task() -> None:
    # A statement's timer ran out just as the statement finished; the release then
    # armed the same connection again in the same task before the expiry arrived.
    owner, first_due = _armed_again()
    owner._timer_expired(asyncio.current_task(), first_due)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # a cancellation would be delivered here
    assert owner._timer_state == 0
    assert not owner._settle_timer(None)


async def test_an_expired_connection_timer_with_nothing_to_abort_cancels_the_task() -> None:
    owner = _Timed()
    owner._arm_timer(0.05)
    with pytest.raises(asyncio.CancelledError) as raised:
        await asyncio.sleep(5)
    assert owner._settle_timer(raised.value)  # the cancellation was the timer's own
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # and it was withdrawn


async def test_an_expired_connection_timer_aborts_first_and_cancels_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aborted: list[object] = []

    def abort(connection: object) -> bool:
        aborted.append(connection)
        return True

    monkeypatch.setattr(timeout_module, "abort_connection", abort)
    owner = _Timed(abortable=True)
    started = time.monotonic()
    owner._arm_timer(0.05)
    with pytest.raises(asyncio.CancelledError) as raised:
        await asyncio.sleep(5)  # a driver that ignores the abort
    assert aborted == [owner]
    assert time.monotonic() - started >= 0.05 + timeout_module.ABORT_GRACE
    assert owner._settle_timer(raised.value)


async def test_a_cancellation_from_outside_is_not_a_connection_timers() -> None:
    owner = _Timed()
    claimed: list[bool] = []

    async def releasing() -> None:
        owner._arm_timer(30.0)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError as exc:
            claimed.append(owner._settle_timer(exc))
            raise

    task = asyncio.ensure_future(releasing())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert claimed == [False]


async def test_an_arming_the_watchdog_took_out_by_mistake_is_watched_again() -> None:
    # The thread saw the first arming due and, before it discarded the connection
    # from its watch, the connection was settled and armed again: the discard took
    # the new arming out of the watch. Its expiry for the old due time puts it back.
    owner, first_due = _armed_again()
    timeout_module._WATCHDOG.armed.discard(owner)  # the thread's late discard
    owner.expire_threadsafe(first_due)
    assert owner in timeout_module._WATCHDOG.armed
    await asyncio.sleep(0)  # an expiry would be delivered here
    assert owner._timer_state == 0
    assert not owner._settle_timer(None)
