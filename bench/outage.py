"""Figure 4 — how much load retries put on a database that is down.

Two proxies in a row: the client connects to a passthrough **witness**
:class:`ChaosProxy`, which forwards to an **outage** proxy in front of PostgreSQL.
After a few healthy calls, ``outage.disable()`` closes every connection and refuses
new ones (a full outage). Then ``callers`` concurrent callers each issue one
request every ``interval`` seconds for ``duration`` seconds (missed ticks are
skipped, never bunched), and every request in flight is allowed to finish.

The witness counts what reaches the database's address: every connection attempt
is a connection it accepts. Statements sent on pooled connections are counted
with SQLAlchemy's ``before_cursor_execute``, and SQLAlchemy's ``do_connect``
(every driver connection attempt) cross-checks the witness. Attempts per caller
request are compared with "no retry at all" (one attempt per request).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._context import Context, host_port
from bench._harness import Figure, Op, Table, Target, paced
from bench._svg import Bars
from bench._variants import (
    ConnectCounter,
    Spec,
    engine_unit,
    glued_breaker,
    hand_glued,
    raw_unit,
    stamina_retry,
)
from resilient_db import CircuitBreaker, ResilientEngine, resilient
from resilient_db.chaos import ChaosProxy

TARGET_RATIO = 1.25
NO_RETRY = "no retry (raw engine)"
OURS = ("@resilient (budget + breaker)", "ResilientEngine (budget + breaker)")


def specs() -> list[Spec]:
    def decorated(engine: AsyncEngine) -> Op:
        breaker = CircuitBreaker("bench-outage-decorator")
        return resilient(timeout=2, retries=3, breaker=breaker)(raw_unit(engine))

    def budget_only(engine: AsyncEngine) -> Op:
        return resilient(timeout=2, retries=3, breaker=False)(raw_unit(engine))

    def through_engine(engine: AsyncEngine) -> Op:
        breaker = CircuitBreaker("bench-outage-engine")
        return engine_unit(ResilientEngine(engine, timeout=2, retries=3, breaker=breaker))

    return [
        Spec(NO_RETRY, raw_unit),
        Spec("tenacity alone (4 attempts)", lambda e: hand_glued(raw_unit(e), breaker=None)),
        Spec(
            "hand-glued (tenacity + aiobreaker)",
            lambda e: hand_glued(raw_unit(e), breaker=glued_breaker()),
        ),
        Spec("stamina (4 attempts)", lambda e: stamina_retry(raw_unit(e))),
        Spec(OURS[0], decorated),
        Spec("@resilient, budget only (breaker=False)", budget_only),
        Spec(OURS[1], through_engine),
    ]


async def load(op: Op, *, callers: int, duration: float, interval: float) -> dict[str, Any]:
    """``callers`` paced callers for ``duration`` s; requests in flight finish."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcomes: Counter[str] = Counter()

    def count(exc: Exception | None) -> None:
        outcomes["success" if exc is None else type(exc).__name__] += 1

    await paced(
        op,
        callers=callers,
        interval=interval,
        start=started,
        end=started + duration,
        on_result=count,
    )
    return {
        "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "seconds": loop.time() - started,
    }


async def _one(
    spec: Spec,
    url: str,
    outage: ChaosProxy,
    witness: ChaosProxy,
    *,
    callers: int,
    duration: float,
    interval: float,
) -> dict[str, Any]:
    engine = create_async_engine(url)
    counter = ConnectCounter(engine)
    try:
        op = spec.build(engine)
        for _ in range(5):  # healthy: the pool holds a connection
            await op()
        outage.disable()
        before, events = witness.stats(), counter.snapshot()
        result = await load(op, callers=callers, duration=duration, interval=interval)
        after, events_after = witness.stats(), counter.snapshot()
    finally:
        outage.enable()
        counter.close()
        await engine.dispose()
    connections = after.connections_accepted - before.connections_accepted
    statements = events_after["statements"] - events["statements"]
    attempts = connections + statements
    requests = max(1, result["requests"])
    return {
        "variant": spec.name,
        "requests": result["requests"],
        "witness_connections": connections,
        "witness_bytes_to_database": after.bytes_upstream - before.bytes_upstream,
        "sqlalchemy_connect_attempts": events_after["connects"] - events["connects"],
        "statements": statements,
        "attempts": attempts,
        "attempts_per_request": attempts / requests,
        "attempts_per_second": attempts / result["seconds"],
        "outcomes": result["outcomes"],
        "seconds": result["seconds"],
    }


async def figure(ctx: Context) -> Figure:
    callers = ctx.scale(100, 10)
    duration = ctx.seconds(10.0, 0.3)
    interval = 0.1
    rows: list[dict[str, Any]] = []
    async with ChaosProxy(host_port(ctx.pg_url), name="bench-outage") as outage:
        # The witness forwards to the outage proxy: it sees every connection attempt.
        witness = ChaosProxy(outage.listen, name="bench-witness", postgres=False)
        async with witness:
            url = witness.proxied_url(ctx.pg_url)
            for spec in specs():
                rows.append(
                    await _one(
                        spec,
                        url,
                        outage,
                        witness,
                        callers=callers,
                        duration=duration,
                        interval=interval,
                    )
                )
    base = next(r for r in rows if r["variant"] == NO_RETRY)["attempts_per_request"] or 1.0
    for row in rows:
        row["ratio_to_no_retry"] = row["attempts_per_request"] / base
    table = Table(
        f"Full outage, {callers} callers × {duration:g} s, one request per caller every "
        f"{interval * 1e3:.0f} ms",
        [
            "variant",
            "requests",
            "attempts",
            "witness conns",
            "do_connect",
            "attempts/request",
            "× no retry",
            "attempts/s",
        ],
        [
            [
                r["variant"],
                str(r["requests"]),
                str(r["attempts"]),
                str(r["witness_connections"]),
                str(r["sqlalchemy_connect_attempts"]),
                f"{r['attempts_per_request']:.3f}",
                f"{r['ratio_to_no_retry']:.3f}",
                f"{r['attempts_per_second']:.0f}",
            ]
            for r in rows
        ],
    )
    ratio = {r["variant"]: r["ratio_to_no_retry"] for r in rows}
    return Figure(
        key="outage",
        title="4. Retry load during a full outage",
        tables=[table],
        data={"callers": callers, "duration_s": duration, "interval_s": interval, "rows": rows},
        targets=[
            Target.at_most(f"{name}: attempts per request", ratio[name], TARGET_RATIO, "× no retry")
            for name in OURS
        ],
        panels=[
            Bars(
                title="4. Attempts reaching the database per caller request, × no retry",
                unit="× attempts of no retry",
                bars=[(r["variant"], r["ratio_to_no_retry"]) for r in rows],
                targets=[(TARGET_RATIO, "1.25")],
                value_format="{:.3f}",
            )
        ],
    )
