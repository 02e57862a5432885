"""Interleaved measurement: every variant runs in every round, in rotating order.

Absolute times on a shared two-core machine drift by tens of percent within a
minute; a ratio taken inside one round (same minute, same noise) does not. So each
round times every variant back to back, and we report the median over rounds of
each variant's per-operation time *and* of its ratio to the baseline in that round.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

Op = Callable[[], Awaitable[Any]]

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    variant: str
    median_us: float
    ratio: float
    """Median over rounds of (variant time / baseline time) in the same round."""
    rounds: int
    ops_per_round: int
    per_round_us: list[float] = field(default_factory=list)


async def interleave(
    variants: Mapping[str, Op],
    *,
    baseline: str,
    rounds: int,
    ops: int,
    warmup: int = 200,
    prepare: Mapping[str, Callable[[], None]] | None = None,
) -> list[Row]:
    """Time ``ops`` calls of each variant per round, rotating the order every round.

    ``prepare[name]()``, when given, runs (untimed) before each of that variant's rounds.
    """
    names = list(variants)
    prepare = prepare or {}
    for name in names:
        if name in prepare:
            prepare[name]()
        for _ in range(warmup):
            await variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in prepare:
                prepare[name]()
            op = variants[name]
            start = time.perf_counter()
            for _ in range(ops):
                await op()
            times[name].append((time.perf_counter() - start) / ops * 1e6)
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[baseline], strict=True)]
        rows.append(
            Row(
                variant=name,
                median_us=statistics.median(times[name]),
                ratio=statistics.median(ratios),
                rounds=rounds,
                ops_per_round=ops,
                per_round_us=[round(t, 2) for t in times[name]],
            )
        )
    return rows


def table(title: str, rows: list[Row], baseline: str) -> str:
    width = max(len(r.variant) for r in rows)
    lines = [title, f"{'variant':<{width}}  {'median µs/op':>12}  {'× ' + baseline:>12}"]
    for row in rows:
        lines.append(f"{row.variant:<{width}}  {row.median_us:>12.1f}  {row.ratio:>12.3f}")
    return "\n".join(lines)


def versions(*packages: str) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def write_json(name: str, payload: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(data, indent=2, default=_default))
    return path


def _default(value: object) -> object:
    if isinstance(value, Row):
        return asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
