"""Spans and metrics from real PostgreSQL failures, through the SDK's in-memory exporters."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator

import pytest
from conftest import Witness
from opentelemetry.trace import SpanKind, StatusCode
from otel_support import Telemetry
from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from resilient_db import (
    AttemptTimeout,
    CircuitBreaker,
    CircuitOpenError,
    CommitOutcomeUnknown,
    ResilientEngine,
    correlation_context,
    resilient,
)
from resilient_db.testing import FakeClock

pytestmark = pytest.mark.postgres

FAST = {"initial": 0.001, "max": 0.01}


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    with Telemetry().installed() as t:
        yield t


def attrs(span: object) -> dict[str, object]:
    return dict(getattr(span, "attributes", None) or {})


async def test_a_serialization_failure_then_success_is_one_operation_with_two_attempts(
    accounts: AsyncEngine, witness: Witness, telemetry: Telemetry
) -> None:
    db = ResilientEngine(accounts, timeout=5, retries=2, backoff=FAST, breaker=False)
    attempts = 0

    async def deposit(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        await session.execute(text("SELECT balance FROM accounts WHERE id = 1"))
        if attempts == 1:
            # Someone else commits a change to the row our snapshot has read:
            # updating it now is a real 40001 from the server.
            await witness.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        await session.execute(text("UPDATE accounts SET balance = balance + 10 WHERE id = 1"))

    with correlation_context("req-40001"):
        await db.run_transaction(deposit)

    assert attempts == 2
    (operation,) = telemetry.spans("deposit")
    first, second = telemetry.children(operation)
    assert operation.kind is SpanKind.INTERNAL
    assert (first.name, second.name) == ("deposit attempt", "deposit attempt")
    assert first.kind is SpanKind.CLIENT and second.kind is SpanKind.CLIENT
    assert attrs(first)["db.response.status_code"] == "40001"
    assert attrs(first)["error.type"] == "40001"
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET
    assert "error.type" not in attrs(second)
    assert [attrs(s)["resilient_db.attempt"] for s in (first, second)] == [1, 2]
    assert attrs(second)["resilient_db.backoff.delay"] >= 0  # type: ignore[operator]
    assert operation.status.status_code is StatusCode.UNSET
    assert attrs(operation)["resilient_db.attempts"] == 2
    assert attrs(operation)["resilient_db.commit.outcome"] == "committed"
    for span in (operation, first, second):
        assert attrs(span)["resilient_db.correlation_id"] == "req-40001"
        assert attrs(span)["db.system.name"] == "postgresql"
        assert attrs(span)["db.namespace"] == witness.database
        assert attrs(span)["server.address"] == "127.0.0.1"
    (retry,) = [e for e in operation.events if e.name == "retry scheduled"]
    assert attrs(retry)["error.type"] == "40001"
    assert telemetry.value("resilient_db.client.attempts", resilient_db__operation="deposit") == 2
    assert telemetry.value("resilient_db.client.retries", error__type="40001") == 1


async def test_a_decorated_function_on_a_plain_engine_learns_its_database(
    accounts: AsyncEngine, telemetry: Telemetry
) -> None:
    @resilient(timeout=5, breaker=False, name="read-balance")
    async def balance() -> int:
        async with accounts.connect() as conn:
            return int((await conn.execute(text("SELECT balance FROM accounts"))).scalar_one())

    with pytest.raises(sa_exc.MultipleResultsFound):
        await balance()
    (operation,) = telemetry.spans("read-balance")
    (attempt,) = telemetry.children(operation)
    for span in (operation, attempt):
        assert attrs(span)["db.system.name"] == "postgresql"
        assert attrs(span)["error.type"] == "sqlalchemy.exc.MultipleResultsFound"
        assert span.status.status_code is StatusCode.ERROR


async def test_a_timed_out_attempt_carries_error_type_timeout(
    pg_engine: AsyncEngine, telemetry: Telemetry
) -> None:
    @resilient(timeout=0.2, retries=0, breaker=False)
    async def slow() -> None:
        async with pg_engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(5)"))

    with pytest.raises(AttemptTimeout):
        await slow()
    (operation,) = telemetry.spans("slow")
    (attempt,) = telemetry.children(operation)
    assert attrs(attempt)["error.type"] == "timeout"
    assert attempt.status.status_code is StatusCode.ERROR
    assert attrs(operation)["error.type"] == "timeout"
    assert telemetry.value("resilient_db.client.timeouts") == 1


async def test_a_cancelled_attempt_ends_with_error_and_error_type_cancelled(
    pg_engine: AsyncEngine, witness: Witness, telemetry: Telemetry
) -> None:
    started = asyncio.Event()

    @resilient(timeout=10, breaker=False, name="long-report")
    async def report() -> None:
        async with pg_engine.connect() as conn:
            started.set()
            await conn.execute(text("SELECT pg_sleep(5)"))

    task = asyncio.create_task(report())
    await started.wait()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (operation,) = telemetry.spans("long-report")
    (attempt,) = telemetry.children(operation)
    for span in (operation, attempt):
        assert span.status.status_code is StatusCode.ERROR
        assert attrs(span)["error.type"] == "cancelled"
    await witness.wait_sessions(0)


async def test_breaker_transitions_are_span_events_and_gauge_values(
    pg_engine: AsyncEngine, telemetry: Telemetry
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("orders-db", failure_threshold=1, reset_timeout=5, clock=clock)
    slow = True

    @resilient(timeout=0.2, retries=0, breaker=breaker, name="orders")
    async def orders() -> None:
        async with pg_engine.connect() as conn:
            await conn.execute(text(f"SELECT pg_sleep({5 if slow else 0})"))

    def state_gauge() -> dict[str, float]:
        return {
            str(p.attributes["resilient_db.breaker.state"]): p.value
            for p in telemetry.points("resilient_db.breaker.status")
            if p.attributes["resilient_db.breaker.name"] == "orders-db"
        }

    with pytest.raises(AttemptTimeout):
        await orders()
    assert state_gauge() == {"closed": 0, "open": 1, "half_open": 0}
    with pytest.raises(CircuitOpenError):
        await orders()
    assert telemetry.value("resilient_db.breaker.rejections") == 1
    clock.advance(5)
    slow = False
    await orders()
    assert state_gauge() == {"closed": 1, "open": 0, "half_open": 0}

    failed, rejected, probe = [telemetry.children(op)[0] for op in telemetry.spans("orders")]
    assert [e.name for e in failed.events] == ["breaker opened"]
    assert [e.name for e in rejected.events] == ["rejected by breaker"]
    assert attrs(rejected)["error.type"] == "resilient_db.CircuitOpenError"
    assert [e.name for e in probe.events] == ["breaker half-opened", "breaker closed"]
    assert attrs(probe)["resilient_db.breaker.state"] == "half_open"


async def test_the_duration_histogram_counts_each_operation_once(
    pg_engine: AsyncEngine, telemetry: Telemetry
) -> None:
    db = ResilientEngine(pg_engine, timeout=5, breaker=False)

    async def noop(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))

    for _ in range(3):
        await db.run_transaction(noop)
    (point,) = [
        p
        for p in telemetry.points("db.client.operation.duration")
        if p.attributes.get("resilient_db.operation") == "noop"
    ]
    assert point.count == 3
    assert point.attributes["db.system.name"] == "postgresql"
    assert point.attributes["server.port"] == 5432
    assert "resilient_db.correlation_id" not in point.attributes  # never a metric dimension
    assert 0 < point.sum < 15


async def test_pool_usage_is_reported_by_state(
    pg_engine: AsyncEngine, telemetry: Telemetry
) -> None:
    gc.collect()  # wrappers left by earlier tests would report their (empty) pools too
    db = ResilientEngine(pg_engine, timeout=5, breaker=False)
    other = ResilientEngine(pg_engine, breaker=False)  # a second wrapper: its pool counts once
    pool = {
        "db.client.connection.pool.name": f"postgresql://127.0.0.1:5432/{pg_engine.url.database}"
    }

    def count(state: str) -> float:
        return sum(  # type: ignore[no-any-return]
            p.value
            for p in telemetry.points("db.client.connection.count")
            if p.attributes == {**pool, "db.client.connection.state": state}
        )

    async with db.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert (count("used"), count("idle")) == (1, 0)
    assert (count("used"), count("idle")) == (0, 1)
    limits = [p.value for p in telemetry.points("db.client.connection.max") if p.attributes == pool]
    assert limits == [15]  # pool_size 5 + max_overflow 10
    assert other.engine is db.engine


async def test_no_statement_spans_unless_asked(
    pg_engine: AsyncEngine, telemetry: Telemetry
) -> None:
    db = ResilientEngine(pg_engine, timeout=5, breaker=False)

    async def two_statements(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        await session.execute(text("SELECT 2"))

    await db.run_transaction(two_statements)
    assert sorted(s.name for s in telemetry.spans()) == ["two_statements", "two_statements attempt"]


async def test_statement_spans_when_asked_carry_the_sqlstate_and_never_parameters(
    pg_engine: AsyncEngine,
) -> None:
    with Telemetry(statement_spans=True, query_text=True).installed() as telemetry:
        db = ResilientEngine(pg_engine, timeout=5, retries=0, breaker=False)

        async def divide(session: AsyncSession) -> None:
            await session.execute(text("SELECT CAST(:n AS int) / 0"), {"n": 987654})

        with pytest.raises(sa_exc.DBAPIError):
            await db.run_transaction(divide)
        (attempt,) = telemetry.spans("divide attempt")
        statements = telemetry.children(attempt)
        # Every statement sent gets its span, the engine's own set_config included.
        assert {s.kind for s in statements} == {SpanKind.CLIENT}
        (statement,) = [s for s in statements if "/ 0" in str(attrs(s)["db.query.text"])]
        assert statement.name == f"SELECT {pg_engine.url.database}"
        assert attrs(statement)["db.response.status_code"] == "22012"
        assert attrs(statement)["db.query.text"] == "SELECT CAST($1 AS int) / 0"
        assert statement.status.status_code is StatusCode.ERROR
        everything = repr(
            [(attrs(s), s.status.description, list(s.events)) for s in telemetry.spans()]
        )
        assert "987654" not in everything


async def test_a_begun_transactions_first_statement_is_its_operations_query_text(
    pg_engine: AsyncEngine,
) -> None:
    # The server-side deadline is sent under the first statement's guard, before it:
    # the operation's query text must still be the caller's statement, not ours.
    with Telemetry(query_text=True).installed() as telemetry:
        db = ResilientEngine(pg_engine, timeout=5, retries=0, breaker=False)
        async with db.begin() as conn:
            await conn.execute(text("SELECT 41 + 1"))
    (operation,) = [s for s in telemetry.spans() if attrs(s).get("db.operation.name") == "SELECT"]
    assert attrs(operation)["db.query.text"] == "SELECT 41 + 1"


async def test_a_commits_operation_never_takes_our_xid_capture_for_its_query_text(
    pg_engine: AsyncEngine,
) -> None:
    # With verify_commits, the transaction id is read just before COMMIT, inside the
    # COMMIT's operation: that statement is ours, not the caller's.
    with Telemetry(query_text=True).installed() as telemetry:
        db = ResilientEngine(pg_engine, timeout=5, retries=0, breaker=False, verify_commits=True)
        async with db.begin() as conn:
            await conn.execute(text("SELECT 41 + 1"))
    (commit,) = [s for s in telemetry.spans() if attrs(s).get("db.operation.name") == "COMMIT"]
    assert "pg_current_xact_id" not in str(attrs(commit).get("db.query.text"))


async def test_exception_messages_never_reach_spans(
    accounts: AsyncEngine, telemetry: Telemetry
) -> None:
    db = ResilientEngine(accounts, timeout=5, retries=0, breaker=False)

    async def duplicate(session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO accounts VALUES (:id, 5)"), {"id": 1})

    with pytest.raises(sa_exc.IntegrityError) as info:
        await db.run_transaction(duplicate)
    assert "Key (id)=(1)" in str(info.value) or "duplicate key" in str(info.value)
    for span in telemetry.spans():
        assert "duplicate key" not in repr((attrs(span), span.status.description, span.events))
    (operation,) = telemetry.spans("duplicate")
    assert attrs(operation)["error.type"] == "23505"


async def test_an_unknown_commit_outcome_is_counted_logged_and_on_the_span(
    accounts: AsyncEngine, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = async_sessionmaker(accounts)

    @resilient(retries=3, breaker=False, name="pay")
    async def pay() -> None:
        async with sessions.begin() as s:
            await s.execute(text("UPDATE accounts SET balance = balance - 1 WHERE id = 2"))
        raise ConnectionResetError("lost while reporting the result")

    with (
        caplog.at_level(logging.INFO, logger="resilient_db"),
        correlation_context("req-commit"),
        pytest.raises(CommitOutcomeUnknown),
    ):
        await pay()
    (operation,) = telemetry.spans("pay")
    assert attrs(operation)["resilient_db.commit.outcome"] == "unknown"
    assert attrs(operation)["error.type"] == "resilient_db.CommitOutcomeUnknown"
    assert [e.name for e in operation.events] == ["commit outcome unknown"]
    assert (
        telemetry.value("resilient_db.client.commit_outcome_unknown", resilient_db__operation="pay")
        == 1
    )
    (record,) = [
        r
        for r in caplog.records
        if getattr(r, "resilient_db_event", "") == "commit_outcome_unknown"
    ]
    assert record.levelno == logging.ERROR
    assert record.correlation_id == "req-commit"  # type: ignore[attr-defined]
    assert "\n" not in record.getMessage()
    assert "ConnectionResetError" in record.getMessage()


async def test_outside_units_the_checkout_each_statement_and_the_commit_are_operations(
    accounts: AsyncEngine, telemetry: Telemetry
) -> None:
    db = ResilientEngine(accounts, timeout=5, breaker=False)
    async with db.begin() as conn:
        await conn.execute(text("UPDATE accounts SET balance = 0 WHERE id = :id"), {"id": 2})
    namespace = accounts.url.database
    operations = [s for s in telemetry.spans() if s.kind is SpanKind.INTERNAL]
    assert [s.name for s in operations] == ["connect", f"UPDATE {namespace}", f"COMMIT {namespace}"]
    update, commit = operations[1:]
    assert attrs(update)["db.operation.name"] == "UPDATE"
    assert "db.query.text" not in attrs(update)  # only with query_text=True
    assert attrs(commit)["db.operation.name"] == "COMMIT"
    assert attrs(commit)["resilient_db.commit.outcome"] == "committed"
    assert all(len(telemetry.children(op)) == 1 for op in operations)


async def test_a_checkout_is_timed_as_pool_wait_not_as_a_database_operation(
    accounts: AsyncEngine, telemetry: Telemetry
) -> None:
    db = ResilientEngine(accounts, timeout=5, breaker=False)
    for _ in range(3):
        async with db.connect() as conn:
            await conn.execute(text("SELECT 1"))
    url = accounts.url
    port = f":{url.port}" if url.port else ""
    pool = f"postgresql://{url.host}{port}/{url.database}"
    assert telemetry.value("db.client.connection.wait_time") == 3
    assert (
        telemetry.value("db.client.connection.wait_time", db__client__connection__pool__name=pool)
        == 3
    )
    # Only the statements: checkouts (microseconds, from the pool) would drag the
    # operations' percentiles down.
    assert telemetry.value("db.client.operation.duration") == 3
    assert telemetry.value("db.client.operation.duration", db__operation__name="SELECT") == 3
    (connect, *_) = telemetry.spans("connect")
    assert attrs(connect)["db.client.connection.pool.name"] == pool


async def test_a_failed_checkout_stays_an_operation_with_its_error(
    pg_url: str, telemetry: Telemetry
) -> None:
    # When only checkouts fail (the server is down), the operation metrics must show
    # it; a wait time that ended in no connection is no wait time either.
    unreachable = create_async_engine(make_url(pg_url).set(port=1))
    db = ResilientEngine(unreachable, timeout=2, retries=0, breaker=False)
    with pytest.raises((OSError, sa_exc.DBAPIError)):
        async with db.connect():
            pass
    await unreachable.dispose()
    assert telemetry.value("db.client.connection.wait_time") == 0
    (point,) = telemetry.points("db.client.operation.duration")
    assert point.attributes["resilient_db.operation"] == "connect"
    assert point.attributes["error.type"]
