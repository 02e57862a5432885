"""The in-process fault injector, on real aiosqlite and asyncpg engines.

Each fault must look real to SQLAlchemy: a disconnect invalidates the connection and
the pool replaces it (PostgreSQL's pg_stat_activity is the witness that the old
backend is gone), errors carry the driver's class and codes, and resilient-db's
classifier and retry policy treat them as they treat the real thing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

import asyncpg
import pytest
from conftest import Witness
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)

from resilient_db import CommitOutcomeUnknown, ErrorCategory, classify, find_sqlstate, resilient
from resilient_db._sqla import inner_method
from resilient_db.chaos.injector import (
    FaultInjector,
    Kind,
    Strategy,
    Target,
    connect_failure,
    disconnect,
    hang,
    latency,
    sqlite_busy,
    sqlstate_error,
)

DRIVERS = [
    pytest.param("aiosqlite", id="aiosqlite"),
    pytest.param("asyncpg", id="asyncpg", marks=pytest.mark.postgres),
]


@pytest.fixture(params=DRIVERS)
def engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """An aiosqlite engine on a fresh file, or an asyncpg engine on the run's database."""
    name = "sqlite_engine" if request.param == "aiosqlite" else "pg_engine"
    result: AsyncEngine = request.getfixturevalue(name)
    return result


@pytest.fixture
async def items(engine: AsyncEngine) -> AsyncEngine:
    """The engine, with an empty ``chaos_items`` table."""
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS chaos_items"))
        await conn.execute(text("CREATE TABLE chaos_items (id INTEGER PRIMARY KEY, note TEXT)"))
    return engine


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


async def driver_connection(conn: AsyncConnection) -> Any:
    """The driver's own connection object under ``conn`` (asyncpg / aiosqlite)."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection


def is_closed(driver_conn: Any) -> bool:
    """Whether the driver itself considers its connection closed."""
    if isinstance(driver_conn, asyncpg.Connection):
        return bool(driver_conn.is_closed())
    # aiosqlite has no public flag: its sqlite3 handle is dropped on close.
    return driver_conn._connection is None


async def count_items(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM chaos_items"))).scalar_one())


def conflict_fault(engine: AsyncEngine, **kwargs: Any) -> Strategy:
    """The database's "try again" error: serialization failure or SQLite busy."""
    if is_postgres(engine):
        return sqlstate_error("40001", **kwargs)
    return sqlite_busy(**kwargs)


async def faulted_calls(
    engine: AsyncEngine, seed: int, calls: int = 1000
) -> tuple[list[int], list[int]]:
    """Run ``calls`` statements under a 10 % conflict fault.

    Returns the 1-based calls that failed, as the caller saw them, and the faulted
    ordinals the injector logged.
    """
    failed: list[int] = []
    injector = FaultInjector(engine, conflict_fault(engine, rate=0.1), seed=seed)
    # AUTOCOMMIT: each statement is its own transaction, so a server-side error
    # does not leave the next statement in an aborted transaction.
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        with injector:
            for call in range(1, calls + 1):
                try:
                    await conn.execute(text("SELECT 1"))
                except sa_exc.DBAPIError:
                    failed.append(call)
    return failed, injector.faulted(Target.STATEMENT)


# -- a disconnect is a real disconnect ----------------------------------------------------


@pytest.mark.parametrize("phase", ["before", "after"])
async def test_disconnect_invalidates_the_connection_and_the_pool_replaces_it(
    engine: AsyncEngine, phase: Literal["before", "after"]
) -> None:
    async with engine.connect() as conn:
        old = await driver_connection(conn)
    closed_when_raised: list[bool] = []

    def probe(context: ExceptionContext) -> None:
        # handle_error runs before SQLAlchemy invalidates (and closes) anything itself.
        closed_when_raised.append(is_closed(old))

    injector = FaultInjector(engine, disconnect(rate=1.0, phase=phase), seed=1)
    event.listen(engine.sync_engine, "handle_error", probe)
    try:
        async with engine.connect() as conn:
            assert await driver_connection(conn) is old  # the pool hands out the same one
            with injector, pytest.raises(sa_exc.DBAPIError) as info:
                await conn.execute(text("SELECT 1"))
    finally:
        event.remove(engine.sync_engine, "handle_error", probe)
    assert closed_when_raised == [True]  # the driver connection was really closed first
    assert info.value.connection_invalidated
    assert injector.counts == {"disconnect": 1}
    async with engine.connect() as conn:
        assert await driver_connection(conn) is not old
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


async def test_disconnect_after_a_statement_loses_the_reply_not_the_work(
    items: AsyncEngine,
) -> None:
    async with items.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        injector = FaultInjector(items, disconnect(rate=1.0, phase="after"), seed=1)
        with injector, pytest.raises(sa_exc.DBAPIError) as info:
            await conn.execute(text("INSERT INTO chaos_items (id) VALUES (1)"))
    assert info.value.connection_invalidated
    assert await count_items(items) == 1  # it ran, and (autocommit) it stays


@pytest.mark.postgres
async def test_disconnect_ends_the_postgres_backend_and_the_next_checkout_gets_a_new_one(
    pg_engine: AsyncEngine, witness: Witness
) -> None:
    async with pg_engine.connect() as conn:
        old_pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    assert old_pid in {s["pid"] for s in await witness.other_sessions()}
    with FaultInjector(pg_engine, disconnect(rate=1.0), seed=1):
        async with pg_engine.connect() as conn:
            with pytest.raises(sa_exc.DBAPIError):
                await conn.execute(text("SELECT 1"))
    assert await witness.wait_sessions(0) == []
    async with pg_engine.connect() as conn:
        new_pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    assert new_pid != old_pid
    assert [s["pid"] for s in await witness.other_sessions()] == [new_pid]


# -- the ambiguous commit -----------------------------------------------------------------


async def test_commit_acknowledgement_lost_is_durable_and_raises_commit_outcome_unknown(
    items: AsyncEngine, no_waits: None
) -> None:
    sessions = async_sessionmaker(items)
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def add_item() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO chaos_items (id, note) VALUES (1, 'paid')"))

    injector = FaultInjector(items, disconnect(rate=1.0, on="commit", phase="after"), seed=1)
    with injector, pytest.raises(CommitOutcomeUnknown) as info:
        await add_item()
    assert attempts == 1
    assert await count_items(items) == 1
    assert isinstance(info.value.__cause__, sa_exc.DBAPIError)
    assert info.value.__cause__.connection_invalidated
    assert [(e.target, e.kind) for e in injector.log] == [(Target.COMMIT, Kind.DISCONNECT)]


async def test_disconnect_before_commit_is_rejected_for_sure_and_the_unit_is_retried(
    items: AsyncEngine, no_waits: None
) -> None:
    sessions = async_sessionmaker(items)
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def add_item() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO chaos_items (id, note) VALUES (1, 'paid')"))

    first_commit_only = disconnect(rate=1.0, on="commit", when=lambda op: op.ordinal == 1)
    with FaultInjector(items, first_commit_only, seed=1) as injector:
        await add_item()
    assert attempts == 2
    assert injector.counts == {"disconnect": 1}
    assert await count_items(items) == 1


# -- determinism --------------------------------------------------------------------------


async def test_a_fixed_seed_faults_the_same_calls_every_run(engine: AsyncEngine) -> None:
    first_failed, first_logged = await faulted_calls(engine, seed=7)
    second_failed, second_logged = await faulted_calls(engine, seed=7)
    assert first_failed == first_logged  # the log is what the caller saw
    assert second_failed == first_failed
    assert second_logged == first_logged
    assert 50 <= len(first_failed) <= 150  # rate 0.1 of 1000 calls, with a wide margin


async def test_a_different_seed_faults_different_calls(engine: AsyncEngine) -> None:
    with_7, _ = await faulted_calls(engine, seed=7, calls=300)
    with_8, _ = await faulted_calls(engine, seed=8, calls=300)
    assert with_7 != with_8


# -- each fault is classified as the real thing -------------------------------------------


async def _statement_error(engine: AsyncEngine, strategy: Strategy) -> Exception:
    """The error a caller gets from ``SELECT 1`` under ``strategy``."""
    with FaultInjector(engine, strategy, seed=1):
        async with engine.connect() as conn:
            try:
                await conn.execute(text("SELECT 1"))
            except Exception as exc:
                return exc
    raise AssertionError(f"{strategy!r} injected nothing")


async def test_injected_disconnect_is_classified_connection(engine: AsyncEngine) -> None:
    error = await _statement_error(engine, disconnect(rate=1.0))
    assert classify(error).category is ErrorCategory.CONNECTION


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("sqlstate", "category"),
    [
        ("40001", ErrorCategory.CONFLICT),
        ("40P01", ErrorCategory.CONFLICT),
        ("55P03", ErrorCategory.CONFLICT),
        ("57014", ErrorCategory.TIMEOUT),
    ],
)
async def test_injected_sqlstate_arrives_as_the_server_error(
    pg_engine: AsyncEngine, sqlstate: str, category: ErrorCategory
) -> None:
    error = await _statement_error(pg_engine, sqlstate_error(sqlstate, rate=1.0))
    assert isinstance(error, sa_exc.DBAPIError)
    assert error.orig is not None
    assert getattr(error.orig, "sqlstate", None) == sqlstate
    driver_error = error.orig.__cause__  # the adapter raised it "from" asyncpg's exception
    assert isinstance(driver_error, asyncpg.exceptions.PostgresError)
    assert driver_error.sqlstate == sqlstate
    assert not error.connection_invalidated
    assert classify(error).category is category


@pytest.mark.postgres
async def test_injected_error_aborts_the_transaction_like_a_real_one(
    pg_engine: AsyncEngine,
) -> None:
    strategy = sqlstate_error("40001", rate=1.0, when=lambda op: op.ordinal == 1)
    async with pg_engine.connect() as conn:
        with FaultInjector(pg_engine, strategy, seed=1):
            with pytest.raises(sa_exc.DBAPIError):
                await conn.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.DBAPIError) as info:
                await conn.execute(text("SELECT 2"))
    assert getattr(info.value.orig, "sqlstate", None) == "25P02"  # in_failed_sql_transaction


@pytest.mark.postgres
async def test_injected_admin_shutdown_really_terminates_the_backend(
    pg_engine: AsyncEngine, witness: Witness
) -> None:
    error = await _statement_error(pg_engine, sqlstate_error("57P01", rate=1.0))
    assert isinstance(error, sa_exc.DBAPIError)
    assert error.connection_invalidated
    assert classify(error).category is ErrorCategory.CONNECTION
    assert await witness.wait_sessions(0) == []


async def test_injected_sqlite_busy_is_classified_conflict(sqlite_engine: AsyncEngine) -> None:
    error = await _statement_error(sqlite_engine, sqlite_busy(rate=1.0))
    assert isinstance(error, sa_exc.OperationalError)
    assert getattr(error.orig, "sqlite_errorcode", None) == 5
    assert str(error.orig) == "database is locked"
    assert classify(error).category is ErrorCategory.CONFLICT


async def test_injected_hang_under_a_timeout_is_classified_timeout(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        with FaultInjector(engine, hang(rate=1.0), seed=1), pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(0.2):
                await conn.execute(text("SELECT 1"))
    assert classify(info.value).category is ErrorCategory.TIMEOUT


@pytest.mark.postgres
async def test_a_cancelled_hang_inside_a_transaction_leaves_no_session_behind(
    pg_engine: AsyncEngine, witness: Witness
) -> None:
    sessions = async_sessionmaker(pg_engine)
    states_before_hang: list[str] = []

    async def unit() -> None:
        async with asyncio.timeout(None) as timer, sessions.begin() as s:
            await s.execute(text("SELECT 1"))
            states_before_hang.extend(x["state"] for x in await witness.other_sessions())
            timer.reschedule(asyncio.get_running_loop().time() + 0.3)
            await s.execute(text("SELECT 2"))  # the database never answers this one

    injector = FaultInjector(pg_engine, hang(rate=1.0, when=r"SELECT 2"), seed=1)
    with injector, pytest.raises(TimeoutError):
        await unit()
    assert states_before_hang == ["idle in transaction"]
    assert injector.counts == {"hang": 1}
    # Cancelled in the driver call: SQLAlchemy invalidates the connection, as it
    # does for a real cancelled query; nothing stays "idle in transaction".
    assert await witness.wait_sessions(0) == []


async def test_a_hang_with_a_duration_raises_timeout_error(engine: AsyncEngine) -> None:
    error = await _statement_error(engine, hang(rate=1.0, duration=0.05))
    assert isinstance(error, TimeoutError)
    assert classify(error).category is ErrorCategory.TIMEOUT


async def test_injected_connect_failure_is_classified_connection(engine: AsyncEngine) -> None:
    injector = FaultInjector(engine, connect_failure(rate=1.0), seed=1)
    with injector, pytest.raises(ConnectionRefusedError) as info:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert classify(info.value).category is ErrorCategory.CONNECTION
    assert injector.counts == {"connect_failure": 1}
    assert injector.operations[Target.STATEMENT] == 0


async def test_a_hang_at_connect_raises_timeout_error_and_no_connection_is_made(
    engine: AsyncEngine,
) -> None:
    injector = FaultInjector(engine, hang(rate=1.0, duration=0.05, on="connect"), seed=1)
    with injector, pytest.raises(TimeoutError) as info:
        async with engine.connect():
            pass
    assert classify(info.value).category is ErrorCategory.TIMEOUT
    assert engine.pool.checkedout() == 0
    assert injector.counts == {"hang": 1}


@pytest.mark.postgres
async def test_injected_too_many_connections_at_connect_is_classified_overload(
    pg_engine: AsyncEngine,
) -> None:
    injector = FaultInjector(pg_engine, sqlstate_error("53300", rate=1.0, on="connect"), seed=1)
    # Raised from the driver's connect call, it reaches the caller as a real one does:
    # wrapped in DBAPIError on SQLAlchemy 2.1, the raw asyncpg exception on 2.0.
    with injector, pytest.raises((sa_exc.DBAPIError, asyncpg.PostgresError)) as info:
        async with pg_engine.connect():
            pass
    assert find_sqlstate(info.value) == "53300"
    assert classify(info.value).category is ErrorCategory.OVERLOAD


async def test_latency_delays_the_statement_which_then_succeeds(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        with FaultInjector(engine, latency(0.1, rate=1.0), seed=1) as injector:
            start = time.monotonic()
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            elapsed = time.monotonic() - start
    assert elapsed >= 0.09  # asyncio may wake a timer a hair early; no upper bound
    assert [e.kind for e in injector.log] == [Kind.LATENCY]


async def test_when_limits_faults_to_matching_statements(items: AsyncEngine) -> None:
    async with items.connect() as conn:
        with FaultInjector(items, conflict_fault(items, rate=1.0, when=r"^\s*insert")) as injector:
            assert (await conn.execute(text("SELECT count(*) FROM chaos_items"))).scalar_one() == 0
            with pytest.raises(sa_exc.DBAPIError):
                await conn.execute(text("INSERT INTO chaos_items (id) VALUES (1)"))
    assert [(e.ordinal, e.statement) for e in injector.log] == [
        (2, "INSERT INTO chaos_items (id) VALUES (1)")
    ]


# -- @resilient recovers from transient injected faults ------------------------------------


TRANSIENT: dict[str, Callable[[AsyncEngine], Strategy]] = {
    "disconnect": lambda engine: disconnect(rate=1.0),
    "disconnect_after_read": lambda engine: disconnect(rate=1.0, phase="after", when=r"^\s*select"),
    "conflict": lambda engine: conflict_fault(engine, rate=1.0),
    "hang": lambda engine: hang(rate=1.0, duration=0.05),
}
"""Faults that a retry of the whole unit of work gets past."""


@pytest.mark.parametrize("which", list(TRANSIENT))
async def test_resilient_recovers_from_injected_transient_faults(
    items: AsyncEngine, which: str, no_waits: None
) -> None:
    sessions = async_sessionmaker(items)
    injector = FaultInjector(items, seed=3)
    strategy = injector.add(TRANSIENT[which](items))
    # Two injections, then the fault stops: enabled as a predicate.
    strategy.enabled = lambda: injector.counts[strategy.name] < 2
    attempts = 0

    @resilient(retries=3, breaker=False)
    async def add_item() -> int:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as s:
            before = (await s.execute(text("SELECT count(*) FROM chaos_items"))).scalar_one()
            await s.execute(text("INSERT INTO chaos_items (id, note) VALUES (1, 'x')"))
        return int(before)

    with injector:
        assert await add_item() == 0
    assert attempts == 3
    assert injector.counts[strategy.name] == 2
    assert await count_items(items) == 1


async def test_resilient_timeout_ends_an_injected_hang_and_the_retry_succeeds(
    engine: AsyncEngine, no_waits: None
) -> None:
    attempts = 0

    @resilient(timeout=1.0, retries=2, breaker=False)
    async def read() -> int:
        nonlocal attempts
        attempts += 1
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    first_only = hang(rate=1.0, when=lambda op: op.ordinal == 1)
    with FaultInjector(engine, first_only, seed=1) as injector:
        assert await read() == 1
    assert attempts == 2
    assert injector.counts == {"hang": 1}


# -- switching and scope ------------------------------------------------------------------


async def test_the_master_switch_turns_injection_off_and_on_at_run_time(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        with FaultInjector(engine, conflict_fault(engine, rate=1.0), seed=1) as injector:
            injector.enabled = False
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            injector.enabled = True
            with pytest.raises(sa_exc.DBAPIError):
                await conn.execute(text("SELECT 1"))
    assert injector.operations[Target.STATEMENT] == 2
    assert injector.faulted() == [2]


async def test_a_strategy_can_be_disabled_at_run_time(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        with FaultInjector(engine, conflict_fault(engine, rate=1.0, name="c"), seed=1) as injector:
            injector["c"].enabled = False
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            injector["c"].enabled = True
            with pytest.raises(sa_exc.DBAPIError):
                await conn.execute(text("SELECT 1"))
    assert injector.counts == {"c": 1}


def listener_counts(engine: AsyncEngine) -> list[int]:
    """How many listeners each hook the injector uses has (read afresh: SQLAlchemy
    replaces a dispatch collection when the first instance listener arrives)."""
    sync_engine = engine.sync_engine
    return [
        len(sync_engine.dispatch.before_cursor_execute),
        len(sync_engine.dialect.dispatch.do_execute),
        len(sync_engine.dialect.dispatch.do_executemany),
        len(sync_engine.dialect.dispatch.do_execute_no_params),
        len(sync_engine.dialect.dispatch.do_connect),
    ]


async def test_detach_removes_every_listener_and_restores_commit(engine: AsyncEngine) -> None:
    before = listener_counts(engine)
    injector = FaultInjector(
        engine,
        disconnect(rate=1.0),
        disconnect(rate=1.0, on="commit", name="commit"),
        connect_failure(rate=1.0),
        seed=1,
    )
    dialect = engine.sync_engine.dialect
    injector.attach()
    assert listener_counts(engine) == [n + 1 for n in before]
    # Its COMMIT sits beneath resilient-db's COMMIT tracking, which sees its faults.
    assert inner_method(dialect, "do_commit") == injector._do_commit
    injector.detach()
    assert listener_counts(engine) == before
    assert inner_method(dialect, "do_commit") == type(dialect).do_commit.__get__(dialect)
    await engine.dispose()  # the next checkout connects: no connect fault either
    async with engine.begin() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert injector.operations == dict.fromkeys(Target, 0)
    assert injector.log == []


async def test_faults_are_scoped_to_their_engine(
    sqlite_engine: AsyncEngine, sqlite_url: str
) -> None:
    other = create_async_engine(sqlite_url)
    try:
        with FaultInjector(sqlite_engine, disconnect(rate=1.0), seed=1) as injector:
            async with other.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert injector.operations[Target.STATEMENT] == 0
    finally:
        await other.dispose()


async def test_only_one_injector_at_a_time_per_engine(sqlite_engine: AsyncEngine) -> None:
    with FaultInjector(sqlite_engine, seed=1):
        second = FaultInjector(sqlite_engine, seed=2)
        with pytest.raises(RuntimeError, match="another FaultInjector"):
            second.attach()
    with second:  # free again once the first is detached
        assert second.attached
