"""ResilientEngine checkouts: guarded exactly when they have to wait.

A warm pool hands out a connection from memory; a checkout that has to connect,
ping or wait for a free connection is timed, counted and retried like any call.
Instrumentation is off in these tests (no hook active), the case where a checkout
that needs no I/O skips the policy (with hooks on, every checkout is an operation:
see test_observability.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db._policy as policy_module
from resilient_db import AttemptTimeout, CircuitBreaker, ResilientEngine
from resilient_db.policies.timeout import ABORT_GRACE, AttemptTimer, ConnectionTimer

FAST = {"initial": 0.001, "max": 0.01}


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every timer armed, in order: ``"attempt"`` (an attempt timer) or
    ``"connection"`` (a connection timing its own statement or release)."""
    armed: list[str] = []

    class Counted(AttemptTimer):
        __slots__ = ()

        def __init__(self, attempt: Any, limit: float, start: float | None = None) -> None:
            super().__init__(attempt, limit, start)
            armed.append("attempt")

    arm = ConnectionTimer._arm_timer

    def arm_connection(self: ConnectionTimer, limit: float) -> ConnectionTimer:
        armed.append("connection")
        return arm(self, limit)

    monkeypatch.setattr(policy_module, "AttemptTimer", Counted)
    monkeypatch.setattr(ConnectionTimer, "_arm_timer", arm_connection)
    return armed


@pytest.fixture
async def frozen_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers (a frozen database)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_checkout_from_a_warm_pool_arms_no_timer(
    sqlite_engine: AsyncEngine, timers: list[str]
) -> None:
    db = ResilientEngine(sqlite_engine, timeout=5, breaker=False)
    async with db.connect() as conn:  # a cold pool: this checkout connects
        await conn.execute(text("SELECT 1"))
    # The connect; the statement and the release, on their known connection.
    assert timers == ["attempt", "connection", "connection"]
    for _ in range(3):
        async with db.connect() as conn:  # answered from memory
            await conn.execute(text("SELECT 1"))
    assert timers[3:] == ["connection", "connection"] * 3  # none per warm checkout


async def test_a_checkout_that_has_to_connect_is_timed_and_counted(frozen_server: str) -> None:
    engine = create_async_engine(frozen_server)
    breaker = CircuitBreaker("frozen-connect", failure_threshold=1, failure_rate_threshold=None)
    db = ResilientEngine(engine, timeout=0.3, retries=0, breaker=breaker)
    started = time.monotonic()
    with pytest.raises(AttemptTimeout):
        async with db.connect():
            pass
    elapsed = time.monotonic() - started
    await engine.dispose()
    assert elapsed < 0.3 + ABORT_GRACE + 1.0  # the bound, plus slack for a noisy machine
    assert breaker.state.value == "open"


async def test_cancelling_a_checkout_that_waits_leaves_nothing_behind(
    frozen_server: str,
) -> None:
    engine = create_async_engine(frozen_server)
    db = ResilientEngine(engine, timeout=5, retries=0, breaker=False)

    async def connect() -> None:
        async with db.connect():
            pass

    task = asyncio.create_task(connect())
    await asyncio.sleep(0.2)  # connecting, waiting on the frozen server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await engine.dispose()


async def test_a_checkout_failing_before_any_wait_is_counted_and_retried(
    sqlite_engine: AsyncEngine,
) -> None:
    breaker = CircuitBreaker("checkout-fails", failure_threshold=5, failure_rate_threshold=None)
    db = ResilientEngine(sqlite_engine, timeout=5, retries=2, backoff=FAST, breaker=breaker)
    async with db.connect() as conn:  # warm the pool
        await conn.execute(text("SELECT 1"))
    calls = 0

    def fail_once(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("connection reset while checking out")

    event.listen(sqlite_engine.sync_engine.pool, "checkout", fail_once)
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT 42"))).scalar() == 42
    assert calls == 2  # failed once from memory, retried
    snapshot = breaker.snapshot()
    assert snapshot.window_failures == 1  # the failure counted once
    assert snapshot.window_calls == 3  # the warm-up statement, that failure, the statement


async def test_awaiting_connect_on_a_warm_pool_gives_a_started_connection(
    sqlite_engine: AsyncEngine,
) -> None:
    # SQLAlchemy's `conn = await engine.connect()` form awaits what start() returns
    # through its __await__: the warm checkout must hand over a real awaitable.
    db = ResilientEngine(sqlite_engine, timeout=2, retries=0)
    async with db.connect() as conn:  # the pool is warm from here on
        await conn.execute(text("SELECT 1"))
    conn = await db.connect()
    try:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await conn.close()
    assert sqlite_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_checkout_that_is_never_awaited_takes_nothing_from_the_pool(
    sqlite_engine: AsyncEngine,
) -> None:
    db = ResilientEngine(sqlite_engine, timeout=2, retries=0)
    async with db.connect() as conn:
        await conn.execute(text("SELECT 1"))
    pending = db.connect().start()
    assert asyncio.iscoroutine(pending)  # a task can run it, on every Python version
    assert sqlite_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    pending.close()
