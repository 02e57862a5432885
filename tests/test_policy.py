"""@resilient / Policy: retries, notes, cancellation, deadlines, nesting, decoration rules."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from resilient_db import (
    AttemptTimeout,
    Backoff,
    Classification,
    DeadlineExceeded,
    ErrorCategory,
    Policy,
    RetryBudget,
    deadline,
    remaining_time,
    resilient,
)
from resilient_db.testing import FakeClock, set_testing


class Flaky:
    """Fails with ``error`` for the first ``failures`` calls, then returns ``"ok"``."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error if error is not None else ConnectionResetError("reset by peer")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def quick(**kwargs: Any) -> Policy:
    clock = kwargs.pop("clock", None) or FakeClock()
    kwargs.setdefault("breaker", False)
    kwargs.setdefault("retry_budget", None)
    return Policy(clock=clock, sleep=clock.sleep, **kwargs)


async def test_retryable_errors_are_retried_until_success() -> None:
    flaky = Flaky(2)
    assert await quick(retries=3).call(flaky) == "ok"
    assert flaky.calls == 3


async def test_retries_means_additional_attempts() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionResetError):
        await quick(retries=3).call(flaky)
    assert flaky.calls == 4


async def test_exhaustion_reraises_the_original_error_with_a_note() -> None:
    error = ConnectionResetError("reset by peer")
    with pytest.raises(ConnectionResetError) as info:
        await quick(retries=2).call(Flaky(10, error))
    assert info.value is error
    notes = "\n".join(info.value.__notes__)
    assert "gave up after 3 attempt(s)" in notes
    assert "all 3 attempts failed" in notes


async def test_permanent_errors_are_not_retried() -> None:
    flaky = Flaky(1, ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        await quick(retries=3).call(flaky)
    assert flaky.calls == 1


async def test_backoff_is_exponential_with_a_cap_and_no_jitter_when_asked() -> None:
    clock = FakeClock()
    policy = quick(
        retries=4, clock=clock, backoff=Backoff(initial=0.1, max=0.3, multiplier=2, jitter=0)
    )
    with pytest.raises(ConnectionResetError):
        await policy.call(Flaky(10))
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_full_jitter_spreads_between_zero_and_the_exponential_value() -> None:
    backoff = Backoff(initial=1.0, max=10.0, multiplier=2.0, jitter=1.0)
    assert backoff.delay(3, 0.0) == pytest.approx(4.0)
    assert backoff.delay(3, 0.999) == pytest.approx(0.004)
    assert Backoff(initial=1.0, max=10.0, jitter=0.25).delay(1, 0.5) == pytest.approx(0.875)


@pytest.mark.parametrize("exit_exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)])
async def test_exit_exceptions_are_never_retried_whatever_the_classifier_says(
    exit_exc: BaseException,
) -> None:
    def retry_everything(exc: BaseException) -> Classification:
        return Classification.of(ErrorCategory.CONNECTION)

    flaky = Flaky(5, exit_exc)
    with pytest.raises(type(exit_exc)):
        await quick(retries=3, classifier=retry_everything).call(flaky)
    assert flaky.calls == 1


async def test_a_user_classifier_can_make_errors_retryable_or_defer() -> None:
    class RateLimited(Exception):
        pass

    def mine(exc: BaseException) -> Classification | None:
        if isinstance(exc, RateLimited):
            return Classification.of(ErrorCategory.OVERLOAD, retryable=True)
        return None

    flaky = Flaky(2, RateLimited())
    assert await quick(retries=3, classifier=mine).call(flaky) == "ok"
    deferred = Flaky(2)  # ConnectionResetError: the default classifier still decides
    assert await quick(retries=3, classifier=mine).call(deferred) == "ok"


async def test_cancelling_during_backoff_propagates_at_once() -> None:
    started = asyncio.Event()

    async def slow_sleep(delay: float) -> None:
        started.set()
        await asyncio.sleep(3600)

    policy = Policy(retries=3, breaker=False, retry_budget=None, sleep=slow_sleep)
    task = asyncio.ensure_future(policy.call(Flaky(10)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_attempt_timeout_is_a_builtin_timeout_error_and_is_retried() -> None:
    calls = 0

    async def hang_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(3600)
        return "ok"

    assert await quick(retries=1, timeout=0.02).call(hang_once) == "ok"
    with pytest.raises(TimeoutError):
        await quick(retries=0, timeout=0.02).call(asyncio.sleep, 3600)


async def test_the_functions_own_timeout_error_is_not_mistaken_for_ours() -> None:
    async def own_timeout() -> None:
        raise TimeoutError("driver timeout")

    with pytest.raises(TimeoutError, match="driver timeout") as info:
        await quick(retries=0, timeout=5).call(own_timeout)
    assert not isinstance(info.value, AttemptTimeout)


async def test_deadline_bounds_the_whole_call_and_is_not_retried() -> None:
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await Policy(retries=5, deadline=0.1, breaker=False, retry_budget=None).call(hang)
    assert time.monotonic() - started < 2.0
    assert calls == 1


async def test_no_backoff_sleep_runs_past_the_deadline() -> None:
    clock = FakeClock()
    policy = quick(
        retries=5, deadline=1.0, clock=clock, backoff=Backoff(initial=0.6, max=5, jitter=0)
    )
    with pytest.raises(ConnectionResetError) as info:
        await policy.call(Flaky(10))
    assert clock.sleeps == pytest.approx([0.6])  # 0.6 + 1.2 would pass the 1 s deadline
    assert "the deadline would pass" in "\n".join(info.value.__notes__)


async def test_an_attempt_with_no_time_left_is_not_started() -> None:
    clock = FakeClock()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1

    async with deadline(1.0, clock=clock):
        clock.advance(1.5)
        with pytest.raises(DeadlineExceeded, match="before attempt 1 could start"):
            await quick(clock=clock).call(work)
    assert calls == 0


async def test_nested_guarded_calls_share_the_deadline_and_only_the_outer_retries() -> None:
    inner_flaky = Flaky(1)
    inner_remaining: list[float | None] = []

    @resilient(retries=3, breaker=False, retry_budget=None)
    async def inner() -> str:
        inner_remaining.append(remaining_time())
        return await inner_flaky()

    outer_calls = 0

    @resilient(retries=2, deadline=30, breaker=False, retry_budget=None)
    async def outer() -> str:
        nonlocal outer_calls
        outer_calls += 1
        return await inner()

    with set_testing():
        assert await outer() == "ok"
    assert (outer_calls, inner_flaky.calls) == (2, 2)  # inner failure retried by the outer
    assert all(r is not None and 0 < r <= 30 for r in inner_remaining)


async def test_a_bare_deadline_block_is_shared_by_guarded_calls_inside() -> None:
    seen: list[float | None] = []

    @resilient(breaker=False)
    async def work() -> None:
        seen.append(remaining_time())

    async with deadline(5):
        await work()
    assert seen[0] is not None and 0 < seen[0] <= 5
    assert remaining_time() is None


async def test_a_guarded_call_inside_a_bare_deadline_still_retries() -> None:
    flaky = Flaky(2)
    with set_testing():
        async with deadline(30):
            assert await quick(retries=3).call(flaky) == "ok"
    assert flaky.calls == 3


async def test_set_testing_turns_waits_off_and_restores() -> None:
    recorded: list[float] = []

    async def record(delay: float) -> None:
        recorded.append(delay)

    policy = Policy(retries=2, breaker=False, retry_budget=None, sleep=record)
    with set_testing(), pytest.raises(ConnectionResetError):
        await policy.call(Flaky(10))
    assert recorded == [0.0, 0.0]
    with pytest.raises(ConnectionResetError):
        await policy.call(Flaky(10))
    assert all(d > 0 for d in recorded[2:])


async def test_retry_budget_limits_retries_under_an_outage() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=10, clock=clock)
    policy = Policy(retries=3, breaker=False, retry_budget=budget, clock=clock, sleep=clock.sleep)
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("database is down")

    results = await asyncio.gather(*(policy.call(down) for _ in range(100)), return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    elapsed = clock()
    # first attempts + ratio * first attempts + the floor (one second's burst + refill)
    bound = 100 + 0.2 * 100 + 10 * (elapsed + 1)
    assert calls <= bound
    assert calls < 400  # what retries=3 would cost without a budget
    assert budget.rejected > 0


def test_the_budget_refuses_once_spent() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    for _ in range(4):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]


def test_reading_the_budget_for_telemetry_never_changes_what_a_retry_gets() -> None:
    # Ten deposits of 0.1 are one token; reading `available` between them (the
    # instrumentation does) must not round the sum differently.
    outcomes = []
    for peek in (False, True):
        budget = RetryBudget(ratio=0.1, min_per_second=0, clock=FakeClock())
        for _ in range(10):
            budget.deposit()
            if peek:
                assert budget.available <= 1.0
        outcomes.append([budget.try_withdraw(), budget.try_withdraw()])
    assert outcomes == [[True, False], [True, False]]


def test_deposits_are_capped_at_max_tokens() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, max_tokens=3, clock=FakeClock())
    for _ in range(10):
        budget.deposit()
    assert budget.available == 3.0
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    budget.deposit()
    assert budget.available == 1.0


def test_a_floor_below_one_per_second_still_allows_a_retry_now_and_then() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0, min_per_second=0.5, clock=clock)  # one every 2 s
    assert [budget.try_withdraw() for _ in range(2)] == [True, False]
    clock.advance(1.0)
    assert not budget.try_withdraw()
    clock.advance(1.0)
    assert budget.try_withdraw()


class Repo:
    def __init__(self) -> None:
        self.flaky = Flaky(1)

    @resilient(retries=2, breaker=False, retry_budget=None)
    async def method(self, x: int) -> int:
        await self.flaky()
        return x * 2

    @staticmethod
    @resilient(retries=0, breaker=False)
    async def static(x: int) -> int:
        return x + 1

    @resilient(retries=0, breaker=False)
    @classmethod
    async def klass(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"

    @resilient(retries=0, breaker=False)
    @staticmethod
    async def static_outer(x: int) -> int:
        return x - 1


async def test_methods_static_and_class_methods_can_be_decorated() -> None:
    repo = Repo()
    with set_testing():
        assert await repo.method(21) == 42
    assert await Repo.static(1) == 2
    assert await repo.klass(3) == "Repo:3"
    assert await Repo.static_outer(1) == 0


def test_wraps_keeps_the_name_and_docstring() -> None:
    @resilient()
    async def load_order(order_id: str) -> str:
        """Load one order."""
        return order_id

    assert load_order.__name__ == "load_order"
    assert load_order.__doc__ == "Load one order."


def test_sync_callables_are_refused_at_decoration_time() -> None:
    def sync(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="needs an async function"):
        resilient()(sync)  # type: ignore[arg-type]


def test_async_generators_are_refused_at_decoration_time() -> None:
    async def rows() -> Any:
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        resilient()(rows)


def test_the_decorator_is_keyword_only_and_needs_parentheses() -> None:
    async def f() -> None:
        return None

    with pytest.raises(TypeError):
        resilient(f)  # type: ignore[misc]


async def test_a_policy_is_reusable_as_decorator_and_caller() -> None:
    policy = quick(retries=1)

    @policy
    async def double(x: int) -> int:
        return 2 * x

    assert await double(4) == 8
    assert await policy.call(double, 5) == 10


async def test_calls_that_never_suspend_do_not_retain_their_scopes() -> None:
    import gc

    from resilient_db._scope import CallScope

    @resilient(timeout=30, retries=0, breaker=False)
    async def cached() -> int:
        return 1  # completes without ever yielding to the event loop

    def scopes() -> int:
        gc.collect()
        return sum(isinstance(o, CallScope) for o in gc.get_objects())

    before = scopes()
    for _ in range(2000):
        await cached()  # the loop never runs, so cancelled timers are never purged
    assert scopes() - before < 10


async def test_a_task_that_outlives_its_call_is_no_longer_part_of_it() -> None:
    # A fire-and-forget task copies the context, and with it the call's scope. Once
    # the call is over, the task's guarded calls must be calls of their own: retried
    # by their own policy, not treated as one attempt of a unit that has ended.
    go = asyncio.Event()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("first attempt fails")
        return "ok"

    retried = Policy(retries=1, backoff=None, breaker=False)
    detached: list[asyncio.Task[str]] = []

    async def later() -> str:
        await go.wait()
        return await retried.call(flaky)

    @resilient(retries=0, breaker=False)
    async def unit() -> None:
        detached.append(asyncio.create_task(later()))

    await unit()
    go.set()
    assert await detached[0] == "ok"  # retried on its own: it is not inside `unit`
    assert calls == 2


async def test_a_task_that_outlives_a_deadline_block_is_not_bound_by_it() -> None:
    go = asyncio.Event()
    detached: list[asyncio.Task[str]] = []

    async def later() -> str:
        await go.wait()
        return await Policy(breaker=False).call(asyncio.sleep, 0, "done")

    async with deadline(0.01):
        detached.append(asyncio.create_task(later()))
    await asyncio.sleep(0.05)  # the block's deadline has passed
    go.set()
    assert await detached[0] == "done"
