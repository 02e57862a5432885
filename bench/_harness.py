"""Interleaved measurement: every variant runs in every round, in rotating order.

Absolute times on a shared two-core machine drift by tens of percent within a
minute; a ratio taken inside one round (same minute, same noise) does not. So each
round times every variant back to back, and we report the median over rounds of
each variant's per-operation time *and* of its ratio to the baseline in that round.

Each block is timed twice: wall time (``perf_counter``: what a caller waits) and
the process's CPU time (``process_time``: what the client side spends, threads
included). The CPU ratio is much less disturbed by the database server and by
other tenants competing for the cores; the wall ratio is the one users feel.

Also here: what every figure hands back (:class:`Figure`, :class:`Target`), plain
text tables, and the JSON writer. Durations are measured with ``perf_counter``
(monotonic), never with wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

Op = Callable[[], Awaitable[Any]]

RESULTS = Path(__file__).parent / "results"

PACKAGES = (
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "tenacity",
    "aiobreaker",
    "stamina",
    "opentelemetry-api",
    "opentelemetry-sdk",
)


@dataclass
class Row:
    variant: str
    median_us: float
    ratio: float
    """Median over rounds of (variant time / baseline time) in the same round."""
    rounds: int
    ops_per_round: int
    per_round_us: list[float] = field(default_factory=list)
    cpu_median_us: float = 0.0
    """Median over rounds of the client process's CPU time per operation."""
    cpu_ratio: float = 1.0
    """Median over rounds of (variant CPU time / baseline CPU time) in the same round."""
    per_round_cpu_us: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Figure-specific facts about the variant (spans per op, statements per op...)."""


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
    if rounds < 1 or ops < 1:
        raise ValueError(f"rounds and ops must be >= 1; got rounds={rounds}, ops={ops}")
    names = list(variants)
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {names}")
    prepare = prepare or {}
    for name in names:
        if name in prepare:
            prepare[name]()
        for _ in range(warmup):
            await variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in prepare:
                prepare[name]()
            op = variants[name]
            cpu_start = time.process_time()
            start = time.perf_counter()
            for _ in range(ops):
                await op()
            times[name].append((time.perf_counter() - start) / ops * 1e6)
            cpu[name].append((time.process_time() - cpu_start) / ops * 1e6)
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[baseline], strict=True)]
        cpu_ratios = [t / b for t, b in zip(cpu[name], cpu[baseline], strict=True) if b > 0]
        rows.append(
            Row(
                variant=name,
                median_us=statistics.median(times[name]),
                ratio=statistics.median(ratios),
                rounds=rounds,
                ops_per_round=ops,
                per_round_us=[round(t, 2) for t in times[name]],
                cpu_median_us=statistics.median(cpu[name]),
                cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                per_round_cpu_us=[round(t, 2) for t in cpu[name]],
            )
        )
    return rows


async def paced(
    op: Op,
    *,
    callers: int,
    interval: float,
    start: float,
    end: float,
    on_result: Callable[[Exception | None], None],
) -> None:
    """``callers`` callers, each calling ``op`` once per ``interval`` seconds of loop time
    from ``start`` (their first calls spread over one interval) until ``end``; a caller
    that falls behind skips the ticks it missed; calls in flight finish. ``on_result``
    gets each call's exception, or ``None`` when it succeeded."""
    loop = asyncio.get_running_loop()

    async def caller(index: int) -> None:
        next_at = start + interval * index / callers
        while True:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() >= end:
                return
            try:
                await op()
            except Exception as exc:
                on_result(exc)
            else:
                on_result(None)
            next_at = max(next_at + interval, loop.time())

    await asyncio.gather(*(caller(i) for i in range(callers)))


def ratio_between(
    rows: Sequence[Row], numerator: str, denominator: str, *, cpu: bool = False
) -> float:
    """Median over rounds of ``numerator / denominator`` (both timed in each round)."""
    by_name = {row.variant: row for row in rows}
    top, bottom = by_name[numerator], by_name[denominator]
    if cpu:
        pairs = zip(top.per_round_cpu_us, bottom.per_round_cpu_us, strict=True)
    else:
        pairs = zip(top.per_round_us, bottom.per_round_us, strict=True)
    return statistics.median(t / b for t, b in pairs if b > 0)


def difference_between(rows: Sequence[Row], minuend: str, subtrahend: str) -> float:
    """Median over rounds of ``minuend - subtrahend`` in µs per operation."""
    by_name = {row.variant: row for row in rows}
    top, bottom = by_name[minuend].per_round_us, by_name[subtrahend].per_round_us
    return statistics.median(t - b for t, b in zip(top, bottom, strict=True))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1])."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def render(title: str, header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A plain text table; the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in header]
    for line in body:
        for i, cell in enumerate(line):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = [title, fmt(header), fmt(["-" * w for w in widths])]
    lines.extend(fmt(line) for line in body)
    return "\n".join(lines)


@dataclass
class Table:
    """A figure's table: printed as text, and rendered as Markdown for the docs."""

    title: str
    header: list[str]
    body: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([render(self.title, self.header, self.body), *self.notes])

    def markdown(self) -> str:
        def row(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

        align = ["---"] + ["---:"] * (len(self.header) - 1)
        lines = [f"**{self.title}**", "", row(self.header), row(align)]
        lines.extend(row(cells) for cells in self.body)
        lines.extend(["", *self.notes] if self.notes else [])
        return "\n".join(lines)


@dataclass
class Target:
    """A goal from the issue, with what this run measured."""

    what: str
    measured: float | None
    limit: float
    unit: str
    met: bool | None
    """``None`` when the run could not measure it (see ``note``)."""
    note: str = ""

    @classmethod
    def at_most(
        cls, what: str, measured: float | None, limit: float, unit: str, note: str = ""
    ) -> Target:
        met = None if measured is None else measured <= limit
        return cls(what, measured, limit, unit, met, note)

    def line(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        value = "-" if self.measured is None else f"{self.measured:.3g}"
        note = f"  ({self.note})" if self.note else ""
        return f"{verdict:>12}  {self.what}: {value} {self.unit} (target ≤ {self.limit:g}){note}"


@dataclass
class Figure:
    """What one benchmark hands back: its table, its data, its targets, its panels."""

    key: str
    title: str
    tables: list[Table]
    data: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    panels: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "\n\n".join(table.text() for table in self.tables)


def versions(*packages: str) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            info["memory_kib"] = int(meminfo.readline().split()[1])
    except OSError:
        pass
    return info


def write_json(
    name: str, payload: Mapping[str, Any], out: Path | None = None, stamp: str | None = None
) -> Path:
    directory = RESULTS if out is None else out
    directory.mkdir(parents=True, exist_ok=True)
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{name}-{stamp}.json"
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(data, indent=2, default=_default))
    return path


def _default(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
