"""Bulkhead: at most N at once, a bounded FIFO queue, then BulkheadFull."""

from __future__ import annotations

import asyncio

import pytest

from resilient_db import Bulkhead, BulkheadFull, DeadlineExceeded, Policy, deadline
from resilient_db.testing import FakeClock


async def test_at_most_max_concurrent_calls_run_at_once() -> None:
    bulkhead = Bulkhead(3, max_queue=100)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    policy = Policy(bulkhead=bulkhead, breaker=False, retries=0)
    await asyncio.gather(*(policy.call(work) for _ in range(20)))
    assert peak == 3
    assert bulkhead.active == 0


async def test_without_a_queue_the_excess_is_rejected_at_once() -> None:
    bulkhead = Bulkhead(1)
    gate = asyncio.Event()
    policy = Policy(bulkhead=bulkhead, breaker=False, retries=3)
    first = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull, match="queue full"):
        await policy.call(gate.wait)
    gate.set()
    await first


async def test_queued_calls_run_in_arrival_order() -> None:
    bulkhead = Bulkhead(1, max_queue=5)
    gate = asyncio.Event()
    order: list[int] = []

    async def work(n: int) -> None:
        order.append(n)
        await gate.wait()

    policy = Policy(bulkhead=bulkhead, breaker=False, retries=0)
    tasks = [asyncio.ensure_future(policy.call(work, n)) for n in range(4)]
    await asyncio.sleep(0)
    assert bulkhead.queued == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_queue_wait_times_out_with_bulkhead_full() -> None:
    bulkhead = Bulkhead(1, max_queue=1, queue_timeout=0.02)
    gate = asyncio.Event()
    policy = Policy(bulkhead=bulkhead, breaker=False, retries=0)
    holder = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull, match="waited"):
        await policy.call(gate.wait)
    gate.set()
    await holder
    assert (bulkhead.active, bulkhead.queued) == (0, 0)


async def test_queue_wait_is_cut_by_the_deadline() -> None:
    bulkhead = Bulkhead(1, max_queue=1)
    gate = asyncio.Event()
    policy = Policy(bulkhead=bulkhead, breaker=False, retries=0)
    holder = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    async with deadline(0.05):
        with pytest.raises(DeadlineExceeded):
            await policy.call(gate.wait)
    gate.set()
    await holder


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    bulkhead = Bulkhead(1, max_queue=2)
    gate = asyncio.Event()
    policy = Policy(bulkhead=bulkhead, breaker=False, retries=0)
    holder = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (bulkhead.active, bulkhead.queued) == (0, 0)
    assert bulkhead.try_acquire()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1; got 0"),
        ({"max_concurrent": 2, "max_queue": -1}, "max_queue must be an integer >= 0; got -1"),
        ({"max_concurrent": 2, "queue_timeout": -0.5}, "queue_timeout must be a number of seconds"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        Bulkhead(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


async def test_a_slot_that_comes_after_the_deadline_is_given_back() -> None:
    # The waiter gets the slot, then finds no time left for its attempt: it must
    # release the slot it was handed, or the bulkhead stays full for good.
    clock = FakeClock()
    bulkhead = Bulkhead(1, max_queue=1)
    gate = asyncio.Event()
    policy = Policy(deadline=1.0, bulkhead=bulkhead, breaker=False, retries=0, clock=clock)
    holder = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(policy.call(gate.wait))
    await asyncio.sleep(0)
    assert bulkhead.queued == 1
    clock.advance(2.0)  # the loop was busy elsewhere past the waiter's deadline
    gate.set()
    await holder
    with pytest.raises(DeadlineExceeded, match="before attempt 1 could start"):
        await waiter
    assert (bulkhead.active, bulkhead.queued) == (0, 0)
