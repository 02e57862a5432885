"""Run the benchmarks: ``python -m bench [--only overhead,rejection,...] [--quick] [--out DIR]``.

Figures (see docs/performance.md): overhead, transaction, rejection, deadline,
outage, recovery, memory, proxy. Every comparison interleaves its variants in one
process; a table is printed, and a JSON file and an SVG plot are written to
``--out`` (default ``bench/results/``, git-ignored). ``--quick`` runs each variant
for a few iterations only (the smoke test uses it): its numbers mean nothing.

PostgreSQL: ``--pg-url`` or ``RESILIENT_BENCH_PG_URL`` / ``RESILIENT_TEST_PG_URL``
(default ``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``); the user must
be allowed to create databases — the run creates its own and drops them.
"""

from __future__ import annotations

import argparse
import asyncio

from bench._runner import registry, run


def main(argv: list[str] | None = None) -> int:
    figures = registry()
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated figures to run, in report order (all: {','.join(figures)})",
    )
    parser.add_argument("--quick", action="store_true", help="a few iterations per variant")
    parser.add_argument("--out", default=None, help="directory for the JSON and SVG")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server URL (SQLAlchemy)")
    args = parser.parse_args(argv)
    chosen = [key.strip() for key in args.only.split(",") if key.strip()] or list(figures)
    unknown = [key for key in chosen if key not in figures]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(figures)}")
    selected = [(key, figures[key]) for key in figures if key in chosen]
    result = asyncio.run(run(selected, quick=args.quick, pg_url=args.pg_url, out=args.out))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
