"""Happy-path overhead of a guarded unit of work (connect, SELECT 1, release).

    python -m bench.overhead [--db pg|sqlite|both] [--rounds N] [--ops N]

Compares, interleaved in one process: the raw SQLAlchemy engine; the same unit
decorated with ``@resilient(timeout=2, retries=3)`` (default shared breaker on,
retry budget on, tracing off); and the hand-glued alternative a user would write
(``asyncio.timeout`` + tenacity + aiobreaker). Target: @resilient ≤ 1.05× raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from datetime import timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._harness import Op, interleave, table, versions, write_json
from resilient_db import resilient
from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

SELECT_1 = text("SELECT 1")
PG_URL = os.environ.get(
    "RESILIENT_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def variants(engine: AsyncEngine) -> dict[str, Op]:
    import aiobreaker
    import tenacity

    async def raw() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(SELECT_1)).scalar()

    guarded = resilient(timeout=2, retries=3)(raw)

    glued_breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=10))

    async def hand_glued() -> Any:
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(4),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=2),
            retry=tenacity.retry_if_exception_type((sa_exc.DBAPIError, OSError)),
            reraise=True,
        ):
            with attempt:
                async with asyncio.timeout(2):
                    return await glued_breaker.call_async(raw)
        return None

    return {"raw": raw, "@resilient": guarded, "hand-glued": hand_glued}


async def run(url: str, label: str, rounds: int, ops: int) -> dict[str, Any]:
    engine = create_async_engine(url)
    # The raw baseline runs without resilient-db's process-wide commit listeners,
    # so that their cost is charged to the guarded variants, where it belongs.
    prepare = {
        "raw": uninstall_commit_tracking,
        "@resilient": install_commit_tracking,
        "hand-glued": uninstall_commit_tracking,
    }
    try:
        rows = await interleave(
            variants(engine), baseline="raw", rounds=rounds, ops=ops, prepare=prepare
        )
    finally:
        await engine.dispose()
    print(table(f"\n{label}: connect, SELECT 1, release", rows, "raw"))
    return {"database": label, "rows": rows}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["pg", "sqlite", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=400)
    args = parser.parse_args(argv)
    results = []
    if args.db in ("pg", "both"):
        results.append(await run(PG_URL, "postgresql+asyncpg", args.rounds, args.ops))
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite+aiosqlite:///{tmp}/bench.db"
            results.append(await run(url, "sqlite+aiosqlite", args.rounds, args.ops))
    path = write_json(
        "overhead",
        {
            "versions": versions("sqlalchemy", "asyncpg", "aiosqlite", "tenacity", "aiobreaker"),
            "results": results,
        },
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
