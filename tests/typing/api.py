"""Never run: type-checked by ``mypy --strict tests/typing`` as user code would be.

If a change breaks the public typing (the decorator returning ``Any``, a lost
ParamSpec, a wrong error base), mypy fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, assert_type

from resilient_db import (
    Backoff,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    Classification,
    DeadlineExceeded,
    ErrorCategory,
    Policy,
    RetryBudget,
    classify,
    resilient,
)
from resilient_db.testing import FakeClock, set_testing


@resilient(timeout=2, retries=3)
async def place(order_id: str, amount: int) -> None: ...


@resilient(timeout=timedelta(seconds=2), deadline=10, breaker="orders-db", bulkhead=4)
async def load(order_id: str) -> dict[str, int]:
    return {}


_place: Callable[[str, int], Coroutine[Any, Any, None]] = place


def misuse() -> None:
    # The ParamSpec survives decoration: wrong arguments are type errors (if the
    # decorator returned Any, these ignores would be unused, and strict mypy fails).
    place(1, 2)  # type: ignore[arg-type,unused-coroutine]

    def sync(x: int) -> int:
        return x

    resilient()(sync)  # type: ignore[arg-type]


async def use() -> None:
    assert_type(await load("o-1"), dict[str, int])
    await place("o-1", 10)
    policy = Policy(
        timeout=1.5,
        retries=2,
        backoff=Backoff(initial=0.01, max=1.0),
        breaker=CircuitBreaker("db", clock=FakeClock()),
        bulkhead=Bulkhead(8, max_queue=16),
        retry_budget=RetryBudget(ratio=0.1),
    )
    assert_type(await policy.call(load, "o-2"), dict[str, int])
    with set_testing():
        pass


class Repo:
    @resilient(retries=1)
    async def get(self, key: str) -> int:
        return len(key)

    @staticmethod
    @resilient()
    async def helper(x: int) -> str:
        return str(x)


async def use_repo(repo: Repo) -> None:
    assert_type(await repo.get("k"), int)
    assert_type(await Repo.helper(1), str)


def classify_mine(exc: BaseException) -> Classification | None:
    if isinstance(exc, KeyError):
        return Classification.of(ErrorCategory.CONFLICT)
    return None


_ = Policy(classifier=classify_mine)
assert_type(classify(ValueError()).category, ErrorCategory)
assert_type(CircuitBreaker().state, BreakerState)
_timeout_is_builtin: TimeoutError = DeadlineExceeded("late", 1.0)
_retry_after: float | None = CircuitOpenError("db", None).retry_after
