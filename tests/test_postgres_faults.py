"""Real faults on a real PostgreSQL: what @resilient retries, and what it must not.

Every fault here is caused for real (a killed backend, two conflicting SERIALIZABLE
transactions, a deadlock, a held lock, a slow statement); the database's own view
(row counts, pg_stat_activity) is the witness.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from conftest import Witness
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from resilient_db import AttemptTimeout, ErrorCategory, classify, resilient

pytestmark = pytest.mark.postgres


class Recorder:
    """An injectable backoff sleep that runs a hook on the first backoff."""

    def __init__(self, on_first_backoff: Any = None) -> None:
        self.delays: list[float] = []
        self.hook = on_first_backoff

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()


async def test_backend_killed_between_attempts_is_retried_on_a_fresh_connection(
    accounts: AsyncEngine, witness: Witness
) -> None:
    sessions = async_sessionmaker(accounts)
    async with accounts.connect() as conn:
        old_pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    # The pooled connection's backend dies while idle in the pool.
    await witness.terminate(old_pid)
    await witness.wait_sessions(0)
    pids: list[int] = []

    @resilient(timeout=5, retries=3, breaker=False, backoff={"initial": 0.001, "max": 0.01})
    async def read_balance() -> int:
        async with sessions() as s:
            pids.append((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            balance = await s.execute(text("SELECT balance FROM accounts WHERE id = 1"))
            return int(balance.scalar_one())

    assert await read_balance() == 100
    assert old_pid not in pids and len(pids) == 1  # attempt 1 failed before its first row


async def test_backend_killed_mid_transaction_retries_the_unit_and_writes_once(
    accounts: AsyncEngine, witness: Witness
) -> None:
    sessions = async_sessionmaker(accounts)
    attempts = 0

    @resilient(timeout=10, retries=3, breaker=False, backoff={"initial": 0.001, "max": 0.01})
    async def deposit() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("UPDATE accounts SET balance = balance + 10 WHERE id = 1"))
            if attempts == 1:
                pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await witness.terminate(pid)
                await witness.wait_sessions(0)
                await asyncio.sleep(0.05)  # let the driver see the socket close
            await s.execute(text("SELECT 1"))

    await deposit()
    assert attempts == 2
    assert await witness.scalar("SELECT balance FROM accounts WHERE id = 1") == 110


async def test_real_serialization_failure_is_retried_and_converges(
    accounts: AsyncEngine, pg_dsn: str, witness: Witness
) -> None:
    sessions = async_sessionmaker(accounts)
    other = await asyncpg.connect(pg_dsn)
    ours_ready = asyncio.Event()
    attempts = 0
    errors: list[str | None] = []

    async def conflicting_transaction() -> None:
        await other.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        await other.fetchval("SELECT sum(balance) FROM accounts")
        await ours_ready.wait()
        await other.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 2")
        await other.execute("COMMIT")

    @resilient(timeout=10, retries=3, breaker=False, backoff={"initial": 0.001, "max": 0.01})
    async def add_interest() -> None:
        nonlocal attempts
        attempts += 1
        try:
            async with sessions.begin() as s:
                await s.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
                total = (await s.execute(text("SELECT sum(balance) FROM accounts"))).scalar_one()
                await s.execute(
                    text("UPDATE accounts SET balance = balance + :t / 100 WHERE id = 1"),
                    {"t": total},
                )
                if attempts == 1:
                    ours_ready.set()
                    await other_done
        except Exception as exc:
            errors.append(classify(exc).sqlstate)
            raise

    other_done = asyncio.ensure_future(conflicting_transaction())
    try:
        await add_interest()
    finally:
        await other_done
        await other.close()
    assert attempts == 2
    # Attempt 2 saw the other transaction's write: 100 + (100 + 90) / 100 = 101.
    assert await witness.scalar("SELECT balance FROM accounts WHERE id = 1") == 101
    assert await witness.scalar("SELECT balance FROM accounts WHERE id = 2") == 90
    assert errors == ["40001"]  # detected at COMMIT: rejected by the server, safe to retry


async def test_real_deadlock_is_retried(
    accounts: AsyncEngine, pg_dsn: str, witness: Witness
) -> None:
    sessions = async_sessionmaker(accounts)
    other = await asyncpg.connect(pg_dsn)
    ours_locked = asyncio.Event()
    other_locked = asyncio.Event()
    attempts = 0
    first_error: list[BaseException] = []

    async def other_side() -> None:
        await other.execute("BEGIN")
        await other.execute("SET LOCAL deadlock_timeout = '10s'")  # we are the victim, not it
        await ours_locked.wait()
        await other.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
        other_locked.set()
        await other.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        await other.execute("COMMIT")

    async def backoff_hook() -> None:
        await other_task

    recorder = Recorder(backoff_hook)

    @resilient(timeout=15, retries=3, breaker=False, sleep=recorder.sleep)
    async def move() -> None:
        nonlocal attempts
        attempts += 1
        try:
            async with sessions.begin() as s:
                await s.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
                await s.execute(text("UPDATE accounts SET balance = balance - 1 WHERE id = 1"))
                if attempts == 1:
                    ours_locked.set()
                    await other_locked.wait()
                await s.execute(text("UPDATE accounts SET balance = balance - 1 WHERE id = 2"))
        except Exception as exc:
            first_error.append(exc)
            raise

    other_task = asyncio.ensure_future(other_side())
    try:
        await move()
    finally:
        await other_task
        await other.close()
    assert attempts == 2
    assert classify(first_error[0]).sqlstate == "40P01"
    assert await witness.scalar("SELECT sum(balance) FROM accounts") == 200


async def test_lock_timeout_contention_is_retried(
    accounts: AsyncEngine, pg_dsn: str, witness: Witness
) -> None:
    sessions = async_sessionmaker(accounts)
    holder = await asyncpg.connect(pg_dsn)
    await holder.execute("BEGIN")
    await holder.execute("SELECT * FROM accounts WHERE id = 1 FOR UPDATE")

    async def release_lock() -> None:
        await holder.execute("COMMIT")

    recorder = Recorder(release_lock)
    sqlstates: list[str | None] = []

    @resilient(timeout=10, retries=3, breaker=False, sleep=recorder.sleep)
    async def withdraw() -> None:
        try:
            async with sessions.begin() as s:
                await s.execute(text("SET LOCAL lock_timeout = '100ms'"))
                await s.execute(text("UPDATE accounts SET balance = balance - 5 WHERE id = 1"))
        except Exception as exc:
            sqlstates.append(classify(exc).sqlstate)
            raise

    try:
        await withdraw()
    finally:
        await holder.close()
    assert sqlstates == ["55P03"]
    assert await witness.scalar("SELECT balance FROM accounts WHERE id = 1") == 95


async def test_integrity_error_is_raised_at_once_without_retry(accounts: AsyncEngine) -> None:
    sessions = async_sessionmaker(accounts)
    attempts = 0

    @resilient(timeout=5, retries=3, breaker=False)
    async def open_account() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO accounts VALUES (1, 0)"))

    with pytest.raises(sa_exc.IntegrityError):
        await open_account()
    assert attempts == 1


async def test_syntax_error_reaches_the_caller_unwrapped_and_unretried(
    accounts: AsyncEngine,
) -> None:
    sessions = async_sessionmaker(accounts)
    attempts = 0

    @resilient(timeout=5, retries=3, breaker=False)
    async def broken() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions() as s:
            await s.execute(text("SELEC 1"))

    with pytest.raises(sa_exc.DBAPIError) as info:
        await broken()
    assert attempts == 1
    assert classify(info.value).sqlstate == "42601"
    assert classify(info.value).category is ErrorCategory.PERMANENT


async def test_statement_longer_than_timeout_raises_timeout_and_leaves_no_session(
    pg_engine: AsyncEngine, witness: Witness
) -> None:
    @resilient(timeout=0.5, retries=0, breaker=False)
    async def slow() -> None:
        async with pg_engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(30)"))

    started = time.monotonic()
    with pytest.raises(AttemptTimeout):
        await slow()
    assert time.monotonic() - started < 5.0  # generous: the bound is 0.5 s
    assert isinstance(AttemptTimeout("x", 1.0), TimeoutError)
    # The server stopped the sleep and the cancelled connection was not pooled.
    assert await witness.wait_sessions(0) == []
    assert pg_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
