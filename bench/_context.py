"""What every figure gets: where the databases are, how long to run, the telemetry switch.

The benchmark creates its own PostgreSQL databases (``rdb_bench_<random>``, and a
twin ``..._st`` whose default ``statement_timeout`` is 1 s) through the server
named by ``--pg-url`` / ``RESILIENT_TEST_PG_URL``, and drops them at the end; the
SQLite files live in a temporary directory.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from sqlalchemy.engine import make_url

from bench._otel import Telemetry

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
TIGHT_STATEMENT_TIMEOUT = "1s"
"""The server-side default of the ``_st`` database: tighter than the 2 s budgets used."""


def pg_url_from_env() -> str:
    return os.environ.get("RESILIENT_BENCH_PG_URL") or os.environ.get(
        "RESILIENT_TEST_PG_URL", DEFAULT_PG_URL
    )


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy URL as a plain asyncpg DSN."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def host_port(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.host or '127.0.0.1'}:{parsed.port or 5432}"


@dataclass
class Context:
    quick: bool
    pg_url: str
    """The benchmark's own database (server default ``statement_timeout`` 0)."""
    pg_tight_url: str
    """A twin database whose default ``statement_timeout`` is 1 s."""
    sqlite_dir: Path
    telemetry: Telemetry

    def sqlite_url(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.sqlite_dir / name}.db"

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full


@asynccontextmanager
async def databases(admin_url: str) -> AsyncIterator[tuple[str, str]]:
    """Create the two bench databases; yield their SQLAlchemy URLs; drop them."""
    import asyncpg

    name = f"rdb_bench_{secrets.token_hex(4)}"
    tight = f"{name}_st"
    admin = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f'CREATE DATABASE "{tight}"')
        await admin.execute(
            f"ALTER DATABASE \"{tight}\" SET statement_timeout = '{TIGHT_STATEMENT_TIMEOUT}'"
        )
    except BaseException:
        await admin.close()
        raise
    base = make_url(admin_url)
    try:
        yield (
            base.set(database=name).render_as_string(hide_password=False),
            base.set(database=tight).render_as_string(hide_password=False),
        )
    finally:
        try:
            for db in (name, tight):
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def context(
    admin_url: str, *, quick: bool, telemetry: Telemetry, need_pg: bool = True
) -> AsyncIterator[Context]:
    """The run's context; without ``need_pg`` (SQLite only), no server is touched."""
    async with AsyncExitStack() as stack:
        url = tight_url = ""
        if need_pg:
            url, tight_url = await stack.enter_async_context(databases(admin_url))
        tmp = stack.enter_context(TemporaryDirectory(prefix="rdb-bench-"))
        yield Context(
            quick=quick,
            pg_url=url,
            pg_tight_url=tight_url,
            sqlite_dir=Path(tmp),
            telemetry=telemetry,
        )


async def server_version(url: str) -> str:
    """PostgreSQL's ``server_version``."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
