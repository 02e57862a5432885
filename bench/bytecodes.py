"""Python bytecodes executed per unit of work beyond the raw unit: a measure without noise.

    python -m bench.bytecodes [--units N] [--top N] [--pg-url URL]

Timed ratios on a shared machine move by ±0.02 from run to run, more than many a
change worth making; the number of bytecode instructions the interpreter executes
for one unit does not move unless the code path does. Counted with
``sys.settrace`` opcode events over N of figure 1's units (connect, ``SELECT 1``,
release) on PostgreSQL after a warm-up, for the raw engine, ``@resilient`` and
``ResilientEngine``, with the functions that add the most. As in the timed figures,
"raw" runs with resilient-db's process-wide SQLAlchemy listeners removed, and "raw,
listeners installed" shows what they cost an unguarded unit: any ``Engine`` event
listener switches SQLAlchemy to its event-dispatching path for every connection.

It is not a time: one bytecode may cost 20 ns or 2 µs (a C call, cache misses after
an I/O wait). Use it to see whether a change shortened the path, and the timed
figures (``python -m bench --only overhead``, ``python -m bench.ablation``) to see
what that is worth; docs/performance.md, 1a, has both.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from bench._context import pg_url_from_env
from bench._harness import versions, write_json
from bench._variants import guarded_units, raw_unit
from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

Unit = Callable[[], Awaitable[Any]]


async def trace(
    unit: Unit,
    units: int,
    on_opcode: Callable[[FrameType], None],
    keep: Callable[[FrameType], bool] | None = None,
) -> None:
    """Run ``unit`` ``units`` times, calling ``on_opcode(frame)`` before every bytecode
    executed in a frame that ``keep`` accepts (every frame without ``keep``)."""

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if keep is not None and not keep(frame):
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            on_opcode(frame)
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(units):
            await unit()
    finally:
        sys.settrace(None)


async def count(unit: Unit, units: int) -> Counter[str]:
    """Bytecodes executed by ``units`` runs of ``unit``, per function (file:name)."""
    counts: Counter[str] = Counter()

    def seen(frame: FrameType) -> None:
        code = frame.f_code
        counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1

    await trace(unit, units, seen)
    return counts


async def measure(url: str, *, units: int, warmup: int) -> dict[str, Counter[str]]:
    engine = create_async_engine(url)
    try:
        raw = raw_unit(engine)
        # (name, unit, resilient-db's SQLAlchemy listeners installed while it runs)
        variants: list[tuple[str, Unit, bool]] = [
            ("raw", raw, False),
            ("raw, listeners installed", raw, True),
            *((name, unit, True) for name, unit in guarded_units(engine).items()),
        ]
        found = {}
        try:
            for name, unit, listening in variants:
                if listening:
                    install_commit_tracking()
                else:
                    uninstall_commit_tracking()
                for _ in range(warmup):
                    await unit()
                found[name] = await count(unit, units)
        finally:
            install_commit_tracking()
        return found
    finally:
        await engine.dispose()


def report(
    found: dict[str, Counter[str]], units: int, top: int
) -> tuple[str, list[dict[str, Any]]]:
    raw = found["raw"]
    raw_total = sum(raw.values()) / units
    lines = [f"{'variant':<24}  {'bytecodes/unit':>14}  {'beyond raw':>10}"]
    rows: list[dict[str, Any]] = []
    for name, counts in found.items():
        total = sum(counts.values()) / units
        added = {
            key: (counts[key] - raw[key]) / units
            for key in set(counts) | set(raw)
            if counts[key] != raw[key] and not key.startswith("_variants.py:")  # the units
        }
        biggest = sorted(added.items(), key=lambda item: -item[1])[:top]
        rows.append(
            {
                "variant": name,
                "bytecodes_per_unit": total,
                "beyond_raw": total - raw_total,
                "top_functions": [{"function": k, "per_unit": v} for k, v in biggest],
            }
        )
        lines.append(f"{name:<24}  {total:>14.0f}  {total - raw_total:>10.0f}")
    for row in rows[1:]:
        lines.append(f"\n{row['variant']}: the functions that add the most, per unit")
        lines.extend(f"  {f['per_unit']:>7.1f}  {f['function']}" for f in row["top_functions"])
    return "\n".join(lines), rows


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--units", type=int, default=50, help="units counted per variant")
    parser.add_argument("--top", type=int, default=12, help="functions listed per variant")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    if args.units < 1:
        parser.error("--units must be at least 1")
    found = await measure(args.pg_url or pg_url_from_env(), units=args.units, warmup=50)
    text, rows = report(found, args.units, args.top)
    print("connect, SELECT 1, release (PostgreSQL, asyncpg), tracing off")
    print(text)
    out = None if args.out is None else Path(args.out)
    results = {"units": args.units, "rows": rows}
    path = write_json("bytecodes", {"versions": versions("sqlalchemy", "asyncpg"), **results}, out)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
