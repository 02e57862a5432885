"""Figure 3 — deadline precision on a hung database: from the deadline to the caller's error.

PostgreSQL: the engine's connection goes through a :class:`ChaosProxy`; once a
connection is pooled, ``proxy.half_open()`` freezes the network both ways (a
partition: sockets stay open, nothing is forwarded), and the unit of work
(session, ``SELECT 1``) runs with a limit of ``T``. SQLite: a recursive CTE that
runs for several seconds stands in for the hang.

Variants: ``@resilient(timeout=T, retries=0)`` and ``@resilient(deadline=T)`` (with
its 3 retries) around a plain session; ``ResilientEngine(timeout=T, retries=0)``
sessions; and ``asyncio.timeout(T)`` around a plain session — the bound a
hand-glued stack relies on. Lateness = time of the caller's error − (start + T).
Each repetition uses a fresh engine and breaker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from bench._context import Context, host_port
from bench._harness import Figure, Op, Table, Target
from bench._svg import Bars
from bench._variants import SELECT_1
from resilient_db import CircuitBreaker, ResilientEngine, resilient
from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking
from resilient_db.chaos import ChaosProxy

TARGET_LATE_S = 0.100
LONG_CTE = text(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) "
    "SELECT count(*) FROM c"
)

PLAIN = "asyncio.timeout(T) + plain session"
OURS = ("@resilient(timeout=T)", "@resilient(deadline=T, retries=3)", "ResilientEngine(timeout=T)")
VARIANTS = (*OURS, PLAIN)

Builder = Callable[[AsyncEngine, float, int], Op]


def builders(statement: Any, params: dict[str, Any]) -> dict[str, Builder]:
    def session_unit(engine: AsyncEngine) -> Op:
        maker = async_sessionmaker(engine)

        async def unit() -> Any:
            async with maker() as session:
                return (await session.execute(statement, params)).scalar()

        return unit

    def decorated_timeout(engine: AsyncEngine, limit: float, rep: int) -> Op:
        breaker = CircuitBreaker(f"bench-deadline-t-{rep}-{id(engine)}")
        return resilient(timeout=limit, retries=0, breaker=breaker)(session_unit(engine))

    def decorated_deadline(engine: AsyncEngine, limit: float, rep: int) -> Op:
        breaker = CircuitBreaker(f"bench-deadline-d-{rep}-{id(engine)}")
        return resilient(deadline=limit, retries=3, breaker=breaker)(session_unit(engine))

    def through_engine(engine: AsyncEngine, limit: float, rep: int) -> Op:
        breaker = CircuitBreaker(f"bench-deadline-e-{rep}-{id(engine)}")
        db = ResilientEngine(engine, timeout=limit, retries=0, breaker=breaker)

        async def unit() -> Any:
            async with db.session() as session:
                return (await session.execute(statement, params)).scalar()

        return unit

    def plain(engine: AsyncEngine, limit: float, rep: int) -> Op:
        unit = session_unit(engine)

        async def bounded() -> Any:
            async with asyncio.timeout(limit):
                return await unit()

        return bounded

    return {
        OURS[0]: decorated_timeout,
        OURS[1]: decorated_deadline,
        OURS[2]: through_engine,
        PLAIN: plain,
    }


async def _late(op: Op, limit: float) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        await op()
    except Exception as exc:
        return time.perf_counter() - start - limit, type(exc).__name__
    raise RuntimeError("the hung call returned: the fault was not in place")


def _prepare(name: str) -> None:
    if name == PLAIN:
        uninstall_commit_tracking()
    else:
        install_commit_tracking()


async def _postgres(ctx: Context, limit: float, reps: int) -> dict[str, list[tuple[float, str]]]:
    found: dict[str, list[tuple[float, str]]] = {name: [] for name in VARIANTS}
    build = builders(SELECT_1, {})
    async with ChaosProxy(host_port(ctx.pg_url), name="bench-deadline") as proxy:
        for rep in range(reps):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for name in order:
                engine = create_async_engine(proxy.proxied_url(ctx.pg_url))
                try:
                    async with engine.connect() as conn:  # one pooled, healthy connection
                        await conn.execute(SELECT_1)
                    op = build[name](engine, limit, rep)
                    _prepare(name)
                    proxy.half_open()
                    try:
                        found[name].append(await _late(op, limit))
                    finally:
                        proxy.half_open(False)
                finally:
                    await engine.dispose()
    install_commit_tracking()
    return found


async def _calibrate_sqlite(seconds: float, url: str) -> int:
    """How many rows the CTE must count to run for about ``seconds`` (two probes: the
    second, sized for about a tenth of ``seconds``, gives the rate)."""
    engine = create_async_engine(url)
    try:
        probe = 200_000
        async with engine.connect() as conn:
            for _ in range(2):
                start = time.perf_counter()
                await conn.execute(LONG_CTE, {"n": probe})
                elapsed = time.perf_counter() - start
                rate = probe / elapsed
                probe = max(probe, int(rate * seconds / 10))
    finally:
        await engine.dispose()
    return max(probe, int(rate * seconds))


async def _sqlite(
    ctx: Context, limit: float, reps: int, statement_s: float
) -> tuple[dict[str, list[tuple[float, str]]], int]:
    url = ctx.sqlite_url("deadline")
    n = await _calibrate_sqlite(statement_s, url)
    build = builders(LONG_CTE, {"n": n})
    found: dict[str, list[tuple[float, str]]] = {name: [] for name in VARIANTS}
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            engine = create_async_engine(url)
            try:
                op = build[name](engine, limit, rep)
                _prepare(name)
                found[name].append(await _late(op, limit))
            finally:
                await engine.dispose()
    install_commit_tracking()
    return found, n


def _summary(found: dict[str, list[tuple[float, str]]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "late_ms_median": statistics.median(late for late, _ in results) * 1e3,
            "late_ms_max": max(late for late, _ in results) * 1e3,
            "late_ms_each": [round(late * 1e3, 1) for late, _ in results],
            "errors": sorted({error for _, error in results}),
        }
        for name, results in found.items()
    }


async def figure(ctx: Context) -> Figure:
    limit = ctx.seconds(0.5, 0.2)
    reps = ctx.scale(3, 1)
    # The statement must outlast the limit whatever the machine does between the
    # calibration and the run: 12x in the full run, 6x in --quick (at 2x, 0.4 s
    # against 0.2 s, a calibration on a slow moment once let it finish in time).
    statement_s = ctx.seconds(6.0, 1.2)
    pg = _summary(await _postgres(ctx, limit, reps))
    sqlite_found, n = await _sqlite(ctx, limit, reps, statement_s)
    lite = _summary(sqlite_found)
    tables: list[Table] = []
    targets: list[Target] = []
    panels: list[Any] = []
    for label, summary in (
        ("PostgreSQL (asyncpg), network frozen (proxy half_open)", pg),
        (f"SQLite (aiosqlite), a recursive CTE calibrated to run {statement_s:g} s", lite),
    ):
        tables.append(
            Table(
                f"{label}: T = {limit * 1e3:.0f} ms, {reps} repetition(s)",
                ["variant", "late median ms", "late max ms", "caller's error"],
                [
                    [
                        name,
                        f"{s['late_ms_median']:.1f}",
                        f"{s['late_ms_max']:.1f}",
                        ", ".join(s["errors"]),
                    ]
                    for name, s in summary.items()
                ],
            )
        )
        short = label.split(" (")[0]
        targets.extend(
            Target.at_most(
                f"{short}: {name}, deadline → error",
                summary[name]["late_ms_median"],
                TARGET_LATE_S * 1e3,
                "ms late (median)",
            )
            for name in OURS
        )
        panels.append(
            Bars(
                title=f"3. Deadline precision, {short}: ms from the deadline to the error",
                unit="ms late (median)",
                bars=[(name, max(s["late_ms_median"], 0.1)) for name, s in summary.items()],
                targets=[(TARGET_LATE_S * 1e3, "100 ms")],
                log=True,
                value_format="{:.1f} ms",
            )
        )
    return Figure(
        key="deadline",
        title="3. Deadline precision on a hung database",
        tables=tables,
        data={
            "limit_s": limit,
            "repetitions": reps,
            "postgresql": pg,
            "sqlite": lite,
            "sqlite_statement_s": statement_s,
            "sqlite_cte_rows": n,
        },
        targets=targets,
        panels=panels,
    )
