"""Figure 6 — memory over a million guarded calls: resident memory must stay flat.

Each variant runs in a fresh interpreter (``python -m bench.memory --child NAME``),
so that its peak RSS is its own: one million calls of a trivial coroutine (no
database; it yields to the event loop once, like any I/O) through
``@resilient(timeout=2, retries=3)``; half a million through the hand-glued stack
and through ``@resilient`` with the OpenTelemetry SDK on. Resident memory
(``/proc/self/statm``) is sampled every tenth of the run after a warm-up (another
tenth); the
report gives start, end, peak (``VmHWM``) and least-squares slopes in bytes per
call: over the whole run (the target), and over its second half. A leak of even
one small object per call grows at a constant rate, 50 bytes per call or more. The
SDK variant exports through a ``SimpleSpanProcessor`` (to an exporter that discards
the spans): a batch processor's queue of up to 2048 spans fills and drains with its
export thread's timing and moves RSS by a megabyte either way, which says nothing
about the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._context import Context
from bench._harness import Figure, Table, Target
from bench._svg import Lines

VARIANTS = ("@resilient", "@resilient + OTel SDK", "hand-glued")
CALLS = {"@resilient": 1_000_000, "@resilient + OTel SDK": 500_000, "hand-glued": 500_000}
"""Calls per variant in a full run: a million through ``@resilient``; fewer for the
comparisons (at two SDK spans per call, about 100 µs, a million would take minutes)."""
SLOPE_TARGET = 1.0
"""Bytes per call: a leak of even one small object per call would be 50+."""
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE // 1024


def peak_kib() -> int:
    """``VmHWM``: this process's peak RSS. Not ``ru_maxrss``, which Linux carries
    over ``exec`` from the parent — the benchmark process that spawned us."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of KiB over calls, in bytes per call."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / var * 1024


async def _child(variant: str, calls: int, every: int) -> dict[str, Any]:
    from bench._variants import glued_breaker, hand_glued
    from resilient_db import CircuitBreaker, resilient

    spans = 0
    exporter = None
    flush: Callable[[], object] | None = None
    if variant == "@resilient + OTel SDK":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        from bench._otel import DiscardingExporter
        from resilient_db import refresh_instrumentation

        class Count(SpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                nonlocal spans
                spans += 1

        # A simple (synchronous) processor: a batch processor's queue of up to 2048
        # spans fills and drains with the export thread's timing, moving RSS by a
        # megabyte either way; without a queue, what stays is what the library keeps.
        exporter = DiscardingExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.add_span_processor(Count())
        flush = provider.force_flush
        # As a user would: global providers, picked up by resilient-db's default hook.
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
        refresh_instrumentation()

    async def trivial() -> int:
        # Yield to the event loop once, as any real I/O does. A loop of calls that
        # never suspend runs within one event-loop step, and asyncio purges cancelled
        # timers only between steps: every per-attempt timeout (ours, or
        # asyncio.timeout in the hand-glued stack) would stay in the loop's heap until
        # the loop runs again, which measures asyncio, not the library.
        await asyncio.sleep(0)
        return 1

    if variant == "hand-glued":
        call = hand_glued(trivial, breaker=glued_breaker())
    else:
        call = resilient(timeout=2, retries=3, breaker=CircuitBreaker("bench-memory"))(trivial)
    # Warm-up, a tenth of the run: caches, free lists, the first arenas, and with the
    # SDK the batch processor's queue (2048 spans), which fills and then stays full.
    for _ in range(max(10_000, calls // 10)):
        await call()
    samples = [(0, rss_kib())]
    done = 0
    while done < calls:
        for _ in range(every):
            await call()
        done += every
        samples.append((done, rss_kib()))
    if flush is not None:
        flush()
    return {
        "variant": variant,
        "calls": done,
        "samples_kib": samples,
        "start_kib": samples[0][1],
        "end_kib": samples[-1][1],
        "peak_rss_kib": peak_kib(),
        "slope_bytes_per_call": slope(samples),
        "steady_slope_bytes_per_call": slope(samples[len(samples) // 2 :]),
        "spans_per_call": spans / max(1, done),
        "spans_exported": None if exporter is None else exporter.exported,
    }


ROOT = Path(__file__).resolve().parent.parent


async def _spawn(variant: str, calls: int, every: int) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.memory",
        "--child",
        variant,
        "--calls",
        str(calls),
        "--every",
        str(every),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"memory child {variant!r} failed:\n{err.decode()}")
    result: dict[str, Any] = json.loads(out)
    return result


async def figure(ctx: Context) -> Figure:
    rows = []
    for variant in VARIANTS:
        calls = ctx.scale(CALLS[variant], 10_000)
        rows.append(await _spawn(variant, calls, calls // 10))
    table = Table(
        "Calls of a trivial coroutine, resident memory sampled every tenth of the run",
        [
            "variant",
            "calls",
            "start KiB",
            "end KiB",
            "peak KiB",
            "slope B/call",
            "2nd half B/call",
            "spans/call",
        ],
        [
            [
                r["variant"],
                f"{r['calls']:,}",
                str(r["start_kib"]),
                str(r["end_kib"]),
                str(r["peak_rss_kib"]),
                f"{r['slope_bytes_per_call']:.4f}",
                f"{r['steady_slope_bytes_per_call']:.4f}",
                f"{r['spans_per_call']:g}",
            ]
            for r in rows
        ],
    )
    return Figure(
        key="memory",
        title="6. Memory over many guarded calls",
        tables=[table],
        data={"rows": rows},
        targets=[
            Target.at_most(
                f"{r['variant']}: RSS growth per call over {r['calls']:,} calls",
                r["slope_bytes_per_call"],
                SLOPE_TARGET,
                "bytes/call",
                f"second half {r['steady_slope_bytes_per_call']:.2f} B/call; "
                f"start {r['start_kib']} KiB, end {r['end_kib']} KiB, peak {r['peak_rss_kib']} KiB",
            )
            for r in rows
            if r["variant"].startswith("@resilient")
        ],
        panels=[
            Lines(
                title="6. Resident memory (MiB) over guarded calls",
                x_label="calls",
                y_label="RSS MiB",
                series=[(r["variant"], [(x, y / 1024) for x, y in r["samples_kib"]]) for r in rows],
            )
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--child", choices=VARIANTS, help="run one variant here, print JSON")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.every < 1:
        parser.error("--calls and --every must be >= 1")
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.calls, args.every))))
        return 0
    from bench._runner import run_single

    return asyncio.run(
        run_single(
            "memory", figure, quick=args.quick, pg_url=args.pg_url, out=args.out, need_pg=False
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
