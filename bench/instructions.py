"""Figure 1's unit counted in CPU instructions: a figure the neighbours cannot move.

    python -m bench.instructions [--units N] [--warmup N] [--variants a,b] [--pg-url URL]
    python -m bench.instructions --price-list [--units N]

Timed ratios on a shared two-core machine move by ±0.03 from run to run, and by
more when the host steals time; the number of instructions the client executes for
a unit does not. Each variant's unit (connect, ``SELECT 1``, release on PostgreSQL,
tracing off) runs in a child process under ``valgrind --tool=callgrind``, twice:
``warmup`` units and then ``units`` more, and ``warmup`` units alone. The difference
divided by ``units`` is the unit's cost in instructions, with the import, the
warm-up and the shutdown taken out. Children run with ``PYTHONHASHSEED=0``: a
random hash seed alone moves a total by thousands of instructions per unit.

What it counts is the client process's user-space instructions: not the server's
work, not the kernel's, not cache misses. A client-instruction ratio over raw is
therefore an upper bound on the wall-time ratio of a unit whose time is not all the
client's. As in the timed figures, "raw" runs with resilient-db's SQLAlchemy
listeners removed. The rest of the noise is the event loop's: how many iterations a
round trip takes depends on when the server answers (about ±1,000 instructions per
unit over 5,000 units).

``--price-list`` counts instead what the interpreter charges for the building
blocks of a guarded call, on a coroutine that does nothing (no database): a
coroutine layer, a context variable set and reset, the call's two scope objects,
then ``@resilient`` with less and less left out. Each row is the cost of one call,
the no-op coroutine's own included.

Needs valgrind (Debian's package ``valgrind``); a run of 5,000 units per variant
takes a few minutes, two children at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
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
        for _ in range(warmup + units):
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
        for _ in range(warmup + units):
            await unit()
    finally:
        await engine.dispose()


def callgrind(command: Sequence[str], out: Path) -> int:
    """Run ``command`` under callgrind (``PYTHONHASHSEED=0``); the instructions it
    counted for the whole process."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
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


def instructions(variant: str, warmup: int, units: int, url: str, directory: Path) -> int:
    """Instructions of a child process running ``warmup + units`` of ``variant``'s units."""
    child = [sys.executable, "-m", "bench.instructions", "--child", variant]
    options = ["--warmup", str(warmup), "--units", str(units), "--pg-url", url]
    out = directory / f"{[*VARIANTS, *PRICES].index(variant)}-{units}.out"
    return callgrind([*child, *options], out)


def measure(variants: Sequence[str], *, warmup: int, units: int, url: str) -> dict[str, float]:
    """Instructions per unit of each variant."""
    with tempfile.TemporaryDirectory() as name, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        directory = Path(name)
        runs = {
            (variant, n): pool.submit(instructions, variant, warmup, n, url, directory)
            for variant in variants
            for n in (0, units)
        }
        totals = {key: future.result() for key, future in runs.items()}
    return {v: (totals[(v, units)] - totals[(v, 0)]) / units for v in variants}


def report(
    per_unit: dict[str, float], baseline: str = "raw", short: str = "raw", width: int = 16
) -> tuple[str, list[dict[str, Any]]]:
    """A table of ``per_unit``, each row over and × the ``baseline`` row (``short``)."""
    raw = per_unit.get(baseline)
    lines = [
        f"{'variant':<{width}}  {'instructions/unit':>17}  {'over ' + short:>11}  {'× ' + short:>8}"
    ]
    rows: list[dict[str, Any]] = []
    for variant, count in per_unit.items():
        over = None if raw is None else count - raw
        ratio = None if raw is None else count / raw
        rows.append({"variant": variant, "per_unit": count, "over_raw": over, "ratio": ratio})
        lines.append(
            f"{variant:<{width}}  {count:>17,.0f}  "
            + ("" if over is None or ratio is None else f"{over:>+11,.0f}  {ratio:>8.3f}")
        )
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
    if units < 1 or args.warmup < 1:
        parser.error("--units and --warmup must be at least 1")
    if shutil.which("valgrind") is None:
        parser.error("valgrind not found: install it (Debian: apt-get install valgrind)")
    per_unit = measure(variants, warmup=args.warmup, units=units, url=url)
    if args.price_list:
        text, rows = report(
            {PRICES[k]: v for k, v in per_unit.items()}, PRICES["noop"], "no-op", 56
        )
        print("one call, no database: client instructions")
    else:
        text, rows = report(per_unit)
        print("connect, SELECT 1, release (PostgreSQL, asyncpg), tracing off: client instructions")
    print(text)
    payload = {
        "versions": versions("sqlalchemy", "asyncpg"),
        "price_list": args.price_list,
        "units": units,
        "warmup": args.warmup,
        "rows": rows,
    }
    path = write_json("instructions", payload, None if args.out is None else Path(args.out))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
