"""What observability costs: tracing off and on, and the sqlcommenter trade-off.

    python -m bench.observability [--rounds N] [--ops N] [--quick] [--only tracing|commenter]

Everything runs interleaved in one process, on PostgreSQL (asyncpg), with the
harness's median-of-per-round-ratios method (``bench._harness.interleave``).

**tracing** — a guarded unit of work (connect, ``SELECT 1``, release):

* ``raw``: the SQLAlchemy engine, resilient-db's listeners removed;
* ``@resilient``: ``@resilient(timeout=2, retries=3)`` with the default hooks and
  no OpenTelemetry provider — exactly what a process that never configured the
  SDK gets ("tracing off");
* ``@resilient + OTel SDK``: the SDK handed to ``OpenTelemetryInstrumentation``
  (``BatchSpanProcessor`` exporting to a discarding exporter, ``MeterProvider``
  with an ``InMemoryMetricReader``): two spans and one histogram record per unit;
* ``... 10 % sampled``: the same with ``ParentBased(TraceIdRatioBased(0.1))``;
* ``raw + 2 SDK spans + histogram``: the floor — the telemetry the issue asks for,
  hand-made with the SDK, without any policy or dispatch;
* ``raw + 1 SDK span + histogram``: the floor of a smaller span model (no attempt
  spans): what any tracing of the unit costs at the least;
* ``hand-glued + SDK span``: tenacity + ``asyncio.timeout`` + aiobreaker inside one
  hand-made span (the issue's reference);
* ``ResilientEngine`` (off, and with the SDK): ``async with db.connect()`` then
  ``conn.execute`` — two guarded operations per unit (the checkout and the statement).

The global OpenTelemetry providers are never set, so "off" is honest: the switch
between variants is ``resilient_db.set_instrumentation`` (untimed, before each round).

**commenter** — a unit of work per request, each under a new correlation ID:
``async with db.begin()``, three different statements, COMMIT, through
``ResilientEngine(timeout=2)`` with nothing more; with
``correlation_in_application_name=True``; with ``sql_comment=True``. Reported:
µs per unit and statements asyncpg had to prepare per unit (its statement cache is
keyed by the SQL text, so a comment that changes per request defeats it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench._harness import Op, Row, interleave, versions, write_json
from bench._variants import glued_breaker, hand_glued
from resilient_db import (
    InstrumentationHook,
    LoggingInstrumentation,
    OpenTelemetryInstrumentation,
    ResilientEngine,
    correlation_context,
    resilient,
    set_instrumentation,
)
from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

PG_URL = os.environ.get(
    "RESILIENT_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
SELECT_1 = text("SELECT 1")
UNIT_STATEMENTS = (
    text("SELECT 1"),
    text("SELECT count(*) FROM pg_class WHERE relkind = 'r'"),
    text("SELECT now()"),
)


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _sdk(sampled: float | None = None) -> tuple[TracerProvider, MeterProvider]:
    sampler = None if sampled is None else ParentBased(TraceIdRatioBased(sampled))
    tracer_provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_Discard()))
    return tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])


def _table(title: str, rows: list[Row], extra: dict[str, str] | None = None) -> str:
    width = max(len(r.variant) for r in rows)
    lines = [title, f"{'variant':<{width}}  {'µs/op':>8}  {'× raw':>6}  {'':>1}"]
    for row in rows:
        note = (extra or {}).get(row.variant, "")
        lines.append(f"{row.variant:<{width}}  {row.median_us:>8.1f}  {row.ratio:>6.3f}  {note}")
    return "\n".join(lines)


async def tracing(engine: AsyncEngine, rounds: int, ops: int, warmup: int) -> list[Row]:
    async def raw() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(SELECT_1)).scalar()

    decorated = resilient(timeout=2, retries=3)(raw)
    db = ResilientEngine(engine, timeout=2, retries=3)

    async def through_engine() -> Any:
        async with db.connect() as conn:
            return (await conn.execute(SELECT_1)).scalar()

    full_tracer, full_meter = _sdk()
    sampled_tracer, sampled_meter = _sdk(0.1)
    hand_tracer, hand_meter = _sdk()
    tracer = hand_tracer.get_tracer("bench")
    histogram = hand_meter.get_meter("bench").create_histogram("db.client.operation.duration")
    attributes: dict[str, AttributeValue] = {
        "db.system.name": "postgresql",
        "db.namespace": engine.url.database or "",
        "server.address": engine.url.host or "",
        "server.port": engine.url.port or 5432,
        "resilient_db.correlation_id": "0af7651916cd43dd8448eb211c80319c",
    }

    async def two_spans_and_a_histogram() -> Any:
        operation = tracer.start_span("unit", attributes=attributes)
        parent = trace.set_span_in_context(operation)
        attempt = tracer.start_span(
            "unit attempt", context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(attempt))
        try:
            return await raw()
        finally:
            otel_context.detach(token)
            attempt.end()
            operation.end()
            histogram.record(0.0005, attributes)

    async def one_span_and_a_histogram() -> Any:
        with tracer.start_as_current_span("unit", kind=SpanKind.CLIENT, attributes=attributes):
            result = await raw()
        histogram.record(0.0005, attributes)
        return result

    glued = hand_glued(raw, breaker=glued_breaker())

    async def glued_in_a_span() -> Any:
        with tracer.start_as_current_span("unit"):
            return await glued()

    def hooks(tracer_provider: Any = None, meter_provider: Any = None) -> Callable[[], None]:
        chosen: list[InstrumentationHook] | None = None
        if tracer_provider is not None:
            chosen = [
                LoggingInstrumentation(),
                OpenTelemetryInstrumentation(
                    tracer_provider=tracer_provider, meter_provider=meter_provider
                ),
            ]

        def prepare() -> None:
            install_commit_tracking()
            set_instrumentation(chosen)

        return prepare

    def bare() -> None:
        uninstall_commit_tracking()
        set_instrumentation(None)

    variants: dict[str, tuple[Op, Callable[[], None]]] = {
        "raw": (raw, bare),
        "@resilient": (decorated, hooks()),
        "@resilient + OTel SDK": (decorated, hooks(full_tracer, full_meter)),
        "@resilient + OTel SDK, 10 % sampled": (decorated, hooks(sampled_tracer, sampled_meter)),
        "raw + 2 SDK spans + histogram": (two_spans_and_a_histogram, bare),
        "raw + 1 SDK span + histogram": (one_span_and_a_histogram, bare),
        "hand-glued + SDK span": (glued_in_a_span, bare),
        "ResilientEngine": (through_engine, hooks()),
        "ResilientEngine + OTel SDK": (through_engine, hooks(full_tracer, full_meter)),
    }
    try:
        return await interleave(
            {name: op for name, (op, _) in variants.items()},
            baseline="raw",
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            prepare={name: prepare for name, (_, prepare) in variants.items()},
        )
    finally:
        set_instrumentation(None)
        install_commit_tracking()
        for provider in (full_tracer, sampled_tracer, hand_tracer):
            provider.shutdown()
        for meter in (full_meter, sampled_meter, hand_meter):
            meter.shutdown()


class _PrepareCounter:
    """Counts the statements asyncpg prepares (SQLAlchemy's cache misses), per label."""

    def __init__(self) -> None:
        self.label = ""
        self.counts: Counter[str] = Counter()
        self._original = asyncpg.connection.Connection.prepare
        counter = self

        async def prepare(conn: Any, *args: Any, **kwargs: Any) -> Any:
            counter.counts[counter.label] += 1
            return await counter._original(conn, *args, **kwargs)

        asyncpg.connection.Connection.prepare = prepare

    def close(self) -> None:
        asyncpg.connection.Connection.prepare = self._original


async def commenter(url: str, rounds: int, ops: int, warmup: int) -> tuple[list[Row], str]:
    engines = [create_async_engine(url) for _ in range(3)]
    plain = ResilientEngine(engines[0], timeout=2, retries=3)
    named = ResilientEngine(engines[1], timeout=2, retries=3, correlation_in_application_name=True)
    commented = ResilientEngine(engines[2], timeout=2, retries=3, sql_comment=True)
    counter = _PrepareCounter()

    def unit(db: ResilientEngine) -> Op:
        async def run() -> None:
            with correlation_context():  # a new request, a new ID
                async with db.begin() as conn:
                    for statement in UNIT_STATEMENTS:
                        await conn.execute(statement)

        return run

    def label(name: str) -> Callable[[], None]:
        def prepare() -> None:
            counter.label = name

        return prepare

    names = {
        "ResilientEngine": plain,
        "+ application_name": named,
        "+ sql_comment (sqlcommenter)": commented,
    }
    try:
        rows = await interleave(
            {name: unit(db) for name, db in names.items()},
            baseline="ResilientEngine",
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            prepare={name: label(name) for name in names},
        )
    finally:
        counter.close()
        for engine in engines:
            await engine.dispose()
    total = warmup + rounds * ops
    for row in rows:
        row.extra["prepares_per_unit"] = round(counter.counts[row.variant] / total, 3)
    notes = {r.variant: f"{r.extra['prepares_per_unit']:g} prepares/unit" for r in rows}
    text_ = _table(
        "a transaction of 3 statements per request, a new correlation ID per request",
        rows,
        notes,
    )
    return rows, text_


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a few iterations only")
    parser.add_argument("--only", choices=["tracing", "commenter"], default=None)
    args = parser.parse_args(argv)
    rounds, ops, warmup = (2, 20, 5) if args.quick else (args.rounds, args.ops, 200)
    results: dict[str, Any] = {"rounds": rounds, "ops_per_round": ops, "warmup": warmup}
    if args.only in (None, "tracing"):
        engine = create_async_engine(PG_URL)
        try:
            rows = await tracing(engine, rounds, ops, warmup)
        finally:
            await engine.dispose()
        print(_table("\nconnect, SELECT 1, release (PostgreSQL, asyncpg)", rows))
        results["tracing"] = rows
    if args.only in (None, "commenter"):
        rows, table = await commenter(PG_URL, rounds, max(1, ops // 2), warmup // 2)
        print("\n" + table)
        results["commenter"] = rows
    packages = ("sqlalchemy", "asyncpg", "opentelemetry-api", "opentelemetry-sdk", "tenacity")
    path = write_json("observability", {"versions": versions(*packages), **results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
