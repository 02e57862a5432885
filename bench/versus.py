"""Figure 1's unit through this checkout and through an earlier revision, in one process.

    python -m bench.versus REV [--rounds N] [--ops N] [--pg-url URL]

A timed ratio moves by ±0.02 from run to run on a shared machine, and with the
speed of the machine (a faster raw unit reads a larger ratio for the same added
microseconds), so a change is best judged against the code before it, side by
side: the package as it was at ``REV`` (``git archive``) is imported under another
name, and both versions' ``@resilient(timeout=2, retries=3)`` and
``ResilientEngine(engine, timeout=2, retries=3)`` run connect, ``SELECT 1``,
release on one PostgreSQL engine, interleaved with the raw unit (the harness's
median of per-round ratios, wall time and the client's CPU time).

Both versions' SQLAlchemy listeners are installed throughout (each wraps the
engine's dialect methods, and a wrapper outside its own guarded calls costs one
context-variable lookup): every row pays both, the raw row included, so the rows
compare with each other, not with figure 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from sqlalchemy.ext.asyncio import create_async_engine

from bench._context import pg_url_from_env
from bench._harness import Row, versions, write_json
from bench._otel import install
from bench._variants import Variant, engine_unit, raw_unit, run_interleaved
from bench.ablation import table
from resilient_db import ResilientEngine, resilient

ROOT = Path(__file__).resolve().parent.parent


def import_revision(rev: str, directory: Path) -> tuple[ModuleType, str]:
    """Import ``resilient_db`` as it was at ``rev`` (as ``resilient_db_<commit>``)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "resilient_db"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(directory, filter="data")
        else:  # pragma: no cover - our own archive
            tar.extractall(directory)
    name = f"resilient_db_{commit}"
    (directory / "resilient_db").rename(directory / name)
    sys.path.insert(0, str(directory))
    return importlib.import_module(name), commit


async def measure(url: str, rev: str, *, rounds: int, ops: int, warmup: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as directory:
        earlier, commit = import_revision(rev, Path(directory))
        engine = create_async_engine(url)
        telemetry = install()
        try:
            raw = raw_unit(engine)
            variants = [
                Variant("raw", raw, guarded=True),
                Variant(
                    f"@resilient at {commit}",
                    earlier.resilient(timeout=2, retries=3)(raw),
                    guarded=True,
                ),
                Variant("@resilient now", resilient(timeout=2, retries=3)(raw), guarded=True),
                Variant(
                    f"ResilientEngine at {commit}",
                    engine_unit(earlier.ResilientEngine(engine, timeout=2, retries=3)),
                    guarded=True,
                ),
                Variant(
                    "ResilientEngine now",
                    engine_unit(ResilientEngine(engine, timeout=2, retries=3)),
                    guarded=True,
                ),
            ]
            return await run_interleaved(
                telemetry,
                variants,
                baseline="raw",
                rounds=rounds,
                ops=ops,
                warmup=warmup,
                label="versus",
            )
        finally:
            telemetry.shutdown()
            await engine.dispose()


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("rev", help="the earlier revision (a commit, a tag, HEAD~3...)")
    parser.add_argument("--rounds", type=int, default=250)
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a few iterations only")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    rounds, ops, warmup = (2, 5, 5) if args.quick else (args.rounds, args.ops, 300)
    url = args.pg_url or pg_url_from_env()
    rows = await measure(url, args.rev, rounds=rounds, ops=ops, warmup=warmup)
    print("connect, SELECT 1, release (PostgreSQL, asyncpg), tracing off, both versions")
    print(table(rows))
    results = {"rev": args.rev, "rounds": rounds, "ops_per_round": ops, "rows": rows}
    out = None if args.out is None else Path(args.out)
    path = write_json("versus", {"versions": versions("sqlalchemy", "asyncpg"), **results}, out)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
