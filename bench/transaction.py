"""``run_transaction`` and its server-side deadline: what the extra round trip costs.

``ResilientEngine.run_transaction`` sends the remaining time to PostgreSQL as a
transaction-local ``set_config('statement_timeout', ..., true)`` — one more round
trip — but only when that is shorter than the server's own ``statement_timeout``.
Two databases on the same server: one with the default ``statement_timeout = 0``
(the round trip is sent), one whose default is 1 s, tighter than the 2 s budget
(nothing sent). Each is compared, interleaved, with the raw unit it replaces::

    async with sessionmaker.begin() as session:
        await session.execute(text("SELECT 1"))

The round trip itself is isolated on the first database, against the same engine
wrapped with ``server_timeouts=False`` (never sent): same pool, same server.

The statements each unit sends are counted with SQLAlchemy's
``before_cursor_execute`` (BEGIN and COMMIT are not cursor executes on asyncpg).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from bench._context import TIGHT_STATEMENT_TIMEOUT, Context
from bench._harness import Figure, Op, Row, Table, difference_between, ratio_between
from bench._svg import Bars
from bench._variants import SELECT_1, StatementCounter, Variant, run_interleaved
from resilient_db import CircuitBreaker, ResilientEngine

RAW_0 = "raw session.begin() (server default 0)"
OURS_0 = "run_transaction (server default 0: SET LOCAL sent)"
RAW_T = f"raw session.begin() (server default {TIGHT_STATEMENT_TIMEOUT})"
OURS_T = f"run_transaction (server default {TIGHT_STATEMENT_TIMEOUT}: not sent)"
OURS_OFF = "run_transaction, server_timeouts=False (server default 0)"


async def _unit(session: AsyncSession) -> Any:
    return (await session.execute(SELECT_1)).scalar()


def _raw(maker: async_sessionmaker[AsyncSession]) -> Op:
    async def raw() -> Any:
        async with maker.begin() as session:
            return await _unit(session)

    return raw


def _ours(db: ResilientEngine) -> Op:
    async def ours() -> Any:
        return await db.run_transaction(_unit)

    return ours


async def figure(ctx: Context) -> Figure:
    rounds, ops, warmup = ctx.scale(60, 2), ctx.scale(60, 20), ctx.scale(100, 5)
    open_engine = create_async_engine(ctx.pg_url)
    tight_engine = create_async_engine(ctx.pg_tight_url)
    counters = {
        RAW_0: open_engine,
        OURS_0: open_engine,
        OURS_OFF: open_engine,
        RAW_T: tight_engine,
        OURS_T: tight_engine,
    }
    watch = {e: StatementCounter(e) for e in (open_engine, tight_engine)}
    db_open = ResilientEngine(
        open_engine, timeout=2, retries=3, breaker=CircuitBreaker("bench-tx-open")
    )
    db_tight = ResilientEngine(
        tight_engine, timeout=2, retries=3, breaker=CircuitBreaker("bench-tx-tight")
    )
    db_off = ResilientEngine(
        open_engine,
        timeout=2,
        retries=3,
        breaker=CircuitBreaker("bench-tx-off"),
        server_timeouts=False,
    )
    variants = [
        Variant(RAW_0, _raw(async_sessionmaker(open_engine)), guarded=False),
        Variant(OURS_0, _ours(db_open), guarded=True),
        Variant(OURS_OFF, _ours(db_off), guarded=True),
        Variant(RAW_T, _raw(async_sessionmaker(tight_engine)), guarded=False),
        Variant(OURS_T, _ours(db_tight), guarded=True),
    ]
    labelled = []
    for variant in variants:
        counter = watch[counters[variant.name]]

        def op(inner: Op = variant.op, name: str = variant.name, c: Any = counter) -> Any:
            c.label = name
            return inner()

        labelled.append(Variant(variant.name, op, variant.guarded, variant.otel))
    try:
        rows = await run_interleaved(
            ctx.telemetry,
            labelled,
            baseline=RAW_0,
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            label="transaction",
        )
    finally:
        for counter in watch.values():
            counter.close()
        await open_engine.dispose()
        await tight_engine.dispose()
    total = warmup + rounds * ops
    for row in rows:
        engine = counters[row.variant]
        row.extra["statements_per_unit"] = round(
            watch[engine].counts.get(row.variant, 0) / total, 3
        )
    pairs = {OURS_0: RAW_0, OURS_OFF: RAW_0, OURS_T: RAW_T}
    own_ratio = {ours: ratio_between(rows, ours, raw) for ours, raw in pairs.items()}
    own_cpu = {ours: ratio_between(rows, ours, raw, cpu=True) for ours, raw in pairs.items()}
    round_trip_us = difference_between(rows, OURS_0, OURS_OFF)
    by_name = {r.variant: r for r in rows}

    def line(row: Row) -> list[str]:
        raw = pairs.get(row.variant)
        return [
            row.variant,
            f"{row.median_us:.1f}",
            f"{own_ratio[row.variant]:.3f}" if raw else "1",
            f"{row.cpu_median_us:.1f}",
            f"{own_cpu[row.variant]:.3f}" if raw else "1",
            f"{row.extra['statements_per_unit']:g}",
        ]

    table = Table(
        "run_transaction vs a raw session.begin() unit (SELECT 1), PostgreSQL",
        [
            "variant",
            "wall µs/op",
            "× its raw",
            "client CPU µs/op",
            "CPU × its raw",
            "statements/unit",
        ],
        [line(r) for r in rows],
    )
    table.notes.append(
        f"The SET LOCAL round trip: +{round_trip_us:.1f} µs per unit "
        f"(median per-round difference, run_transaction with and without server_timeouts "
        f"on the same database); × {ratio_between(rows, OURS_0, OURS_OFF):.3f}"
    )
    extra_statements = (
        by_name[OURS_0].extra["statements_per_unit"]
        - by_name[OURS_OFF].extra["statements_per_unit"]
    )
    return Figure(
        key="transaction",
        title="1b. run_transaction with the server-side deadline",
        tables=[table],
        data={
            "rounds": rounds,
            "ops_per_round": ops,
            "rows": rows,
            "ratio_to_own_raw": own_ratio,
            "cpu_ratio_to_own_raw": own_cpu,
            "set_local_round_trip_us": round_trip_us,
            "extra_statements_per_unit": extra_statements,
            "tight_statement_timeout": TIGHT_STATEMENT_TIMEOUT,
        },
        # No target of its own: the issue asks for the cost of the round trip, reported.
        targets=[],
        panels=[
            Bars(
                title="1b. run_transaction vs a raw session.begin() unit (× its raw unit)",
                unit="× raw unit on the same database",
                bars=[
                    ("run_transaction, SET LOCAL sent", own_ratio[OURS_0]),
                    ("run_transaction, server_timeouts=False", own_ratio[OURS_OFF]),
                    ("run_transaction, server default 1 s", own_ratio[OURS_T]),
                ],
                origin=1.0,
            )
        ],
    )
