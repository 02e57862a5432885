"""Where the overhead of a guarded unit goes: the policy taken apart, piece by piece.

    python -m bench.ablation [--rounds N] [--ops N] [--quick] [--pre-ping] [--pg-url URL]

The unit is figure 1's (connect, ``SELECT 1``, release) on PostgreSQL. Interleaved
in one process, with the harness's median of per-round ratios, wall time and the
client's CPU time:

* ``raw`` — resilient-db's process-wide SQLAlchemy listeners removed;
* ``raw, listeners installed`` — what those listeners cost an unguarded unit;
* ``@resilient`` — ``@resilient(timeout=2, retries=3)``: one guarded operation;
* ``ResilientEngine`` — ``ResilientEngine(engine, timeout=2, retries=3)``: one
  guarded operation per unit (the statement; a checkout from a warm pool runs
  outside the policy);
* the same engine wrapper without one piece at a time: no ``timeout`` (no attempt
  timer), ``breaker=False``, ``retry_budget=None``; and with none of them and
  ``retries=0`` (the bare scope: what guarding costs before any policy acts).

Tracing is off throughout (no OpenTelemetry provider). Nothing here has a target:
it says which piece a speed goal would have to give up.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._context import pg_url_from_env
from bench._harness import Row, versions, write_json
from bench._otel import install
from bench._variants import Variant, engine_unit, raw_unit, run_interleaved
from resilient_db import ResilientEngine, resilient

ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "ResilientEngine": {"timeout": 2, "retries": 3},
    "ResilientEngine, no timeout": {"retries": 3},
    "ResilientEngine, no breaker": {"timeout": 2, "retries": 3, "breaker": False},
    "ResilientEngine, no retry budget": {"timeout": 2, "retries": 3, "retry_budget": None},
    "ResilientEngine, bare (retries=0, nothing else)": {
        "retries": 0,
        "breaker": False,
        "retry_budget": None,
    },
}


def variants(engine: AsyncEngine) -> list[Variant]:
    raw = raw_unit(engine)
    found = [
        Variant("raw", raw, guarded=False),
        Variant("raw, listeners installed", raw, guarded=True),
        Variant("@resilient", resilient(timeout=2, retries=3)(raw), guarded=True),
    ]
    for name, settings in ENGINE_VARIANTS.items():
        found.append(Variant(name, engine_unit(ResilientEngine(engine, **settings)), guarded=True))
    return found


async def measure(
    url: str, *, rounds: int, ops: int, warmup: int, pre_ping: bool = False
) -> list[Row]:
    engine = create_async_engine(url, pool_pre_ping=pre_ping)
    telemetry = install()
    try:
        return await run_interleaved(
            telemetry,
            variants(engine),
            baseline="raw",
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            label="ablation",
        )
    finally:
        telemetry.shutdown()
        await engine.dispose()


def table(rows: Sequence[Row]) -> str:
    raw_cpu = next(r for r in rows if r.variant == "raw").cpu_median_us
    width = max(len(r.variant) for r in rows)
    lines = [
        f"{'variant':<{width}}  {'wall µs':>8}  {'× raw':>6}  {'CPU µs':>7}  {'CPU × raw':>9}"
        f"  {'CPU µs over raw':>15}"
    ]
    for r in rows:
        lines.append(
            f"{r.variant:<{width}}  {r.median_us:>8.1f}  {r.ratio:>6.3f}  {r.cpu_median_us:>7.1f}"
            f"  {r.cpu_ratio:>9.3f}  {r.cpu_median_us - raw_cpu:>15.1f}"
        )
    return "\n".join(lines)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a few iterations only")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument(
        "--pre-ping",
        action="store_true",
        help="engine with pool_pre_ping=True: every checkout asks the server (and is guarded)",
    )
    parser.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    rounds, ops, warmup = (2, 5, 5) if args.quick else (args.rounds, args.ops, 300)
    url = args.pg_url or pg_url_from_env()
    rows = await measure(url, rounds=rounds, ops=ops, warmup=warmup, pre_ping=args.pre_ping)
    ping = ", pool_pre_ping=True" if args.pre_ping else ""
    print(f"connect, SELECT 1, release (PostgreSQL, asyncpg{ping}), tracing off")
    print(table(rows))
    packages = ("sqlalchemy", "asyncpg")
    results = {
        "rounds": rounds,
        "ops_per_round": ops,
        "warmup": warmup,
        "pool_pre_ping": args.pre_ping,
        "rows": rows,
    }
    out = None if args.out is None else Path(args.out)
    path = write_json("ablation", {"versions": versions(*packages), **results}, out)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
