"""Figure 5 — recovery: how soon callers succeed again once the database is back.

One :class:`ChaosProxy` in front of PostgreSQL. Paced callers (one request every
``interval`` each) run through three phases: healthy (the baseline throughput is
measured here), a full outage (``proxy.disable()``), and after ``proxy.enable()``.
Successes are timed at completion; the report gives, from the moment the database
is back, the time to the first success and the time until the successes over a
sliding window reach 95 % of the baseline rate, plus the timeline.

The breakers (ours and aiobreaker) use a reset timeout of ``reset`` seconds — 2 s
here instead of the 10 s defaults, to keep the run short; the bound to check is
"first success ≤ reset timeout + 500 ms", whatever the reset timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._context import Context, host_port
from bench._harness import Figure, Op, Table, Target, paced
from bench._svg import Lines
from bench._variants import (
    Spec,
    engine_unit,
    glued_breaker,
    hand_glued,
    raw_unit,
    stamina_retry,
)
from resilient_db import CircuitBreaker, ResilientEngine, resilient
from resilient_db.chaos import ChaosProxy

MARGIN_S = 0.5
OURS = ("@resilient", "ResilientEngine")


def specs(reset: float) -> list[Spec]:
    def decorated(engine: AsyncEngine) -> Op:
        breaker = CircuitBreaker("bench-recovery-decorator", reset_timeout=reset)
        return resilient(timeout=2, retries=3, breaker=breaker)(raw_unit(engine))

    def through_engine(engine: AsyncEngine) -> Op:
        breaker = CircuitBreaker("bench-recovery-engine", reset_timeout=reset)
        return engine_unit(ResilientEngine(engine, timeout=2, retries=3, breaker=breaker))

    return [
        Spec("no retry (raw engine)", raw_unit),
        Spec("tenacity alone", lambda e: hand_glued(raw_unit(e), breaker=None)),
        Spec(
            "hand-glued (tenacity + aiobreaker)",
            lambda e: hand_glued(raw_unit(e), breaker=glued_breaker(reset=reset)),
        ),
        Spec("stamina", lambda e: stamina_retry(raw_unit(e))),
        Spec(OURS[0], decorated),
        Spec(OURS[1], through_engine),
    ]


async def timeline(
    op: Op,
    proxy: ChaosProxy,
    *,
    callers: int,
    interval: float,
    healthy: float,
    outage: float,
    after: float,
) -> dict[str, Any]:
    """Run the three phases; success completion times relative to the database's return."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + healthy + outage + after
    successes: list[float] = []
    failures = 0
    marks: dict[str, float] = {}

    def note(exc: Exception | None) -> None:
        nonlocal failures
        if exc is None:
            successes.append(loop.time())
        else:
            failures += 1

    async def operator() -> None:
        await asyncio.sleep(healthy)
        proxy.disable()
        marks["down"] = loop.time()
        await asyncio.sleep(outage)
        proxy.enable()
        marks["up"] = loop.time()

    try:
        await asyncio.gather(
            operator(),
            paced(op, callers=callers, interval=interval, start=start, end=end, on_result=note),
        )
    finally:
        proxy.enable()
    up, down = marks["up"], marks["down"]
    warm = min(0.5, healthy / 2)
    baseline = sum(1 for t in successes if start + warm <= t < down) / (down - start - warm)
    return {
        "relative": sorted(t - up for t in successes),
        "baseline_per_s": baseline,
        "outage_s": up - down,
        "healthy_s": down - start,
        "after_s": end - up,
        "failures": failures,
    }


def recovery_times(
    relative: list[float], baseline: float, window: float
) -> tuple[float | None, float | None]:
    """The first success after 0, and the start of the first ``window`` (after 0) whose
    successes reach 95 % of the baseline rate."""
    after = [t for t in relative if t >= 0]
    first = after[0] if after else None
    need = 0.95 * baseline * window
    left = 0
    for right, t in enumerate(after):
        while after[left] <= t - window:
            left += 1
        if t >= window and right - left + 1 >= need:
            return first, t - window
    return first, None


def buckets(relative: list[float], lo: float, hi: float, width: float) -> list[tuple[float, float]]:
    count = max(1, round((hi - lo) / width))
    tally = [0] * count
    for t in relative:
        i = int((t - lo) / width)
        if 0 <= i < count:
            tally[i] += 1
    return [(round(lo + (i + 0.5) * width, 3), n / width) for i, n in enumerate(tally)]


async def figure(ctx: Context) -> Figure:
    callers = ctx.scale(40, 8)
    interval = 0.1
    healthy, outage, after = ctx.seconds(3.0, 0.3), ctx.seconds(5.0, 0.4), ctx.seconds(8.0, 0.8)
    reset = ctx.seconds(2.0, 0.2)
    window = ctx.seconds(0.5, 0.2)
    bucket = 0.1
    rows: list[dict[str, Any]] = []
    series: list[tuple[str, list[tuple[float, float]]]] = []
    async with ChaosProxy(host_port(ctx.pg_url), name="bench-recovery") as proxy:
        url = proxy.proxied_url(ctx.pg_url)
        for spec in specs(reset):
            engine = create_async_engine(url)
            try:
                op = spec.build(engine)
                for _ in range(5):
                    await op()
                result = await timeline(
                    op,
                    proxy,
                    callers=callers,
                    interval=interval,
                    healthy=healthy,
                    outage=outage,
                    after=after,
                )
            finally:
                await engine.dispose()
            first, full = recovery_times(result["relative"], result["baseline_per_s"], window)
            rows.append(
                {
                    "variant": spec.name,
                    "baseline_per_s": result["baseline_per_s"],
                    "first_success_s": first,
                    "to_95_percent_s": full,
                    "outage_s": result["outage_s"],
                    "failures": result["failures"],
                    "successes": len(result["relative"]),
                }
            )
            lo = -(result["outage_s"] + min(1.0, result["healthy_s"]))
            series.append((spec.name, buckets(result["relative"], lo, result["after_s"], bucket)))

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.3f}"

    table = Table(
        f"Database back after a {outage:g} s outage: {callers} callers × one request per "
        f"{interval * 1e3:.0f} ms; breaker reset timeout {reset:g} s",
        ["variant", "baseline ok/s", "first success s", "to 95 % s", "failures"],
        [
            [
                r["variant"],
                f"{r['baseline_per_s']:.0f}",
                seconds(r["first_success_s"]),
                seconds(r["to_95_percent_s"]),
                str(r["failures"]),
            ]
            for r in rows
        ],
    )
    by_name = {r["variant"]: r for r in rows}
    return Figure(
        key="recovery",
        title="5. Recovery after an outage",
        tables=[table],
        data={
            "callers": callers,
            "interval_s": interval,
            "healthy_s": healthy,
            "outage_s": outage,
            "after_s": after,
            "reset_timeout_s": reset,
            "window_s": window,
            "rows": rows,
            "timeline_bucket_s": bucket,
            "timeline": dict(series),
        },
        targets=[
            Target.at_most(
                f"{name}: first success after the database is back",
                by_name[name]["first_success_s"],
                reset + MARGIN_S,
                "s",
                f"breaker reset timeout {reset:g} s + {MARGIN_S:g} s",
            )
            for name in OURS
        ],
        panels=[
            Lines(
                title=f"5. Recovery: successful calls per second (reset timeout {reset:g} s)",
                x_label="seconds since the database came back",
                y_label="successes/s",
                series=series,
                bands=[(-outage, 0.0, "outage")],
                marks=[(reset, f"reset timeout {reset:g} s")],
            )
        ],
    )
