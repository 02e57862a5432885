"""Figure 1 — happy-path overhead of a guarded unit of work (connect, SELECT 1, release).

    python -m bench.overhead [--db pg|sqlite|both] [--rounds N] [--ops N] [--quick]
    python -m bench --only overhead          # the same, inside the full report

Compares, interleaved in one process, on PostgreSQL (asyncpg) and SQLite
(aiosqlite): the raw SQLAlchemy engine; ``@resilient(timeout=2, retries=3)``
(default shared breaker and retry budget) and ``ResilientEngine(engine, timeout=2,
retries=3)``, each with the OpenTelemetry SDK off and on (and ``@resilient(retries=3)``
without a timeout, to show what the attempt timer costs); the hand-glued
alternative (``asyncio.timeout`` + tenacity + aiobreaker), bare and inside an SDK
span; and stamina. Targets: ≤ 1.05× raw with tracing off, ≤ 1.12× with it on.

"raw" runs with resilient-db's process-wide SQLAlchemy listeners removed, so their
cost is charged to the guarded variants. "raw, listeners installed" is the same
unit in a process that uses resilient-db elsewhere (the listeners return at once
outside a guarded call): the tracing-off targets are also judged against it, the
literal "decorated vs the same undecorated unit, in one process" measure.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._context import Context
from bench._harness import Figure, Row, Table, Target, ratio_between
from bench._svg import Bars
from bench._variants import (
    Variant,
    engine_unit,
    glued_breaker,
    hand_glued,
    in_span,
    raw_unit,
    run_interleaved,
    stamina_retry,
)
from resilient_db import ResilientEngine, resilient

OFF_TARGET = 1.05
ON_TARGET = 1.12
GUARDED = ("@resilient", "ResilientEngine")
RAW_LISTENING = "raw, listeners installed"


def variants(engine: AsyncEngine, ctx: Context) -> list[Variant]:
    raw = raw_unit(engine)
    decorated = resilient(timeout=2, retries=3)(raw)
    untimed = resilient(retries=3)(raw)
    through_engine = engine_unit(ResilientEngine(engine, timeout=2, retries=3))
    glued = hand_glued(raw, breaker=glued_breaker())
    return [
        Variant("raw", raw, guarded=False),
        Variant(RAW_LISTENING, raw, guarded=True),
        Variant("@resilient", decorated, guarded=True),
        Variant("@resilient + OTel SDK", decorated, guarded=True, otel=True),
        Variant("@resilient, no timeout", untimed, guarded=True),
        Variant("ResilientEngine", through_engine, guarded=True),
        Variant("ResilientEngine + OTel SDK", through_engine, guarded=True, otel=True),
        Variant("hand-glued", glued, guarded=False),
        Variant("hand-glued + OTel span", in_span(ctx.telemetry, glued), guarded=False, otel=True),
        Variant("stamina", stamina_retry(raw), guarded=False),
    ]


async def measure(
    ctx: Context, url: str, label: str, *, rounds: int, ops: int, warmup: int
) -> list[Row]:
    engine = create_async_engine(url)
    try:
        return await run_interleaved(
            ctx.telemetry,
            variants(engine, ctx),
            baseline="raw",
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            label=f"overhead/{label}",
        )
    finally:
        await engine.dispose()


def _table(label: str, rows: list[Row]) -> Table:
    return Table(
        f"{label}: connect, SELECT 1, release",
        ["variant", "wall µs/op", "× raw", "client CPU µs/op", "CPU × raw", "spans/op"],
        [
            [
                r.variant,
                f"{r.median_us:.1f}",
                f"{r.ratio:.3f}",
                f"{r.cpu_median_us:.1f}",
                f"{r.cpu_ratio:.3f}",
                f"{r.extra['spans_per_op']:g}",
            ]
            for r in rows
        ],
    )


async def figure(
    ctx: Context,
    *,
    dbs: Sequence[str] = ("pg", "sqlite"),
    rounds: int | None = None,
    ops: int | None = None,
) -> Figure:
    rounds = rounds if rounds is not None else ctx.scale(120, 2)
    ops = ops if ops is not None else ctx.scale(50, 10)
    warmup = ctx.scale(200, 5)
    databases = {
        "pg": ("PostgreSQL (asyncpg)", ctx.pg_url),
        "sqlite": ("SQLite (aiosqlite)", ctx.sqlite_url("overhead")),
    }
    results: list[dict[str, Any]] = []
    tables: list[Table] = []
    targets: list[Target] = []
    panels: list[Any] = []
    for key in dbs:
        label, url = databases[key]
        rows = await measure(ctx, url, label, rounds=rounds, ops=ops, warmup=warmup)
        results.append({"database": label, "rows": rows})
        tables.append(_table(label, rows))
        ratio = {r.variant: r.ratio for r in rows}
        for name in GUARDED:
            targets.append(
                Target.at_most(f"{label}: {name}, tracing off", ratio[name], OFF_TARGET, "× raw")
            )
            targets.append(
                Target.at_most(
                    f"{label}: {name}, tracing off, vs {RAW_LISTENING}",
                    ratio_between(rows, name, RAW_LISTENING),
                    OFF_TARGET,
                    "× that unit",
                )
            )
            spans = next(r.extra["spans_per_op"] for r in rows if r.variant == f"{name} + OTel SDK")
            note = "" if spans else "no spans emitted by the library in this run"
            targets.append(
                Target.at_most(
                    f"{label}: {name}, OTel SDK on",
                    ratio[f"{name} + OTel SDK"],
                    ON_TARGET,
                    "× raw",
                    note,
                )
            )
        panels.append(
            Bars(
                title=f"1. Happy-path overhead, {label} (× raw, median of rounds)",
                unit="× raw",
                bars=[(r.variant, r.ratio) for r in rows],
                targets=[(OFF_TARGET, "1.05 tracing off"), (ON_TARGET, "1.12 tracing on")],
                origin=1.0,
            )
        )
    return Figure(
        key="overhead",
        title="1. Happy-path overhead per unit of work",
        tables=tables,
        data={"rounds": rounds, "ops_per_round": ops, "warmup": warmup, "results": results},
        targets=targets,
        panels=panels,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--db", choices=["pg", "sqlite", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 120)")
    parser.add_argument("--ops", type=int, default=None, help="operations per round (50)")
    parser.add_argument("--quick", action="store_true", help="a few iterations only")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON and SVG")
    args = parser.parse_args(argv)
    from bench._runner import run_single

    dbs = ("pg", "sqlite") if args.db == "both" else (args.db,)

    async def one(ctx: Context) -> Figure:
        return await figure(ctx, dbs=dbs, rounds=args.rounds, ops=args.ops)

    return asyncio.run(
        run_single(
            "overhead",
            one,
            quick=args.quick,
            pg_url=args.pg_url,
            out=args.out,
            need_pg="pg" in dbs,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
