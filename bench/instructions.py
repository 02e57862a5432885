"""Figure 1's unit counted in CPU instructions: a figure the neighbours cannot move.

    python -m bench.instructions [--units N] [--warmup N] [--seeds N] [--variants a,b]
                                 [--pg-url URL]
    python -m bench.instructions --price-list [--units N] [--seeds N]

Timed ratios on a shared two-core machine move by ±0.03 from run to run, and by
more when the host steals time; the number of instructions the client executes for
a unit does not. Each variant's unit (connect, ``SELECT 1``, release on PostgreSQL,
tracing off) runs in a child process under ``valgrind --tool=callgrind``, twice:
``warmup`` units and then ``units`` more, and ``warmup`` units alone. The difference
divided by ``units`` is the unit's cost in instructions, with the import, the
warm-up and the shutdown taken out.

Two things would still move that count from run to run or from build to build, and
both are taken out:

* *When a full garbage collection falls.* One walks the whole heap, and when it
  runs depends on allocation counts that differ between the two children: up to
  15,000 instructions per unit. After the warm-up the child collects once and
  freezes what is alive (``gc.freeze()``); the young generations are still
  collected, so the garbage a unit makes is still paid for. With the heap frozen,
  two runs of one build give the same count within a few instructions per unit.
* *The memory layout.* The hash seed decides how dictionaries and sets are laid
  out, and with that which attribute lookups collide in the interpreter's type
  cache: a few thousand instructions per unit, either way, fixed for one build and
  one seed. Any change of the code moves the layout as a seed does. Each variant
  therefore runs under ``--seeds`` hash seeds (``PYTHONHASHSEED`` 0, 1, ...; three
  by default); the table gives the median count, the median of the ratios taken
  seed by seed, and the lowest and highest ratio.

The type cache's part can also be taken out: a lookup that misses the cache walks
the type's MRO (``find_name_in_mro``), and that walk's inclusive cost is the price
of the misses. Between two builds of the same path it moved by 6,500 instructions
per unit under one seed (5,700 and 12,200) while everything else moved by 1,400, the
change's real size. The second table gives the count without it: the length of the
path, the figure to compare two revisions by. The first is what the process ran,
the misses of its layout included.

What it counts is the client process's user-space instructions: not the server's
work, not the kernel's, not cache misses. A client-instruction ratio over raw is
therefore an upper bound on the wall-time ratio of a unit whose time is not all the
client's. As in the timed figures, "raw" runs with resilient-db's SQLAlchemy
listeners removed.

``--price-list`` counts instead what the interpreter charges for the building
blocks of a guarded call, on a coroutine that does nothing (no database): a
coroutine layer, a context variable set and reset, the call's two scope objects,
then ``@resilient`` with less and less left out. Each row is the cost of one call,
the no-op coroutine's own included.

Needs valgrind (Debian's package ``valgrind``); 5,000 units per variant and seed
take about a minute, two children at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from bench._context import pg_url_from_env
from bench._harness import versions, write_json
from bench._variants import guarded_units, raw_unit
from resilient_db import resilient
from resilient_db._scope import CallScope, _reset_scope, _set_scope
from resilient_db._sqla import uninstall_commit_tracking

VARIANTS = ("raw", "@resilient", "ResilientEngine")
PRICES = {
    "noop": "a no-op coroutine, awaited",
    "layer": "+ a coroutine layer around it",
    "contextvar": "+ a context variable set and reset",
    "scope": "+ a CallScope (with its AttemptState)",
    "bare": "@resilient(retries=0, breaker=False, retry_budget=None)",
    "untimed": "@resilient(retries=3)",
    "policy": "@resilient(timeout=2, retries=3)",
}
"""The price list's rows: each adds to the one before."""


async def _noop() -> None:
    return None


async def _layer() -> None:
    return await _noop()


async def _contextvar() -> None:
    token = _set_scope(None)
    try:
        return await _noop()
    finally:
        _reset_scope(token)


async def _scope() -> None:
    scope = CallScope(time.monotonic, None, True)
    token = _set_scope(scope)
    try:
        return await _noop()
    finally:
        _reset_scope(token)
        scope.end()


def _priced(name: str) -> Callable[[], Awaitable[None]]:
    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "noop": _noop,
        "layer": _layer,
        "contextvar": _contextvar,
        "scope": _scope,
        "bare": resilient(retries=0, breaker=False, retry_budget=None)(_noop),
        "untimed": resilient(retries=3)(_noop),
        "policy": resilient(timeout=2, retries=3)(_noop),
    }
    return calls[name]


_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


async def child(variant: str, warmup: int, units: int, url: str) -> None:
    """Run ``warmup + units`` of ``variant``'s units (inside valgrind)."""
    if variant in PRICES:
        call = _priced(variant)
        for _ in range(warmup):
            await call()
        _freeze_heap()
        for _ in range(units):
            await call()
        return
    engine = create_async_engine(url)
    try:
        if variant == "raw":
            uninstall_commit_tracking()
            unit = raw_unit(engine)
        elif variant in VARIANTS:
            unit = guarded_units(engine)[variant]
        else:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        for _ in range(warmup):
            await unit()
        _freeze_heap()
        for _ in range(units):
            await unit()
    finally:
        await engine.dispose()


def _freeze_heap() -> None:
    """Collect, then move every object alive after the warm-up out of the collector's
    sight (``gc.freeze()``). A full collection walks the whole heap — tens of millions
    of instructions for an interpreter with SQLAlchemy loaded — and when one falls
    depends on allocation counts that differ between the two children: without this,
    totals moved by up to 15,000 instructions per unit from run to run. The young
    generations are still collected, so the garbage a unit makes is still paid for."""
    gc.collect()
    gc.freeze()


_MRO_WALK = re.compile(r"^\s*([\d,]+) .*:find_name_in_mro\b", re.MULTILINE)


def type_cache_misses(out: Path) -> int:
    """Instructions spent on type-cache misses in a callgrind profile: the inclusive
    cost of ``find_name_in_mro``, which a lookup runs only when it misses the cache
    (``callgrind_annotate`` reads the profile; valgrind ships it)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    # The function appears once per source file its code came from (inlined
    # headers): separate entries, none calling another.
    return sum(int(m.group(1).replace(",", "")) for m in _MRO_WALK.finditer(done.stdout))


def callgrind(command: Sequence[str], out: Path, seed: int = 0) -> int:
    """Run ``command`` under callgrind (``PYTHONHASHSEED=seed``); the instructions it
    counted for the whole process."""
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed under valgrind:\n{done.stderr[-2000:]}")
    found = _TOTAL.search(out.read_text())
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(found.group(1))


def instructions(
    variant: str, warmup: int, units: int, url: str, directory: Path, seed: int = 0
) -> tuple[int, int]:
    """Instructions of a child process running ``warmup + units`` of ``variant``'s
    units, and how many of them went to type-cache misses."""
    child = [sys.executable, "-m", "bench.instructions", "--child", variant]
    options = ["--warmup", str(warmup), "--units", str(units), "--pg-url", url]
    out = directory / f"{[*VARIANTS, *PRICES].index(variant)}-{units}-{seed}.out"
    return callgrind([*child, *options], out, seed), type_cache_misses(out)


def measure(
    variants: Sequence[str], *, warmup: int, units: int, url: str, seeds: Sequence[int] = (0,)
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Instructions per unit of each variant, one figure per hash seed: all of them,
    and without the type-cache misses (the path's own length).

    A count is the same from run to run for one build and one seed, but not across
    seeds: the seed changes how dictionaries and sets are laid out, and with that
    which attribute lookups collide in the interpreter's type cache — a few thousand
    instructions per unit either way. A change of the code moves the layout just as
    a seed does, so a comparison between two revisions is read over several seeds."""
    # Compile every module's bytecode first: a child that compiles (a fresh checkout)
    # counts tens of millions of instructions the other does not.
    subprocess.run([sys.executable, "-c", "import bench.instructions, bench._variants"], check=True)
    with tempfile.TemporaryDirectory() as name, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        directory = Path(name)
        runs = {
            (variant, n, seed): pool.submit(instructions, variant, warmup, n, url, directory, seed)
            for seed in seeds
            for variant in variants
            for n in (0, units)
        }
        counted = {key: future.result() for key, future in runs.items()}

    def per_unit(count: Callable[[tuple[int, int]], int]) -> dict[str, list[float]]:
        return {
            v: [
                (count(counted[(v, units, seed)]) - count(counted[(v, 0, seed)])) / units
                for seed in seeds
            ]
            for v in variants
        }

    return per_unit(lambda c: c[0]), per_unit(lambda c: c[0] - c[1])


def report(
    per_unit: dict[str, list[float]], baseline: str = "raw", short: str = "raw", width: int = 16
) -> tuple[str, list[dict[str, Any]]]:
    """A table of ``per_unit`` (one count per seed), each row's median, and its median
    over and × the ``baseline`` row (``short``) taken seed by seed, with the lowest
    and highest ratio when there are several seeds."""
    raw = per_unit.get(baseline)
    lines = [
        f"{'variant':<{width}}  {'instructions/unit':>17}  {'over ' + short:>11}  "
        f"{'× ' + short:>8}  {'seeds: lowest-highest':>21}"
    ]
    rows: list[dict[str, Any]] = []
    for variant, counts in per_unit.items():
        over = ratio = None
        ratios: list[float] = []
        if raw is not None:
            over = statistics.median(c - r for c, r in zip(counts, raw, strict=True))
            ratios = [c / r for c, r in zip(counts, raw, strict=True)]
            ratio = statistics.median(ratios)
        count = statistics.median(counts)
        rows.append(
            {
                "variant": variant,
                "per_unit": count,
                "per_seed": counts,
                "over_raw": over,
                "ratio": ratio,
                "ratios": ratios,
            }
        )
        line = f"{variant:<{width}}  {count:>17,.0f}  "
        if over is not None and ratio is not None:
            line += f"{over:>+11,.0f}  {ratio:>8.3f}"
            if len(ratios) > 1:
                line += f"  {min(ratios):>10.3f}-{max(ratios):.3f}"
        lines.append(line)
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--units", type=int, default=None, help="units counted per variant (5000; 20000 priced)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="units before counting")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}"
    )
    parser.add_argument(
        "--price-list", action="store_true", help="the building blocks, on a no-op coroutine"
    )
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    parser.add_argument(
        "--seeds", type=int, default=3, help="hash seeds (memory layouts) per variant: 0, 1, ..."
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    url = args.pg_url or pg_url_from_env()
    units = args.units if args.units is not None else 20000 if args.price_list else 5000
    if args.child is not None:
        asyncio.run(child(args.child, args.warmup, units, url))
        return
    if args.price_list:
        variants = list(PRICES)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants or set(variants) - set(VARIANTS):
            parser.error(f"--variants: each of {VARIANTS}; got {args.variants!r}")
    if units < 1 or args.warmup < 1 or args.seeds < 1:
        parser.error("--units, --warmup and --seeds must be at least 1")
    if shutil.which("valgrind") is None:
        parser.error("valgrind not found: install it (Debian: apt-get install valgrind)")
    seeds = range(args.seeds)
    per_unit, path = measure(variants, warmup=args.warmup, units=units, url=url, seeds=seeds)

    def table(counts: dict[str, list[float]]) -> tuple[str, list[dict[str, Any]]]:
        if args.price_list:
            return report({PRICES[k]: v for k, v in counts.items()}, PRICES["noop"], "no-op", 56)
        return report(counts)

    text, rows = table(per_unit)
    path_text, path_rows = table(path)
    if args.price_list:
        print("one call, no database: client instructions")
    else:
        print("connect, SELECT 1, release (PostgreSQL, asyncpg), tracing off: client instructions")
    print(text)
    print("\nthe same, type-cache misses left out (the path's length: compare revisions by it)")
    print(path_text)
    payload = {
        "versions": versions("sqlalchemy", "asyncpg"),
        "price_list": args.price_list,
        "units": units,
        "warmup": args.warmup,
        "seeds": list(seeds),
        "rows": rows,
        "rows_without_type_cache_misses": path_rows,
    }
    written = write_json("instructions", payload, None if args.out is None else Path(args.out))
    print(f"\nwritten: {written}")


if __name__ == "__main__":
    main()
