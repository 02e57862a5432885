"""The circuit breaker on a fake clock: zero real time, exact transitions."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resilient_db import (
    AttemptTimeout,
    BreakerOutcome,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    CircuitOpenError,
    Classification,
    Policy,
    get_breaker,
)
from resilient_db.testing import FakeClock


class Boom(ConnectionResetError):
    """A connection failure: counts for the breaker."""


def make(clock: FakeClock, **kwargs: object) -> CircuitBreaker:
    settings_: dict[str, object] = {
        "failure_threshold": 3,
        "failure_rate_threshold": None,
        "reset_timeout": 10.0,
        "clock": clock,
    }
    settings_.update(kwargs)
    return CircuitBreaker("db", **settings_)  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), BreakerOutcome.FAILURE, 0.01)


def succeed(breaker: CircuitBreaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        breaker.record(breaker.acquire(), BreakerOutcome.SUCCESS, duration)


def test_opens_after_consecutive_failures() -> None:
    breaker = make(FakeClock())
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = make(FakeClock())
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_opens_on_failure_rate_once_minimum_calls_reached() -> None:
    breaker = make(
        FakeClock(), failure_threshold=None, failure_rate_threshold=0.5, minimum_calls=10
    )
    for _ in range(4):
        succeed(breaker)
        fail(breaker)
    succeed(breaker)  # 9 calls, 4 failures: too few calls to judge
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # 10 calls, 5 failures: 50 %
    assert breaker.state is BreakerState.OPEN


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    breaker = make(
        clock, failure_threshold=None, failure_rate_threshold=0.5, minimum_calls=4, window=10
    )
    fail(breaker, 3)
    clock.advance(11)
    succeed(breaker, 3)
    fail(breaker)  # 4 calls in the window, 1 failure
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().window_calls == 4


def test_opens_on_slow_call_rate() -> None:
    breaker = make(
        FakeClock(),
        failure_threshold=None,
        minimum_calls=4,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.75,
    )
    succeed(breaker, 1, duration=0.1)
    succeed(breaker, 2, duration=2.0)
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker, 1, duration=2.0)
    assert breaker.state is BreakerState.OPEN


def test_open_breaker_rejects_with_retry_after() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.advance(4)
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.breaker == "db"


def test_state_and_acquire_agree_at_the_reset_boundary() -> None:
    # Found by the model test: 23.1 + 10 - 33.1 and 33.1 - 23.1 round differently.
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(77):
        clock.advance(0.3)
    fail(breaker, 3)
    clock.advance(10.0)
    if breaker.state is BreakerState.HALF_OPEN:
        breaker.acquire()
    else:
        with pytest.raises(CircuitOpenError):
            breaker.acquire()


async def test_open_breaker_rejects_without_calling_the_function() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    calls = 0

    async def query() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError):
        await Policy(breaker=breaker, retries=3, clock=clock).call(query)
    assert calls == 0


def test_half_open_after_reset_timeout_admits_one_probe() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.advance(10)
    breaker.acquire()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    assert info.value.retry_after is None


async def test_half_open_lets_one_of_twenty_concurrent_callers_through() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.advance(10)
    release = asyncio.Event()
    reached = 0

    async def query() -> str:
        nonlocal reached
        reached += 1
        await release.wait()
        return "ok"

    policy = Policy(breaker=breaker, retries=0, clock=clock)
    tasks = [asyncio.ensure_future(policy.call(query)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert reached == 1
    assert results.count("ok") == 1
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 19
    assert breaker.state is BreakerState.CLOSED


def test_half_open_admits_the_configured_number_of_probes() -> None:
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=3)
    fail(breaker, 3)
    clock.advance(10)
    for _ in range(3):
        breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()


def test_closes_after_success_threshold_probes() -> None:
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=2, success_threshold=2)
    fail(breaker, 3)
    clock.advance(10)
    first, second = breaker.acquire(), breaker.acquire()
    breaker.record(first, BreakerOutcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(second, BreakerOutcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.CLOSED


def test_failed_probe_reopens_with_a_fresh_timer() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.advance(10)
    breaker.record(breaker.acquire(), BreakerOutcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().retry_after == pytest.approx(10.0)


def test_cancelled_probe_gives_its_permit_back_and_counts_neither_way() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.advance(10)
    breaker.record(breaker.acquire(), BreakerOutcome.IGNORED, 0.01)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire()  # the slot is free again


async def test_cancellation_through_a_policy_is_neutral() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 2)

    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(Policy(breaker=breaker, retries=0, clock=clock).call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.snapshot().consecutive_failures == 2
    assert breaker.state is BreakerState.CLOSED


async def test_timeouts_count_as_failures() -> None:
    breaker = make(FakeClock(), failure_threshold=1)

    async def hang() -> None:
        await asyncio.Event().wait()

    with pytest.raises(AttemptTimeout):
        await Policy(breaker=breaker, retries=0, timeout=0.01).call(hang)
    assert breaker.state is BreakerState.OPEN


async def test_integrity_like_errors_do_not_count() -> None:
    from sqlalchemy.exc import IntegrityError

    breaker = make(FakeClock(), failure_threshold=1)

    async def duplicate() -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        await Policy(breaker=breaker, retries=0).call(duplicate)
    assert breaker.state is BreakerState.CLOSED


def test_a_stale_permit_cannot_reopen_or_close_the_breaker() -> None:
    clock = FakeClock()
    breaker = make(clock)
    slow_call = breaker.acquire()  # admitted while closed
    fail(breaker, 3)
    clock.advance(10)
    probe = breaker.acquire()
    breaker.record(slow_call, BreakerOutcome.SUCCESS, 5.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(probe, BreakerOutcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.CLOSED


def test_force_open_holds_until_reset() -> None:
    clock = FakeClock()
    breaker = make(clock)
    breaker.force_open()
    clock.advance(1000)
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    assert breaker.snapshot().forced
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()


async def test_sync_and_async_listeners_are_both_called() -> None:
    clock = FakeClock()
    seen_sync: list[tuple[BreakerState, BreakerState]] = []
    seen_async: list[tuple[BreakerState, BreakerState]] = []

    def on_change(t: BreakerTransition) -> None:
        seen_sync.append((t.old, t.new))

    async def on_change_async(t: BreakerTransition) -> None:
        await asyncio.sleep(0)
        seen_async.append((t.old, t.new))

    breaker = make(clock, listeners=[on_change, on_change_async])
    fail(breaker, 3)
    clock.advance(10)
    succeed(breaker)
    await breaker.drain_listeners()
    expected = [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert seen_sync == expected
    assert seen_async == expected


def test_async_listener_runs_even_without_a_running_loop() -> None:
    seen: list[BreakerState] = []

    async def on_change(t: BreakerTransition) -> None:
        seen.append(t.new)

    breaker = make(FakeClock(), listeners=[on_change])
    breaker.force_open()
    assert seen == [BreakerState.OPEN]


def test_a_failing_listener_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(t: BreakerTransition) -> None:
        raise RuntimeError("listener bug")

    breaker = make(FakeClock(), listeners=[broken])
    with caplog.at_level(logging.ERROR, logger="resilient_db"):
        fail(breaker, 3)
    assert breaker.state is BreakerState.OPEN
    assert "listener" in caplog.text


def test_named_breakers_are_shared() -> None:
    assert get_breaker("orders") is get_breaker("orders")
    assert Policy(breaker="orders").breaker is get_breaker("orders")


def test_named_breaker_with_conflicting_settings_is_refused() -> None:
    get_breaker("orders", failure_threshold=5)
    with pytest.raises(ValueError, match="already exists with settings"):
        get_breaker("orders", failure_threshold=7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1; got 0"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold must be a number in (0, 1]"),
        ({"minimum_calls": 0}, "minimum_calls must be an integer >= 1"),
        ({"window": 0}, "window must be a number of seconds or a timedelta, > 0"),
        ({"reset_timeout": -1}, "reset_timeout must be a number of seconds or a timedelta, > 0"),
        ({"half_open_max_calls": 0}, "half_open_max_calls must be an integer >= 1"),
        ({"slow_call_rate_threshold": 0}, "slow_call_rate_threshold must be a number in (0, 1]"),
    ],
)
def test_bad_settings_are_refused_with_the_parameter_named(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        CircuitBreaker("db", **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


# -- model-based test ----------------------------------------------------------------------

WINDOW = 10.0
WIDTH = WINDOW / 10


class BreakerModel:
    """The specification, written the simplest way: a list of every recorded call."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.state = "closed"
        self.forced = False
        self.opened_at = 0.0
        self.calls: list[tuple[int, bool]] = []  # (bucket epoch, failed)
        self.consecutive = 0
        self.probes = 0
        self.probe_successes = 0
        self.generation = 0

    def _window(self) -> list[tuple[int, bool]]:
        epoch = int(self.clock() // WIDTH)
        return [c for c in self.calls if c[0] > epoch - 10]

    def _go(self, state: str) -> None:
        self.state = state
        self.generation += 1
        self.probes = 0
        self.probe_successes = 0
        if state in ("closed", "open"):
            self.consecutive = 0
        if state == "closed":
            self.calls = []
        if state == "open":
            self.opened_at = self.clock()

    def acquire(self) -> int | None:
        if self.state == "closed":
            return self.generation
        if self.state == "open":
            if self.forced or self.clock() - self.opened_at < 10.0:
                return None
            self._go("half_open")
        if self.probes >= 2:
            return None
        self.probes += 1
        return self.generation

    def record(self, permit: int, outcome: str) -> None:
        if permit != self.generation:
            return
        if self.state == "closed":
            if outcome == "ignored":
                return
            self.calls.append((int(self.clock() // WIDTH), outcome == "failure"))
            if outcome == "failure":
                self.consecutive += 1
                window = self._window()
                failures = sum(1 for _, failed in window if failed)
                if self.consecutive >= 4 or (len(window) >= 6 and failures / len(window) >= 0.5):
                    self._go("open")
            else:
                self.consecutive = 0
        elif self.state == "half_open":
            self.probes -= 1
            if outcome == "failure":
                self._go("open")
            elif outcome == "success":
                self.probe_successes += 1
                if self.probe_successes >= 2:
                    self._go("closed")


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(
            "model",
            failure_threshold=4,
            failure_rate_threshold=0.5,
            minimum_calls=6,
            window=WINDOW,
            reset_timeout=10.0,
            half_open_max_calls=2,
            success_threshold=2,
            clock=self.clock,
        )
        self.model = BreakerModel(self.clock)
        self.held: list[tuple[int, int]] = []  # (real permit, model permit)

    @rule(seconds=st.sampled_from([0.3, 1.0, 2.5, 6.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def acquire(self) -> None:
        expected = self.model.acquire()
        try:
            permit = self.breaker.acquire()
        except CircuitOpenError:
            assert expected is None
        else:
            assert expected is not None
            self.held.append((permit, expected))

    @precondition(lambda self: bool(self.held))
    @rule(
        index=st.integers(min_value=0, max_value=10),
        outcome=st.sampled_from(["success", "failure", "ignored"]),
    )
    def finish(self, index: int, outcome: str) -> None:
        permit, model_permit = self.held.pop(index % len(self.held))
        self.breaker.record(permit, BreakerOutcome(outcome), 0.01)
        self.model.record(model_permit, outcome)

    @rule()
    def force_open(self) -> None:
        self.breaker.force_open()
        self.model.forced = True
        if self.model.state != "open":
            self.model._go("open")

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.forced = False
        self.model._go("closed")

    @invariant()
    def same_state(self) -> None:
        assert self.breaker._state.value == self.model.state
        if self.model.state == "closed":
            window = self.model._window()
            snapshot = self.breaker.snapshot()
            assert snapshot.window_calls == len(window)
            assert snapshot.window_failures == sum(1 for _, f in window if f)


TestBreakerAgainstModel = BreakerMachine.TestCase
TestBreakerAgainstModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


async def test_a_classifier_that_fails_still_gives_the_probe_slot_back() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("wedge", failure_threshold=1, reset_timeout=1, clock=clock)

    def classifier(exc: BaseException) -> Classification | None:
        if isinstance(exc, KeyError):
            raise RuntimeError("a bug in the classifier")
        return None

    policy = Policy(breaker=breaker, retries=0, retry_budget=None, classifier=classifier)

    async def refused() -> None:
        raise ConnectionRefusedError("down")

    async def app_bug() -> None:
        raise KeyError("app bug")

    with pytest.raises(ConnectionRefusedError):
        await policy.call(refused)
    clock.advance(2)  # half-open: the next call is the probe
    with pytest.raises(RuntimeError, match="classifier"):
        await policy.call(app_bug)
    assert breaker.snapshot().probes_in_flight == 0
    clock.advance(100)
    assert await policy.call(asyncio.sleep, 0, "admitted") == "admitted"


async def test_the_tripping_call_gets_its_own_error_even_with_retries_left() -> None:
    breaker = CircuitBreaker("trip", failure_threshold=1, clock=FakeClock())
    policy = Policy(breaker=breaker, retries=3, backoff=None, retry_budget=None)
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("down")

    with pytest.raises(ConnectionRefusedError):
        await policy.call(refused)
    assert calls == 1  # no retry thrown at a breaker it just opened
    with pytest.raises(CircuitOpenError):
        await policy.call(refused)  # later calls are rejected
