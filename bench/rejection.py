"""Figure 2 — what a call costs when the breaker is open, and proof that nothing is sent.

The guarded variants use an engine whose every byte goes through a passthrough
:class:`~resilient_db.chaos.ChaosProxy` — the witness on the database side — and
SQLAlchemy's own ``do_connect``, pool ``checkout`` and ``before_cursor_execute``
events: over all the rejected calls, the proxy must see no connection and no byte,
and SQLAlchemy no connection attempt, checkout or statement.

A rejected call does no I/O, so its cost is the client's CPU time; the target is
judged on it (wall time, also reported, adds whatever other tenants of the shared
cores took meanwhile). Our breakers are tripped the way calls trip them (five
recorded failures; reset timeout one hour, so they stay open); aiobreaker's is
opened with ``open()``. Every rejected call is checked to raise the breaker's
error. The baseline is the same unit of work against a healthy database (direct
engine), for scale.
"""

from __future__ import annotations

from typing import Any

import aiobreaker
from sqlalchemy.ext.asyncio import create_async_engine

from bench._context import Context, host_port
from bench._harness import Figure, Op, Table, Target
from bench._svg import Bars
from bench._variants import (
    ConnectCounter,
    Variant,
    engine_unit,
    glued_breaker,
    hand_glued,
    in_span,
    raw_unit,
    run_interleaved,
)
from resilient_db import (
    BreakerOutcome,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    ResilientEngine,
    resilient,
)
from resilient_db.chaos import ChaosProxy

TARGET_US = 20.0


def tripped(name: str) -> CircuitBreaker:
    """A breaker opened by five failures, as calls would record them."""
    breaker = CircuitBreaker(name, failure_threshold=5, reset_timeout=3600)
    for _ in range(5):
        breaker.record(breaker.acquire(), BreakerOutcome.FAILURE, 0.001)
    if breaker.state is not BreakerState.OPEN:
        raise RuntimeError(f"breaker {name} did not open: {breaker.snapshot()}")
    return breaker


def rejected(op: Op, errors: tuple[type[BaseException], ...]) -> Op:
    async def call() -> None:
        try:
            await op()
        except errors:
            return
        raise AssertionError("an open breaker let a call through")

    return call


async def figure(ctx: Context) -> Figure:
    rounds, ops, warmup = ctx.scale(30, 2), ctx.scale(500, 50), ctx.scale(200, 5)
    direct = create_async_engine(ctx.pg_url)
    proxy = ChaosProxy(host_port(ctx.pg_url), name="bench-rejection")
    async with proxy:
        proxied = create_async_engine(proxy.proxied_url(ctx.pg_url))
        counter = ConnectCounter(proxied)
        unit = raw_unit(proxied)
        decorated = rejected(
            resilient(timeout=2, retries=3, breaker=tripped("bench-reject-decorator"))(unit),
            (CircuitOpenError,),
        )
        db = ResilientEngine(proxied, timeout=2, retries=3, breaker=tripped("bench-reject-engine"))
        through_engine = rejected(engine_unit(db), (CircuitOpenError,))
        open_glued = glued_breaker(reset=3600)
        open_glued.open()
        glued = rejected(hand_glued(unit, breaker=open_glued), (aiobreaker.CircuitBreakerError,))
        traced_glued = rejected(
            in_span(ctx.telemetry, hand_glued(unit, breaker=open_glued)),
            (aiobreaker.CircuitBreakerError,),
        )
        variants = [
            Variant("raw unit, database up (for scale)", raw_unit(direct), guarded=False),
            Variant("@resilient, breaker open", decorated, guarded=True),
            Variant("@resilient + OTel SDK, breaker open", decorated, guarded=True, otel=True),
            Variant("ResilientEngine, breaker open", through_engine, guarded=True),
            Variant(
                "ResilientEngine + OTel SDK, breaker open", through_engine, guarded=True, otel=True
            ),
            Variant("hand-glued, aiobreaker open", glued, guarded=False),
            Variant("hand-glued + OTel span, aiobreaker open", traced_glued, False, otel=True),
        ]
        before = proxy.stats()
        try:
            rows = await run_interleaved(
                ctx.telemetry,
                variants,
                baseline=variants[0].name,
                rounds=rounds,
                ops=ops,
                warmup=warmup,
                label="rejection",
            )
        finally:
            after = proxy.stats()
            events = counter.snapshot()
            counter.close()
            await proxied.dispose()
            await direct.dispose()
    witness: dict[str, Any] = {
        "rejected_calls": (len(variants) - 1) * (warmup + rounds * ops),
        "proxy_connections": after.connections_accepted - before.connections_accepted,
        "proxy_bytes_to_database": after.bytes_upstream - before.bytes_upstream,
        "sqlalchemy_connect_attempts": events["connects"],
        "sqlalchemy_checkouts": events["checkouts"],
        "sqlalchemy_statements": events["statements"],
    }
    untouched = all(
        witness[k] == 0
        for k in (
            "proxy_connections",
            "proxy_bytes_to_database",
            "sqlalchemy_connect_attempts",
            "sqlalchemy_checkouts",
            "sqlalchemy_statements",
        )
    )
    table = Table(
        "Rejection by an open breaker (PostgreSQL engine behind a witness proxy)",
        ["variant", "wall µs/call", "× raw unit", "client CPU µs/call", "spans/op"],
        [
            [
                r.variant,
                f"{r.median_us:.2f}",
                f"{r.ratio:.4f}",
                f"{r.cpu_median_us:.2f}",
                f"{r.extra['spans_per_op']:g}",
            ]
            for r in rows
        ],
    )
    table.notes.append(
        f"Witness over {witness['rejected_calls']} rejected calls: proxy saw "
        f"{witness['proxy_connections']} connections and {witness['proxy_bytes_to_database']} "
        f"bytes; SQLAlchemy saw {witness['sqlalchemy_connect_attempts']} connection attempts, "
        f"{witness['sqlalchemy_checkouts']} checkouts, {witness['sqlalchemy_statements']} "
        "statements"
    )
    # A rejected call does no I/O: its cost is CPU time. Wall time only adds the
    # moments another tenant held the core (both are in the table).
    cpu = {r.variant: r.cpu_median_us for r in rows}
    wall = {r.variant: r.median_us for r in rows}
    targets = [
        Target.at_most(
            f"{name}: rejection cost (client CPU)",
            cpu[name],
            TARGET_US,
            "µs/call",
            f"wall {wall[name]:.1f} µs",
        )
        for name in ("@resilient, breaker open", "ResilientEngine, breaker open")
    ]
    targets.append(
        Target(
            "no database round trip during rejections (proxy and SQLAlchemy events)",
            float(
                witness["proxy_connections"]
                + witness["proxy_bytes_to_database"]
                + witness["sqlalchemy_connect_attempts"]
                + witness["sqlalchemy_statements"]
            ),
            0.0,
            "connections+bytes+statements",
            untouched,
        )
    )
    return Figure(
        key="rejection",
        title="2. Breaker-open rejection cost",
        tables=[table],
        data={"rounds": rounds, "ops_per_round": ops, "rows": rows, "witness": witness},
        targets=targets,
        panels=[
            Bars(
                title="2. Breaker-open rejection: client CPU µs per rejected call (median)",
                unit="µs per call",
                bars=[(r.variant, r.cpu_median_us) for r in rows[1:]],
                targets=[(TARGET_US, "20 µs target")],
                value_format="{:.1f}",
            )
        ],
    )
