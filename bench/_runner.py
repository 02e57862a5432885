"""Run figures, print their tables and targets, write one JSON and one SVG per run."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import _svg
from bench._context import Context, context, pg_url_from_env, server_version
from bench._harness import PACKAGES, RESULTS, Figure, machine, versions, write_json
from bench._otel import install
from resilient_db.testing import reset_breakers

FigureFn = Callable[[Context], Awaitable[Figure]]


def registry() -> dict[str, FigureFn]:
    """Every figure, in the order of the report."""
    from bench import (
        deadline,
        memory,
        outage,
        overhead,
        proxy_overhead,
        recovery,
        rejection,
        transaction,
    )

    return {
        "overhead": overhead.figure,
        "transaction": transaction.figure,
        "rejection": rejection.figure,
        "deadline": deadline.figure,
        "outage": outage.figure,
        "recovery": recovery.figure,
        "memory": memory.figure,
        "proxy": proxy_overhead.figure,
    }


async def run(
    figures: Sequence[tuple[str, FigureFn]],
    *,
    quick: bool,
    pg_url: str | None,
    out: str | Path | None,
    name: str = "bench",
    need_pg: bool = True,
) -> dict[str, Any]:
    """Run ``figures`` in order; print them; write ``<name>-<stamp>.json`` and ``.svg``."""
    admin_url = pg_url or pg_url_from_env()
    # Outages make stamina and resilient-db log every retry and breaker transition
    # (WARNING): expected here, and printing them would only slow the callers down.
    for logger in ("resilient_db", "stamina"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    telemetry = install()
    # Connections killed by the outages leave asyncpg futures whose ConnectionError
    # nobody awaits; asyncio would print each one. Count them for the report instead.
    loop_errors: Counter[str] = Counter()

    def count_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        what = context.get("message", "")
        loop_errors[f"{what}: {type(error).__name__}" if error else what] += 1

    asyncio.get_running_loop().set_exception_handler(count_loop_error)
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    done: list[Figure] = []
    failed: dict[str, str] = {}
    async with context(admin_url, quick=quick, telemetry=telemetry, need_pg=need_pg) as ctx:
        postgres = await server_version(ctx.pg_url) if need_pg else "not used"
        for key, fn in figures:
            reset_breakers()
            print(f"\n=== {key} ===", flush=True)
            t0 = time.perf_counter()
            try:
                figure = await fn(ctx)
            except Exception:
                # Keep the other figures: report this one as failed, exit non-zero.
                failed[key] = traceback.format_exc()
                print(f"FAILED: {key}\n{failed[key]}", flush=True)
                continue
            figure.seconds = round(time.perf_counter() - t0, 1)
            done.append(figure)
            print(figure.text)
            for target in figure.targets:
                print(target.line())
            print(f"({figure.seconds:.1f} s)", flush=True)
    telemetry.flush()
    metric_names = telemetry.metric_names()
    telemetry.shutdown()
    directory = Path(out) if out is not None else RESULTS
    payload: dict[str, Any] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "quick": quick,
        "versions": {**versions(*PACKAGES), "postgresql": postgres},
        "seconds": round(time.perf_counter() - started, 1),
        "figures": {
            f.key: {
                "title": f.title,
                "seconds": f.seconds,
                "targets": [asdict(t) for t in f.targets],
                "data": f.data,
                "table": f.text,
                "tables": [asdict(t) for t in f.tables],
            }
            for f in done
        },
        "failed": failed,
        "unhandled_loop_errors": dict(loop_errors),
        "telemetry": {
            "spans_by_name": dict(telemetry.span_names),
            "metric_names": metric_names,
        },
    }
    json_path = write_json(name, payload, directory, stamp)
    info = machine()
    heading = (
        f"resilient-db benchmarks, {datetime.now(UTC):%Y-%m-%d}: {info.get('cpus')} shared "
        f"cores ({info.get('cpu_model', info['processor'])}), Python "
        f"{payload['versions']['python']}, PostgreSQL {postgres.split()[0]}"
        + (" — QUICK MODE, numbers meaningless" if quick else "")
    )
    svg_path = directory / f"{name}-{stamp}.svg"
    svg_path.write_text(_svg.render([p for f in done for p in f.panels], heading=heading))
    print("\n=== targets ===")
    for figure in done:
        for target in figure.targets:
            print(target.line())
    print(f"\nwritten: {json_path}\nwritten: {svg_path}")
    print(f"total: {payload['seconds']:.0f} s")
    if failed:
        print(f"FAILED figures: {', '.join(failed)}")
    return {"json": json_path, "svg": svg_path, "payload": payload, "ok": not failed}


async def run_single(
    key: str,
    fn: FigureFn,
    *,
    quick: bool,
    pg_url: str | None,
    out: str | None,
    need_pg: bool = True,
) -> int:
    """The entry point of one figure's own module (``python -m bench.overhead``)."""
    result = await run([(key, fn)], quick=quick, pg_url=pg_url, out=out, name=key, need_pg=need_pg)
    return 0 if result["ok"] else 1
