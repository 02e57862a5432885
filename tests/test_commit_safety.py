"""An attempt that sent a COMMIT is never retried blindly: no duplicated writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from resilient_db import CommitOutcomeUnknown, resilient
from resilient_db.testing import set_testing


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(sqlite_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE payments (n INTEGER PRIMARY KEY AUTOINCREMENT)"))
    yield engine
    await engine.dispose()


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM payments"))).scalar_one())


async def test_failure_after_commit_raises_commit_outcome_unknown_not_a_retry(
    engine: AsyncEngine,
) -> None:
    sessions = async_sessionmaker(engine)
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def pay() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO payments DEFAULT VALUES"))
        raise ConnectionResetError("lost while reporting the result")

    with pytest.raises(CommitOutcomeUnknown) as info:
        await pay()
    assert attempts == 1
    assert await count(engine) == 1
    assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_the_same_failure_before_commit_is_retried(engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(engine)
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def pay() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO payments DEFAULT VALUES"))
            if attempts == 1:
                raise ConnectionResetError("lost before commit")

    with set_testing():
        await pay()
    assert attempts == 2
    assert await count(engine) == 1


async def test_an_idempotent_unit_is_retried_even_after_a_commit(engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(engine)
    attempts = 0

    @resilient(retries=3, breaker=False, idempotent=True)
    async def pay() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT OR IGNORE INTO payments (n) VALUES (42)"))
        if attempts == 1:
            raise ConnectionResetError("lost after commit")

    with set_testing():
        await pay()
    assert attempts == 2
    assert await count(engine) == 1


async def test_timeout_during_commit_is_not_retried(engine: AsyncEngine) -> None:
    sessions = async_sessionmaker(engine)
    attempts = 0

    # 0.5 s: the INSERT and the COMMIT must be done before the timer fires, even on
    # a loaded two-core runner (0.05 s left them little room).
    @resilient(timeout=0.5, retries=3, breaker=False)
    async def pay() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO payments DEFAULT VALUES"))
            await s.commit()
            await asyncio.sleep(10)  # the timeout fires after COMMIT returned

    with pytest.raises(CommitOutcomeUnknown):
        await pay()
    assert attempts == 1
    assert await count(engine) == 1


async def test_commits_outside_guarded_calls_are_not_tracked(engine: AsyncEngine) -> None:
    from resilient_db._scope import current_scope

    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO payments DEFAULT VALUES"))
    assert current_scope() is None
