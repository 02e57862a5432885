"""The contenders, built the same way for every figure.

* **raw** — the SQLAlchemy engine as is: ``async with engine.connect()``, one
  statement, release. No resilience at all.
* **@resilient** — the same function decorated with ``@resilient(...)``.
* **ResilientEngine** — the same unit through ``ResilientEngine(engine, ...)``:
  ``async with db.connect() as conn: await conn.execute(...)``.
* **hand-glued** — what a user writes without resilient-db: tenacity
  (``stop_after_attempt``, ``wait_random_exponential``, retry on ``DBAPIError`` and
  ``OSError``) around ``asyncio.timeout`` around an aiobreaker breaker.
* **stamina** — ``@stamina.retry(on=..., attempts=...)`` (its default backoff)
  around ``asyncio.timeout``; stamina has no breaker.
* "+ OTel SDK" — the same, with the OpenTelemetry SDK switched on (see
  ``bench._otel``); for hand-glued, the call is also wrapped in a span, as a user
  adding tracing by hand would.

The raw and hand-glued variants run with resilient-db's process-wide SQLAlchemy
listeners removed, so that their cost is charged to resilient-db's variants only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiobreaker
import stamina
import tenacity
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from bench._harness import Op, Row, interleave
from bench._otel import Telemetry
from resilient_db import ResilientEngine, resilient
from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

SELECT_1 = text("SELECT 1")


@dataclass
class Spec:
    """A contender of the load figures: its name, and how to build it on an engine."""

    name: str
    build: Callable[[AsyncEngine], Op]


RETRYABLE: tuple[type[Exception], ...] = (sa_exc.DBAPIError, OSError)
"""What a hand-written retry usually catches (``TimeoutError`` is an ``OSError``)."""


def raw_unit(engine: AsyncEngine, statement: Any = SELECT_1) -> Op:
    """Check a connection out, run one statement, release it."""

    async def raw() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(statement)).scalar()

    return raw


def engine_unit(db: ResilientEngine, statement: Any = SELECT_1) -> Op:
    """The same unit through a ``ResilientEngine``."""

    async def guarded() -> Any:
        async with db.connect() as conn:
            return (await conn.execute(statement)).scalar()

    return guarded


def guarded_units(engine: AsyncEngine) -> dict[str, Op]:
    """Figure 1's guarded contenders on ``engine``, configured as in every figure:
    ``@resilient(timeout=2, retries=3)`` around the raw unit, and the unit through
    ``ResilientEngine(engine, timeout=2, retries=3)``."""
    return {
        "@resilient": resilient(timeout=2, retries=3)(raw_unit(engine)),
        "ResilientEngine": engine_unit(ResilientEngine(engine, timeout=2, retries=3)),
    }


def glued_breaker(reset: float = 10.0, fail_max: int = 5) -> aiobreaker.CircuitBreaker:
    return aiobreaker.CircuitBreaker(fail_max=fail_max, timeout_duration=timedelta(seconds=reset))


def hand_glued(
    unit: Op,
    *,
    timeout: float = 2.0,
    attempts: int = 4,
    breaker: aiobreaker.CircuitBreaker | None = None,
) -> Op:
    """tenacity + ``asyncio.timeout`` + aiobreaker (``breaker=None``: tenacity alone)."""

    async def attempt() -> Any:
        async with asyncio.timeout(timeout):
            if breaker is None:
                return await unit()
            return await breaker.call_async(unit)

    async def glued() -> Any:
        async for retrying in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=2),
            retry=tenacity.retry_if_exception_type(RETRYABLE),
            reraise=True,
        ):
            with retrying:
                return await attempt()
        raise AssertionError("unreachable: tenacity either returns or raises")

    return glued


def stamina_retry(unit: Op, *, timeout: float = 2.0, attempts: int = 4) -> Op:
    """stamina's retry decorator (its default backoff) around ``asyncio.timeout``."""

    @stamina.retry(on=RETRYABLE, attempts=attempts)
    async def retried() -> Any:
        async with asyncio.timeout(timeout):
            return await unit()

    return retried


def in_span(telemetry: Telemetry, unit: Op, name: str = "db.unit_of_work") -> Op:
    """Wrap a call in an SDK span, as a user tracing the hand-glued stack would."""
    tracer = telemetry.sdk_tracer

    async def traced() -> Any:
        with tracer.start_as_current_span(name):
            return await unit()

    return traced


@dataclass
class Variant:
    name: str
    op: Op
    guarded: bool
    """Uses resilient-db (its SQLAlchemy listeners stay installed while it runs)."""
    otel: bool = False
    """Runs with the OpenTelemetry SDK switched on."""


def preparer(telemetry: Telemetry, variant: Variant, key: str) -> Callable[[], None]:
    """Listeners on or off, SDK on or off, spans counted under ``key``."""

    def prepare() -> None:
        if variant.guarded:
            install_commit_tracking()
        else:
            uninstall_commit_tracking()
        telemetry.switch(variant.otel, key)

    return prepare


async def run_interleaved(
    telemetry: Telemetry,
    variants: Sequence[Variant],
    *,
    baseline: str,
    rounds: int,
    ops: int,
    warmup: int,
    label: str = "",
) -> list[Row]:
    """``interleave`` with listeners and telemetry set per variant; spans per op noted.

    ``label`` keeps span counts of different figures apart.
    """
    keys = {v.name: f"{label}/{v.name}" for v in variants}
    prepare = {v.name: preparer(telemetry, v, keys[v.name]) for v in variants}
    try:
        rows = await interleave(
            {v.name: v.op for v in variants},
            baseline=baseline,
            rounds=rounds,
            ops=ops,
            warmup=warmup,
            prepare=prepare,
        )
    finally:
        telemetry.switch(False, "")
        install_commit_tracking()
    total_ops = warmup + rounds * ops
    otel = {v.name: v.otel for v in variants}
    for row in rows:
        row.extra["otel_sdk"] = otel[row.variant]
        row.extra["spans_per_op"] = round(telemetry.spans[keys[row.variant]] / total_ops, 3)
    return rows


class StatementCounter:
    """Counts statements sent through an engine (SQLAlchemy's ``before_cursor_execute``),
    attributed to the label set before each variant runs."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.label = ""
        self.counts: dict[str, int] = {}
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.counts[self.label] = self.counts.get(self.label, 0) + 1

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._seen)


class ConnectCounter:
    """Counts driver connection attempts (SQLAlchemy's ``do_connect``: every attempt,
    failed ones included) and pool checkouts of an engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.connects = 0
        self.checkouts = 0
        self.statements = 0
        sync = engine.sync_engine
        event.listen(sync, "do_connect", self._connect)
        event.listen(sync.pool, "checkout", self._checkout)
        event.listen(sync, "before_cursor_execute", self._statement)

    def _connect(self, *_: Any) -> None:
        self.connects += 1

    def _checkout(self, *_: Any) -> None:
        self.checkouts += 1

    def _statement(self, *_: Any) -> None:
        self.statements += 1

    def snapshot(self) -> dict[str, int]:
        return {
            "connects": self.connects,
            "checkouts": self.checkouts,
            "statements": self.statements,
        }

    def close(self) -> None:
        sync = self.engine.sync_engine
        event.remove(sync, "do_connect", self._connect)
        event.remove(sync.pool, "checkout", self._checkout)
        event.remove(sync, "before_cursor_execute", self._statement)
