"""What the chaos proxy adds to one database round trip, at about 1k operations/s.

Runs ``SELECT 1`` (a prepared statement: one round trip each) on two asyncpg
connections to the same server, one direct and one through a
:class:`~resilient_db.chaos.proxy.ChaosProxy` with no toxics, in interleaved
rounds (direct, proxied, direct, ...) so that drifts of a noisy machine hit both
alike. Each round paces its operations at ``--rate`` per second and takes the
median (p50) and p99 round trip; the report gives the median of those over the
rounds, and the difference: the proxy's overhead per round trip.

Run from the repository root::

    python -m bench.proxy_overhead            # or: python bench/proxy_overhead.py
    python -m bench.proxy_overhead --rounds 20 --ops 1000 --rate 1000

The server comes from ``RESILIENT_TEST_PG_URL`` (as for the tests), default
``postgresql://postgres@127.0.0.1:5432/postgres``. A table is printed and the
numbers are written as JSON to ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._context import Context, asyncpg_dsn, host_port
from bench._harness import Figure, Table, percentile, versions, write_json
from bench._svg import Bars
from resilient_db.chaos.proxy import ChaosProxy

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _dsn() -> str:
    url = os.environ.get("RESILIENT_TEST_PG_URL", DEFAULT_URL)
    _scheme, sep, rest = url.partition("://")
    return "postgresql://" + rest if sep else url  # drop "+asyncpg" and friends


async def _round(conn: Any, ops: int, rate: float) -> list[float]:
    """``ops`` round trips paced at ``rate`` per second; their durations in seconds."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    durations: list[float] = []
    next_at = loop.time()
    for _ in range(ops):
        start = time.perf_counter()
        await conn.fetchval("SELECT 1")
        durations.append(time.perf_counter() - start)
        next_at += interval
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return durations


async def measure(dsn: str, *, rounds: int, ops: int, rate: float) -> dict[str, Any]:
    """Interleave direct and proxied rounds; return per-round p50/p99 and their medians."""
    async with ChaosProxy(host_port(dsn), name="bench") as proxy:
        direct = await asyncpg.connect(dsn)
        proxied = await asyncpg.connect(proxy.proxied_url(dsn))
        try:
            for conn in (direct, proxied):  # warm up: prepare, fill caches
                await _round(conn, min(ops, 200), rate)
            per_round: dict[str, list[dict[str, float]]] = {"direct": [], "proxied": []}
            for index in range(rounds):
                order = [("direct", direct), ("proxied", proxied)]
                if index % 2:
                    order.reverse()
                for label, conn in order:
                    durations = await _round(conn, ops, rate)
                    per_round[label].append(
                        {
                            "p50_us": statistics.median(durations) * 1e6,
                            "p99_us": percentile(durations, 0.99) * 1e6,
                        }
                    )
        finally:
            await direct.close()
            await proxied.close()
        stats = proxy.stats()
    summary = {
        label: {
            "p50_us": statistics.median(r["p50_us"] for r in results),
            "p99_us": statistics.median(r["p99_us"] for r in results),
        }
        for label, results in per_round.items()
    }
    return {
        "rounds": rounds,
        "ops_per_round": ops,
        "rate_per_s": rate,
        "per_round": per_round,
        "summary": summary,
        "added_p50_us": summary["proxied"]["p50_us"] - summary["direct"]["p50_us"],
        "added_p99_us": summary["proxied"]["p99_us"] - summary["direct"]["p99_us"],
        "proxy_bytes": {"up": stats.bytes_upstream, "down": stats.bytes_downstream},
    }


async def figure(ctx: Context) -> Figure:
    """The proxy's added latency, as part of ``python -m bench``."""
    rounds, ops = ctx.scale(10, 2), ctx.scale(500, 50)
    result = await measure(asyncpg_dsn(ctx.pg_url), rounds=rounds, ops=ops, rate=1000.0)
    summary = result["summary"]
    table = Table(
        f"ChaosProxy (no toxics) vs direct asyncpg, {rounds} interleaved rounds × {ops} "
        "SELECT 1 at 1000/s",
        ["path", "p50 µs", "p99 µs"],
        [
            [label, f"{summary[label]['p50_us']:.1f}", f"{summary[label]['p99_us']:.1f}"]
            for label in ("direct", "proxied")
        ]
        + [["added", f"{result['added_p50_us']:.1f}", f"{result['added_p99_us']:.1f}"]],
    )
    return Figure(
        key="proxy",
        title="7. The chaos proxy's added latency (for scale)",
        tables=[table],
        data=result,
        panels=[
            Bars(
                title="7. The chaos proxy: p50 round trip, direct vs proxied (µs)",
                unit="µs per round trip (p50)",
                bars=[
                    ("raw direct asyncpg", summary["direct"]["p50_us"]),
                    ("through ChaosProxy", summary["proxied"]["p50_us"]),
                ],
                value_format="{:.0f}",
            )
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per path (default 10)")
    parser.add_argument("--ops", type=int, default=500, help="round trips per round (500)")
    parser.add_argument("--rate", type=float, default=1000.0, help="target ops/s (1000)")
    parser.add_argument("--dsn", default=_dsn(), help="PostgreSQL DSN (default: as the tests)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.ops < 1 or args.rate <= 0:
        parser.error("--rounds and --ops must be >= 1, --rate > 0")

    result = asyncio.run(measure(args.dsn, rounds=args.rounds, ops=args.ops, rate=args.rate))
    summary = result["summary"]
    print(f"proxy overhead: {args.rounds} interleaved rounds x {args.ops} ops at {args.rate:g}/s")
    print(f"{'path':<10}{'p50 (µs)':>12}{'p99 (µs)':>12}")
    for label in ("direct", "proxied"):
        print(f"{label:<10}{summary[label]['p50_us']:>12.1f}{summary[label]['p99_us']:>12.1f}")
    print(f"{'added':<10}{result['added_p50_us']:>12.1f}{result['added_p99_us']:>12.1f}")

    path = write_json("proxy_overhead", {"versions": versions("asyncpg"), **result})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
