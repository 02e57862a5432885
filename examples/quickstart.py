"""Quickstart: a repository guarded by @resilient, on the embedded SQLite default.

Runs with no database server. Four faults, and what resilient-db does:

1. another connection holds SQLite's write lock (SQLITE_BUSY): retried, succeeds;
2. injected disconnects (the in-process fault injector really closes the driver
   connection): retried on a fresh connection, succeeds;
3. a duplicate order (IntegrityError): raised at once, never retried;
4. a brown-out (queries slower than their timeout): the breaker opens and the next
   call is rejected in microseconds, without touching the database.

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
import time
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from resilient_db import AttemptTimeout, CircuitBreaker, CircuitOpenError, resilient
from resilient_db.chaos import FaultInjector, disconnect

breaker = CircuitBreaker("orders-db", failure_threshold=2, reset_timeout=5)


class OrderRepo:
    def __init__(self, engine: AsyncEngine) -> None:
        self.sessions = async_sessionmaker(engine)
        self.attempts = 0

    # Half jitter: three retries always wait at least 0.175 s in all, longer than the
    # 120 ms the demo holds the lock (full jitter may retry sooner, and give up).
    @resilient(timeout=2, retries=3, breaker=breaker, backoff={"initial": 0.05, "jitter": 0.5})
    async def place(self, order_id: str, amount: int) -> None:
        self.attempts += 1
        async with self.sessions.begin() as s:
            await s.execute(
                text("INSERT INTO orders (id, amount) VALUES (:id, :amount)"),
                {"id": order_id, "amount": amount},
            )

    @resilient(timeout=0.05, retries=0, breaker=breaker)
    async def monthly_report(self) -> int:
        self.attempts += 1
        async with self.sessions() as s:
            # A deliberately slow query: about 0.5 s on a fast core, ten times the
            # timeout, so that it times out on any machine (the timeout interrupts it).
            slow = text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < 5000000) SELECT count(*) FROM n"
            )
            return int((await s.execute(slow)).scalar_one())


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  log: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "orders.db"
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0})
        try:
            await tour(engine, path)
        finally:
            await engine.dispose()


async def tour(engine: AsyncEngine, path: Path) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE orders (id TEXT PRIMARY KEY, amount INT)"))
    repo = OrderRepo(engine)

    print("1. another connection holds the write lock for 120 ms")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.12, holder.execute, "COMMIT")
        repo.attempts = 0
        await repo.place("o-1", 100)
    finally:
        holder.close()
    print(f"   placed o-1 after {repo.attempts} attempts (SQLITE_BUSY was retried)")

    print("2. the connection drops under the next statement (injected)")
    drops = disconnect(rate=1.0, when=lambda op: op.ordinal == 1)
    repo.attempts = 0
    with FaultInjector(engine, drops, seed=1) as injector:
        await repo.place("o-2", 250)
    dropped = injector.counts.get("disconnect", 0)
    print(f"   placed o-2 after {repo.attempts} attempts ({dropped} dropped connection)")

    print("3. the same order again")
    repo.attempts = 0
    try:
        await repo.place("o-1", 100)
    except sa_exc.IntegrityError as exc:
        print(f"   {type(exc).__name__} after {repo.attempts} attempt: not retried")

    print("4. a brown-out: reports slower than their 50 ms timeout")
    for _ in range(3):
        repo.attempts = 0
        started = time.perf_counter()
        try:
            await repo.monthly_report()
        except AttemptTimeout as exc:
            print(f"   timed out ({exc}); breaker is {breaker.state.value}")
        except CircuitOpenError as exc:
            took = (time.perf_counter() - started) * 1e6
            print(
                f"   rejected in {took:.0f} us without touching the database "
                f"({repo.attempts} attempts): {exc}"
            )
    snapshot = breaker.snapshot()
    print(
        f"breaker {snapshot.name}: {snapshot.state.value}, retry after {snapshot.retry_after:.1f}s"
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT count(*) FROM orders"))).scalar_one()
    print(f"orders in the database: {rows}")


if __name__ == "__main__":
    asyncio.run(main())
