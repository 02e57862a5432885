"""Correlation IDs: where they come from, how long they last, where they go."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from conftest import Witness
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from resilient_db import (
    CorrelationIdFilter,
    ResilientEngine,
    correlation_context,
    current_correlation_id,
    resilient,
)
from resilient_db._engine import application_name, sqlcommenter

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_the_context_sets_the_id_and_restores_the_previous_one() -> None:
    with correlation_context("outer"):
        with correlation_context("inner") as inner:
            assert inner == "inner" == current_correlation_id()
        assert current_correlation_id() == "outer"


def test_without_an_id_the_context_generates_a_128_bit_hex_one() -> None:
    with correlation_context() as generated:
        assert HEX32.fullmatch(generated)
        assert current_correlation_id() == generated


def test_a_generated_id_is_the_active_trace_id_when_a_span_is_active() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span, correlation_context() as generated:
        assert generated == f"{span.get_span_context().trace_id:032x}"
    assert current_correlation_id() != generated


def test_outside_any_context_each_read_is_a_new_random_id() -> None:
    first, second = current_correlation_id(), current_correlation_id()
    assert HEX32.fullmatch(first) and HEX32.fullmatch(second)
    assert first != second


async def test_a_guarded_call_keeps_one_id_for_all_its_attempts_and_log_lines(
    no_waits: None, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    @resilient(retries=2, breaker=False)
    async def flaky() -> None:
        seen.append(current_correlation_id())
        seen.append(current_correlation_id())
        if len(seen) == 2:
            raise ConnectionResetError("dropped")

    with caplog.at_level(logging.INFO, logger="resilient_db"):
        await flaky()
    assert len(seen) == 4 and len(set(seen)) == 1 and HEX32.fullmatch(seen[0])
    (record,) = [
        r for r in caplog.records if getattr(r, "resilient_db_event", "") == "retry_scheduled"
    ]
    assert record.correlation_id == seen[0]  # type: ignore[attr-defined]
    assert record.operation == "flaky"  # type: ignore[attr-defined]
    assert "\n" not in record.getMessage()


async def test_two_guarded_calls_without_a_context_get_different_ids() -> None:
    @resilient(breaker=False)
    async def read() -> str:
        return current_correlation_id()

    assert await read() != await read()


@pytest.mark.parametrize(
    ("value", "error"),
    [("", ValueError), ("x" * 201, ValueError), ("a\nb", ValueError), (42, TypeError)],
)
def test_a_bad_id_is_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="correlation_id"), correlation_context(value):
        pass


def test_the_log_filter_sets_the_id_or_the_default() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)
    log_filter = CorrelationIdFilter(default="none")
    assert log_filter.filter(record)
    assert record.correlation_id == "none"  # type: ignore[attr-defined]
    with correlation_context("req-1"):
        log_filter.filter(record)
    assert record.correlation_id == "req-1"  # type: ignore[attr-defined]


def test_application_name_is_cut_at_63_bytes_without_splitting_a_character() -> None:
    assert application_name("api ", "abc") == "api abc"
    long = application_name("", "é" * 40)  # 80 bytes of UTF-8
    assert long == "é" * 31 and len(long.encode()) == 62
    assert len(application_name("p-", "x" * 100).encode()) == 63


def test_the_sql_comment_follows_sqlcommenter() -> None:
    comment = sqlcommenter({"traceparent": "00-ab-cd-01", "correlation_id": "req 1/'x'"})
    assert comment == "/*correlation_id='req%201%2F%27x%27',traceparent='00-ab-cd-01'*/"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"correlation_in_application_name": 1}, TypeError),
        ({"sql_comment": "yes"}, TypeError),
        ({"application_name_prefix": None}, TypeError),
        ({"application_name_prefix": "é"}, ValueError),
        ({"application_name_prefix": "x" * 33}, ValueError),
    ],
)
async def test_engine_correlation_settings_are_checked(
    sqlite_engine: AsyncEngine, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        ResilientEngine(sqlite_engine, **kwargs)


async def test_sql_comments_carry_the_id_only_when_asked(sqlite_engine: AsyncEngine) -> None:
    sent: list[str] = []

    @event.listens_for(sqlite_engine.sync_engine, "after_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    plain = ResilientEngine(sqlite_engine, breaker=False)
    with correlation_context("req-9"):
        async with plain.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert sent == ["SELECT 1"]
    ResilientEngine(sqlite_engine, breaker=False, sql_comment=True)
    ResilientEngine(sqlite_engine, breaker=False, sql_comment=True)  # installed once
    with correlation_context("req-9"):
        async with plain.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert sent[1] == "SELECT 1 /*correlation_id='req-9'*/"


@pytest.mark.postgres
async def test_application_name_is_left_alone_unless_asked(
    pg_engine: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(pg_engine, timeout=5, breaker=False)
    during: list[str] = []

    async def unit(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        during.extend(s["application_name"] for s in await witness.other_sessions())

    with correlation_context("req-not-sent"):
        await db.run_transaction(unit)
    assert len(during) == 1 and during != ["req-not-sent"]


@pytest.mark.postgres
async def test_the_application_name_rides_on_the_timeout_statement(pg_engine: AsyncEngine) -> None:
    sent: list[str] = []

    @event.listens_for(pg_engine.sync_engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    db = ResilientEngine(pg_engine, timeout=5, breaker=False, correlation_in_application_name=True)

    async def unit(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))

    await db.run_transaction(unit)  # learns the server's statement_timeout once
    sent.clear()
    with correlation_context("req-1"):
        await db.run_transaction(unit)
    settings = [s for s in sent if "set_config" in s]
    assert settings == [
        "SELECT set_config('statement_timeout', $1, true), set_config('application_name', $2, true)"
    ]
    assert len(sent) == 2  # one round trip for both settings, then the statement


async def test_log_lines_name_a_unit_of_work_as_its_spans_do(
    sqlite_engine: AsyncEngine, no_waits: None, caplog: pytest.LogCaptureFixture
) -> None:
    db = ResilientEngine(sqlite_engine, retries=2, breaker=False)
    attempts = 0

    async def transfer(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionResetError("dropped")

    with caplog.at_level(logging.INFO, logger="resilient_db"):
        await db.run_transaction(transfer)
    (record,) = [
        r for r in caplog.records if getattr(r, "resilient_db_event", "") == "retry_scheduled"
    ]
    assert record.operation == "transfer"  # type: ignore[attr-defined]
    assert record.getMessage().startswith("retrying transfer in ")
