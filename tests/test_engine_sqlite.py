"""ResilientEngine on the embedded default, aiosqlite on a temporary file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from resilient_db import DeadlineExceeded, ResilientEngine, RetryBudget, deadline

LONG_CTE = text(
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) "
    "SELECT count(*) FROM n"
)


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(sqlite_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield engine
    await engine.dispose()


async def test_a_deadline_on_a_long_statement_is_honoured_promptly(engine: AsyncEngine) -> None:
    db = ResilientEngine(engine, retries=0, breaker=False)
    async with db.connect() as conn:
        driver_before = (await conn.get_raw_connection()).driver_connection
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with deadline(0.2), db.connect() as conn:
            await conn.execute(LONG_CTE)
    elapsed = time.monotonic() - started
    # The worker thread was interrupted; a plain asyncio.timeout waits for the CTE.
    assert elapsed < 0.3 + 0.5  # 0.3 s bound, plus slack for a noisy two-core machine
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT 41 + 1"))).scalar() == 42
        # interrupt() leaves the connection usable: the pool kept it
        assert (await conn.get_raw_connection()).driver_connection is driver_before


async def test_run_transaction_commits_on_sqlite(engine: AsyncEngine) -> None:
    db = ResilientEngine(engine, timeout=5, breaker=False)

    async def write(session: AsyncSession, body: str) -> int:
        await session.execute(text("INSERT INTO notes (body) VALUES (:b)"), {"b": body})
        return int((await session.execute(text("SELECT count(*) FROM notes"))).scalar_one())

    assert await db.run_transaction(write, "hello") == 1
    async with db.connect() as conn:
        assert (await conn.execute(text("SELECT body FROM notes"))).scalar() == "hello"


async def test_no_server_side_settings_are_sent_to_sqlite(engine: AsyncEngine) -> None:
    from sqlalchemy import event

    seen: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    db = ResilientEngine(engine, timeout=5, breaker=False, lock_timeout=1)
    async with db.begin() as conn:
        await conn.execute(text("INSERT INTO notes (body) VALUES ('x')"))
    assert not any("set_config" in statement for statement in seen)


async def test_checkouts_deposit_nothing_into_the_retry_budget(engine: AsyncEngine) -> None:
    # The budget caps retries to a share of real traffic; a checkout from a warm
    # pool is none, and counted it would double what statements may retry.
    budget = RetryBudget(ratio=0.5, min_per_second=0)
    db = ResilientEngine(engine, timeout=5, breaker=False, retry_budget=budget)
    for _ in range(4):
        async with db.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert budget.deposits == 4  # one per statement, none per checkout
    assert budget.available == 2.0


async def test_a_session_is_usable_after_its_begin_block(engine: AsyncEngine) -> None:
    # The guarded COMMIT at the end of `async with s.begin():` must leave SQLAlchemy's
    # transaction bookkeeping as its own exit would: the session goes on working.
    db = ResilientEngine(engine, timeout=5, breaker=False)
    async with db.session() as session:
        async with session.begin():
            await session.execute(text("INSERT INTO notes (body) VALUES ('one')"))
        count = (await session.execute(text("SELECT count(*) FROM notes"))).scalar()
        await session.commit()
        async with session.begin():
            await session.execute(text("INSERT INTO notes (body) VALUES ('two')"))
    assert count == 1
    async with db.connect() as conn:
        async with conn.begin():
            await conn.execute(text("INSERT INTO notes (body) VALUES ('three')"))
        assert (await conn.execute(text("SELECT count(*) FROM notes"))).scalar() == 3
