"""Real SQLite faults through aiosqlite, on a temporary file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from resilient_db import ErrorCategory, classify, resilient


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    # busy timeout 0: a locked database is reported at once instead of after 5 s
    engine = create_async_engine(sqlite_url, connect_args={"timeout": 0})
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE orders (id TEXT PRIMARY KEY, amount INT)"))
    yield engine
    await engine.dispose()


def db_path(engine: AsyncEngine) -> Path:
    assert engine.url.database is not None
    return Path(engine.url.database)


async def test_sqlite_busy_from_a_second_connection_is_retried(engine: AsyncEngine) -> None:
    holder = sqlite3.connect(db_path(engine), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # takes the write lock
    errors: list[int | None] = []

    async def release_on_backoff(delay: float) -> None:
        holder.execute("COMMIT")

    sessions = async_sessionmaker(engine)

    @resilient(timeout=5, retries=3, breaker=False, sleep=release_on_backoff)
    async def place() -> None:
        try:
            async with sessions.begin() as s:
                await s.execute(text("INSERT INTO orders VALUES ('o-1', 10)"))
        except sa_exc.OperationalError as exc:
            errors.append(classify(exc).sqlite_code)
            raise

    try:
        await place()
    finally:
        holder.close()
    assert errors == [5]  # SQLITE_BUSY, then success
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM orders"))).scalar_one() == 1


async def test_sqlite_busy_is_classified_as_a_conflict(engine: AsyncEngine) -> None:
    holder = sqlite3.connect(db_path(engine), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO orders VALUES ('o-2', 1)"))
    finally:
        holder.close()
    verdict = classify(info.value)
    assert (verdict.category, verdict.retryable, verdict.counts_for_breaker) == (
        ErrorCategory.CONFLICT,
        True,
        False,
    )


async def test_constraint_violation_is_not_retried(engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(engine)
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def place() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO orders VALUES ('dup', 1)"))

    await place()
    with pytest.raises(sa_exc.IntegrityError):
        await place()
    assert attempts == 2
