"""Shared fixtures: a real PostgreSQL database per test run, SQLite files, clean state.

PostgreSQL tests talk to a real server. Point them at one with
``RESILIENT_TEST_PG_URL`` (default ``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``;
the user must be allowed to create databases). Each test run creates its own
database (``rdb_test_<random>``) and drops it at the end, so runs never see each
other's tables. Without a server, PostgreSQL tests are skipped with a message —
unless ``RESILIENT_TEST_REQUIRE_PG=1`` (as in CI), which makes them fail instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from resilient_db.testing import reset_breakers, set_testing

PG_URL_VAR = "RESILIENT_TEST_PG_URL"
PG_REQUIRE_VAR = "RESILIENT_TEST_REQUIRE_PG"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def _admin_url() -> str:
    return os.environ.get(PG_URL_VAR, DEFAULT_PG_URL)


def _required() -> bool:
    return os.environ.get(PG_REQUIRE_VAR, "").lower() in ("1", "true", "yes")


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _create_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database private to this test run."""
    admin = _admin_url()
    name = f"rdb_test_{secrets.token_hex(4)}"
    try:
        import asyncpg  # noqa: F401

        asyncio.run(_create_database(admin, name))
    except (OSError, ImportError, TimeoutError) as exc:
        message = (
            f"PostgreSQL not reachable at {make_url(admin).render_as_string()} ({exc!r}); "
            f"set {PG_URL_VAR}=postgresql+asyncpg://user@host:port/db to run these tests, "
            f"and {PG_REQUIRE_VAR}=1 to make them mandatory"
        )
        if _required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    url = make_url(admin).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        asyncio.run(_drop_database(admin, name))


@pytest.fixture
def pg_dsn(pg_url: str) -> str:
    """The same database as a plain asyncpg DSN (for witness connections)."""
    return _asyncpg_dsn(pg_url)


@pytest.fixture
def upstream(pg_url: str) -> str:
    """``"host:port"`` of the test server, for a ChaosProxy in front of it."""
    url = make_url(pg_url)
    return f"{url.host}:{url.port or 5432}"


@pytest.fixture
async def pg_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An asyncpg engine on the run's database, disposed after the test."""
    engine = create_async_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def accounts(pg_engine: AsyncEngine) -> AsyncEngine:
    """A fresh ``accounts`` table, two rows of balance 100 (ids 1 and 2)."""
    async with pg_engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS accounts"))
        await conn.execute(text("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)"))
        await conn.execute(text("INSERT INTO accounts VALUES (1, 100), (2, 100)"))
    return pg_engine


class Witness:
    """A separate asyncpg connection that watches the database from the outside."""

    def __init__(self, conn: Any, database: str) -> None:
        self.conn = conn
        self.database = database

    async def other_sessions(self) -> list[dict[str, Any]]:
        """Client sessions on the test database other than this witness."""
        rows = await self.conn.fetch(
            "SELECT pid, state, application_name, query FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            self.database,
        )
        return [dict(r) for r in rows]

    async def wait_sessions(self, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll until exactly ``expected`` other sessions remain (or the timeout)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        sessions = await self.other_sessions()
        while len(sessions) != expected and loop.time() < end:
            await asyncio.sleep(0.05)
            sessions = await self.other_sessions()
        return sessions

    async def terminate(self, pid: int) -> None:
        await self.conn.execute("SELECT pg_terminate_backend($1)", pid)

    async def scalar(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        return await self.conn.execute(sql, *args)


@pytest.fixture
async def witness(pg_dsn: str) -> AsyncIterator[Witness]:
    """A witness connection on the test database (``pg_stat_activity``, row counts)."""
    import asyncpg

    conn = await asyncpg.connect(pg_dsn)
    try:
        yield Witness(conn, make_url(pg_dsn).database or "")
    finally:
        await conn.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An aiosqlite URL on a fresh file (never ``:memory:``, whose one shared
    connection lets one coroutine's ROLLBACK discard another's work)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
async def sqlite_engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """An aiosqlite engine on a fresh file, disposed after the test."""
    engine = create_async_engine(sqlite_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def _clean_global_state() -> Iterator[None]:
    """Every test starts with no named breakers and with backoff waits on."""
    reset_breakers()
    with set_testing(False):
        yield
    reset_breakers()


@pytest.fixture
def no_waits() -> Iterator[None]:
    """Backoff waits off for this test."""
    with set_testing(True):
        yield
