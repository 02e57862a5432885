"""ResilientEngine on a real PostgreSQL: witnesses from the database side."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Witness
from sqlalchemy import (
    Sequence,
    column,
    event,
    func,
    insert,
    literal_column,
    make_url,
    select,
    table,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from resilient_db import (
    AttemptTimeout,
    BulkheadFull,
    CircuitBreaker,
    CommitOutcomeUnknown,
    ConcurrentSessionUse,
    DeadlineExceeded,
    ResilientEngine,
    TimeoutExceeded,
    resilient,
)
from resilient_db._sqla import inner_method, replace_inner_method
from resilient_db.chaos import ChaosProxy, DropCommitAck
from resilient_db.testing import set_testing

pytestmark = pytest.mark.postgres

FAST = {"initial": 0.001, "max": 0.01}
ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
async def ledger(pg_engine: AsyncEngine) -> AsyncEngine:
    async with pg_engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS ledger"))
        await conn.execute(text("CREATE TABLE ledger (key text PRIMARY KEY, amount int)"))
        await conn.execute(text("DROP TABLE IF EXISTS accounts"))
        await conn.execute(text("CREATE TABLE accounts (id int PRIMARY KEY, balance int)"))
        await conn.execute(
            text("INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 5) AS g")
        )
    return pg_engine


def count_statements(engine: AsyncEngine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    return seen


async def backend_pid(db: ResilientEngine) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


# -- retry granularity ---------------------------------------------------------------------


@pytest.fixture
async def killed(ledger: AsyncEngine, witness: Witness) -> ResilientEngine:
    """An engine whose pooled connection lost its backend: the next statement on it
    fails with a lost connection (retried, or not, alone)."""
    db = ResilientEngine(ledger, timeout=5, retries=2, backoff=FAST, breaker=False)
    await witness.terminate(await backend_pid(db))
    await witness.wait_sessions(0)
    return db


async def test_a_read_outside_a_transaction_is_retried_alone(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=2, backoff=FAST, breaker=False)
    old = await backend_pid(db)
    await witness.terminate(old)
    await witness.wait_sessions(0)
    async with db.connect() as conn:
        balance = (await conn.execute(text("SELECT balance FROM accounts WHERE id = 1"))).scalar()
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
    assert balance == 100
    assert pid != old


async def test_a_write_outside_a_transaction_is_not_retried_alone(
    killed: ResilientEngine, witness: Witness
) -> None:
    async with killed.connect() as conn:
        with pytest.raises(sa_exc.DBAPIError):
            await conn.execute(text("INSERT INTO ledger VALUES ('w', 1)"))
    assert await witness.scalar("SELECT count(*) FROM ledger") == 0


async def test_an_idempotent_write_may_be_retried_alone(
    killed: ResilientEngine, witness: Witness
) -> None:
    upsert = text("INSERT INTO ledger VALUES ('w', 1) ON CONFLICT DO NOTHING").execution_options(
        idempotent=True
    )
    async with killed.connect() as conn:
        await conn.execute(upsert)
        await conn.commit()
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1


async def test_an_idempotent_write_retried_alone_keeps_the_connections_autocommit(
    killed: ResilientEngine, witness: Witness
) -> None:
    # The retry runs on a new DBAPI connection, which SQLAlchemy does not set to the
    # connection's own isolation level again: the write would run in a transaction
    # that nothing commits, and vanish at release although execute() returned.
    upsert = text("INSERT INTO ledger VALUES ('w', 1) ON CONFLICT DO NOTHING")
    async with killed.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(upsert, execution_options={"idempotent": True})
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1


async def test_a_select_that_writes_through_a_cte_is_not_retried_alone(
    killed: ResilientEngine, witness: Witness
) -> None:
    # Shaped like a read, it writes: retried after a lost connection in AUTOCOMMIT,
    # it would insert a second time whenever the first attempt had committed.
    ledger_table = table("ledger", column("key"), column("amount"))
    written = insert(ledger_table).values(key="w", amount=1).returning(ledger_table.c.key)
    async with killed.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(sa_exc.DBAPIError) as raised:
            await conn.execute(select(written.cte("written").c.key))
    assert "data-modifying CTE" in "\n".join(raised.value.__notes__)
    assert await witness.scalar("SELECT count(*) FROM ledger") == 0


async def test_a_statement_inside_a_transaction_is_never_retried_alone(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=2, backoff=FAST, breaker=False)
    async with db.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await witness.terminate(pid)
        await witness.wait_sessions(0)
        await asyncio.sleep(0.05)
        seen = count_statements(ledger)
        with pytest.raises(sa_exc.DBAPIError):
            await conn.execute(text("SELECT balance FROM accounts WHERE id = 1"))
        assert len(seen) == 1


async def test_killed_mid_transaction_before_commit_retries_the_unit_once(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=10, retries=3, backoff=FAST, breaker=False)
    attempts = 0

    async def book(session: AsyncSession, key: str) -> str:
        nonlocal attempts
        attempts += 1
        await session.execute(text("INSERT INTO ledger VALUES (:k, 10)"), {"k": key})
        if attempts == 1:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await witness.terminate(pid)
            await witness.wait_sessions(0)
            await asyncio.sleep(0.05)
            await session.execute(text("SELECT 1"))
        return key

    assert await db.run_transaction(book, "k1") == "k1"
    assert attempts == 2
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'k1'") == 1


async def test_only_the_outermost_unit_retries(ledger: AsyncEngine) -> None:
    db = ResilientEngine(ledger, timeout=10, retries=3, backoff=FAST, breaker=False)
    inner_calls = 0

    async def flaky(session: AsyncSession) -> None:
        nonlocal inner_calls
        inner_calls += 1
        if inner_calls == 1:
            raise ConnectionResetError("blip")

    @resilient(retries=2, breaker=False)
    async def outer() -> None:
        await db.run_transaction(flaky)

    with set_testing():
        await outer()
    assert inner_calls == 2  # one outer retry, no inner retries on top


# -- ambiguous commits ---------------------------------------------------------------------


@pytest.fixture
def proxy(upstream: str) -> Any:
    with ChaosProxy(upstream) as running:
        yield running


@pytest.fixture
async def proxied(
    proxy: ChaosProxy, pg_url: str, ledger: AsyncEngine
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(proxy.proxied_url(pg_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def verifying(proxied: AsyncEngine) -> ResilientEngine:
    """An engine behind the proxy that verifies the outcome of a lost COMMIT."""
    return ResilientEngine(
        proxied, timeout=10, retries=3, backoff=FAST, breaker=False, verify_commits=True
    )


async def book(session: AsyncSession, key: str) -> str:
    await session.execute(text("INSERT INTO ledger VALUES (:k, 10)"), {"k": key})
    return f"booked {key}"


async def test_lost_commit_ack_without_verification_is_not_retried(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    db = ResilientEngine(proxied, timeout=10, retries=3, backoff=FAST, breaker=False)
    proxy.add_toxic(DropCommitAck(count=1))
    with pytest.raises(CommitOutcomeUnknown):
        await db.run_transaction(book, "pay-1")
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'pay-1'") == 1


async def test_lost_commit_ack_is_verified_as_committed(
    verifying: ResilientEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    proxy.add_toxic(DropCommitAck(count=1))
    assert await verifying.run_transaction(book, "pay-2") == "booked pay-2"
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'pay-2'") == 1


class _Base(DeclarativeBase):
    pass


class _Entry(_Base):
    __tablename__ = "ledger"
    key: Mapped[str] = mapped_column(primary_key=True)
    amount: Mapped[int | None]


async def test_lost_commit_ack_of_an_orm_write_flushed_at_commit_is_verified(
    verifying: ResilientEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    # The INSERT is sent by the flush inside COMMIT, after the transaction id is
    # read: an id read before the flush is NULL, "nothing written", and a retry
    # would write the row twice.

    async def add(session: AsyncSession) -> None:
        session.add(_Entry(key="orm-1", amount=1))

    proxy.add_toxic(DropCommitAck(count=1))
    await verifying.run_transaction(add)  # verified as committed
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'orm-1'") == 1


async def test_lost_commit_ack_of_a_write_made_by_a_before_commit_hook_is_verified(
    verifying: ResilientEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    # An audit row added by a `before_commit` hook is flushed inside COMMIT, after
    # anything the wrapper could send before calling it: the transaction id must be
    # read at the COMMIT itself, or it is NULL and the lost COMMIT is retried.
    attempts = 0

    async def read_then_audit(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text("SELECT count(*) FROM accounts"))
        n = attempts

        def audit(sync_session: Any) -> None:
            sync_session.add(_Entry(key=f"audit-{n}", amount=1))

        event.listen(session.sync_session, "before_commit", audit)

    proxy.add_toxic(DropCommitAck(count=1))
    await verifying.run_transaction(read_then_audit)  # verified as committed
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1
    assert attempts == 1


async def test_verified_commits_of_a_session_bound_to_postgresql_and_sqlite(
    ledger: AsyncEngine, sqlite_engine: AsyncEngine, witness: Witness
) -> None:
    # One COMMIT per database bound: the transaction id is read on PostgreSQL's
    # only. Asked of SQLite too, the read failed there and SQLite's COMMIT was
    # never sent, while the session reported success.
    async with sqlite_engine.begin() as conn:
        await conn.execute(text("CREATE TABLE notes (key text PRIMARY KEY)"))
    pg_rows = table("ledger", column("key"), column("amount"))
    sqlite_rows = table("notes", column("key"))
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False, verify_commits=True)
    sessions = db.sessionmaker(binds={pg_rows: ledger, sqlite_rows: sqlite_engine})
    async with sessions() as session:
        await session.execute(insert(pg_rows).values(key="both", amount=1))
        await session.execute(insert(sqlite_rows).values(key="both"))
        await session.commit()
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1
    async with sqlite_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM notes"))).scalar() == 1


async def create_notes(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS notes"))
        await conn.execute(text("CREATE TABLE notes (key text PRIMARY KEY)"))


def two_database_writer(
    ledger_engine: AsyncEngine, notes_engine: AsyncEngine
) -> Callable[[str], Awaitable[None]]:
    """Write a key to `ledger` and to `notes`, each on its engine, in one session of
    a verifying engine (one COMMIT per database), and commit."""
    db = ResilientEngine(
        ledger_engine, timeout=5, retries=0, breaker=False, verify_commits=True, verify_timeout=1
    )
    ledger_rows = table("ledger", column("key"), column("amount"))
    notes_rows = table("notes", column("key"))
    sessions = db.sessionmaker(binds={ledger_rows: ledger_engine, notes_rows: notes_engine})

    async def write_both(key: str) -> None:
        async with sessions() as session:
            await session.execute(insert(ledger_rows).values(key=key, amount=1))
            await session.execute(insert(notes_rows).values(key=key))
            await session.commit()

    return write_both


async def test_a_lost_commit_on_one_of_two_databases_is_never_verified_by_the_other(
    ledger: AsyncEngine, pg_url: str, witness: Witness
) -> None:
    # A session bound to two PostgreSQL engines sends two COMMITs, in an order of
    # SQLAlchemy's choosing. When the second is lost, the first one's transaction
    # id says "committed": the lost one must be settled by its own.
    other = create_async_engine(pg_url)
    try:
        await create_notes(other)
        original = inner_method(other.sync_engine.dialect, "do_commit")

        def lost(dbapi_connection: Any) -> None:
            dbapi_connection.driver_connection.terminate()  # never reaches the server
            raise ConnectionResetError("connection lost during COMMIT")

        replace_inner_method(other.sync_engine.dialect, "do_commit", lost)
        write_both = two_database_writer(ledger, other)
        for n in range(6):  # both orders, almost surely
            with pytest.raises((CommitOutcomeUnknown, sa_exc.DBAPIError, OSError)) as raised:
                await write_both(f"k{n}")
            committed = await witness.scalar("SELECT count(*) FROM ledger WHERE key = $1", f"k{n}")
            if committed:  # the first COMMIT went through: partly committed, not a success
                assert isinstance(raised.value, CommitOutcomeUnknown)
        replace_inner_method(other.sync_engine.dialect, "do_commit", original)
    finally:
        await other.dispose()


async def test_a_lost_first_commit_of_two_databases_is_no_success_if_the_second_never_went(
    proxied: AsyncEngine, proxy: ChaosProxy, ledger: AsyncEngine, witness: Witness
) -> None:
    # Bind A's COMMIT (through the proxy) is applied and its answer lost. When
    # SQLAlchemy sends it first, B's COMMIT is never sent: A verifies as committed,
    # and that alone must not pass for the session's success.
    await create_notes(ledger)
    write_both = two_database_writer(proxied, ledger)
    for n in range(6):  # both orders, almost surely
        proxy.add_toxic(DropCommitAck(count=1, name=f"lost-{n}"))
        try:
            await write_both(f"k{n}")
            succeeded = True
        except CommitOutcomeUnknown:
            succeeded = False
        proxy.remove_toxic(f"lost-{n}")
        notes = await witness.scalar("SELECT count(*) FROM notes WHERE key = $1", f"k{n}")
        assert not succeeded or notes == 1


async def test_a_verified_commit_is_never_credited_with_another_tasks_commit(
    ledger: AsyncEngine,
) -> None:
    # Tasks a unit starts share its attempt, and its record of COMMITs: A's failed
    # commit must be settled by A's COMMITs only, not by B's that returned.
    db = ResilientEngine(ledger, timeout=10, retries=0, breaker=False, verify_commits=True)
    sessions = db.sessionmaker()
    outcome: dict[str, str] = {}

    @resilient(timeout=10, retries=0, breaker=False)
    async def unit() -> None:
        b_inserted = asyncio.Event()

        async def task_b() -> None:
            async with sessions() as session:
                await session.execute(text("INSERT INTO ledger VALUES ('k', 2)"))
                b_inserted.set()
                await asyncio.sleep(0.3)  # A's flush at COMMIT now waits on B's row
                await session.commit()

        async def task_a() -> None:
            await b_inserted.wait()
            async with sessions() as session:
                session.add(_Entry(key="k", amount=1))
                try:
                    await session.commit()
                    outcome["a"] = "committed"
                except sa_exc.IntegrityError:
                    outcome["a"] = "duplicate key"

        await asyncio.gather(task_a(), task_b())

    await unit()
    assert outcome == {"a": "duplicate key"}


async def test_an_error_after_an_answered_commit_is_not_taken_for_a_verified_one(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False, verify_commits=True)

    def after_commit(sync_session: Any) -> None:
        raise RuntimeError("after_commit hook failed")

    async with db.sessionmaker()() as session:
        event.listen(session.sync_session, "after_commit", after_commit)
        await session.execute(text("INSERT INTO ledger VALUES ('h', 1)"))
        with pytest.raises(RuntimeError, match="after_commit hook failed"):
            await session.commit()
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1


async def test_a_connection_is_usable_after_its_lost_commit_was_verified(
    verifying: ResilientEngine, proxy: ChaosProxy
) -> None:
    proxy.add_toxic(DropCommitAck(count=1))
    async with verifying.connect() as conn:
        await conn.execute(text("INSERT INTO ledger VALUES ('v', 1)"))
        await conn.commit()  # verified as committed
        assert (await conn.execute(text("SELECT count(*) FROM ledger"))).scalar() == 1


async def test_the_units_timer_bounds_what_follows_a_verified_commit(
    verifying: ResilientEngine, proxy: ChaosProxy
) -> None:
    # The verification pauses the unit's timer (it has a budget of its own); it
    # must resume, or the rest of the attempt runs without any bound.
    sessions = verifying.sessionmaker()

    @resilient(timeout=1.5, retries=0, breaker=False)
    async def unit() -> None:
        async with sessions.begin() as session:
            await session.execute(text("INSERT INTO ledger VALUES ('u', 1)"))
        proxy.half_open()
        async with sessions.begin() as session:
            await session.execute(text("SELECT 1"))

    proxy.add_toxic(DropCommitAck(count=1))
    assert await seconds_to_fail(proxy, unit, (TimeoutExceeded, CommitOutcomeUnknown)) < 3.0


async def test_lost_commit_ack_of_a_read_only_transaction_is_simply_retried(
    verifying: ResilientEngine, proxy: ChaosProxy
) -> None:
    attempts = 0

    async def read(session: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        return int((await session.execute(text("SELECT count(*) FROM accounts"))).scalar_one())

    proxy.add_toxic(DropCommitAck(count=1))
    assert await verifying.run_transaction(read) == 5
    assert attempts == 2


async def test_lost_commit_ack_in_a_decorated_unit_with_sessions(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    db = ResilientEngine(proxied, timeout=10, retries=3, breaker=False, verify_commits=True)
    sessions = db.sessionmaker()

    @resilient(timeout=10, retries=3, breaker=False)
    async def place(key: str) -> str:
        async with sessions.begin() as s:
            await s.execute(text("INSERT INTO ledger VALUES (:k, 1)"), {"k": key})
        return "placed"

    proxy.add_toxic(DropCommitAck(count=1))
    assert await place("o-1") == "placed"
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'o-1'") == 1


async def test_300_random_cancellations_leave_no_session_and_no_duplicate(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False, verify_commits=True)
    rng = random.Random(7)
    acknowledged: set[str] = set()

    async def unit(n: int) -> None:
        key = f"c{n}"
        await db.run_transaction(book, key)
        acknowledged.add(key)

    for batch in range(30):
        tasks = [asyncio.ensure_future(unit(batch * 10 + i)) for i in range(10)]
        await asyncio.sleep(rng.uniform(0, 0.02))
        for task in tasks:
            if rng.random() < 0.8:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]
    rows = {r["key"] for r in await witness.conn.fetch("SELECT key FROM ledger")}
    assert acknowledged <= rows  # acknowledged writes are all there
    assert rows <= {f"c{n}" for n in range(300)}  # nothing else
    assert len(acknowledged) < 300  # the cancellations did bite
    sessions = await witness.other_sessions()
    assert all(s["state"] == "idle" for s in sessions)  # pooled, none idle in transaction
    await db.dispose()
    assert await witness.wait_sessions(0) == []


@pytest.mark.parametrize("owner", ["connection", "session"])
async def test_run_sync_is_one_guarded_operation(
    ledger: AsyncEngine, witness: Witness, owner: str
) -> None:
    def sleep(sync: Any) -> None:
        sync.execute(text("SELECT pg_sleep(5)"))

    db = ResilientEngine(ledger, timeout=0.5, retries=0, breaker=False)

    async def run_sync() -> None:
        if owner == "connection":
            async with db.connect() as conn:
                await conn.run_sync(sleep)
        else:
            async with db.sessionmaker()() as session:
                await session.run_sync(sleep)

    started = time.monotonic()
    with pytest.raises(TimeoutExceeded):
        await run_sync()
    assert time.monotonic() - started < 3  # not the 5 s the server would take
    assert await server_stops_sleeping(witness)


@pytest.fixture
def sessions(ledger: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Guarded sessions on the test database (timeout 5 s, no retries, no breaker)."""
    return ResilientEngine(ledger, timeout=5, retries=0, breaker=False).sessionmaker()


async def test_a_sessions_connection_keeps_the_isolation_level_asked_for(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # SQLAlchemy's way to set a transaction's isolation level: the options must
    # reach the checkout, not be dropped by a checkout of ours before it.
    async with sessions.begin() as session:
        conn = await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        level = (await conn.execute(text("SHOW transaction_isolation"))).scalar()
        limit = (await session.execute(text("SHOW statement_timeout"))).scalar()
    assert level == "serializable"
    assert limit not in (None, "0")  # the settings still went, before the first statement


async def test_a_savepoint_through_a_sessions_connection_comes_after_the_settings(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Sent inside the savepoint, the settings would vanish with its rollback.
    async with sessions.begin() as session:
        conn = await session.connection()
        savepoint = await conn.begin_nested()
        await conn.execute(text("SELECT 1"))
        await savepoint.rollback()
        limit = (await session.execute(text("SHOW statement_timeout"))).scalar()
    assert limit not in (None, "0")


async def test_set_transaction_through_a_sessions_connection_comes_first(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions.begin() as session:
        conn = await session.connection()
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        level = (await conn.execute(text("SHOW transaction_isolation"))).scalar()
    assert level == "serializable"


async def test_our_server_timeout_through_a_sessions_connection_is_our_timeout_error(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=0.6, retries=0, breaker=False, server_timeout_margin=0.3)
    async with db.sessionmaker()() as session, session.begin():
        conn = await session.connection()
        with pytest.raises(AttemptTimeout) as info:
            await conn.execute(text("SELECT pg_sleep(3)"))
    assert "statement timeout" in str(info.value.__cause__)


async def test_a_sessions_connection_and_the_session_are_one_task_at_a_time(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False)
    async with db.sessionmaker()() as session:
        conn = await session.connection()
        busy = asyncio.create_task(session.execute(text("SELECT pg_sleep(0.3)")))
        await asyncio.sleep(0.05)
        with pytest.raises(ConcurrentSessionUse):
            await conn.execute(text("SELECT 1"))
        await busy


# -- deadlines reach the server ----------------------------------------------------------


async def test_statements_through_a_sessions_connection_are_guarded(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=0.5, retries=0, breaker=False)
    async with db.sessionmaker()() as session:
        conn = await session.connection()
        started = time.monotonic()
        with pytest.raises(TimeoutExceeded):
            await conn.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 3  # not the 5 s the server would take
    assert await server_stops_sleeping(witness)


async def server_stops_sleeping(witness: Witness) -> bool:
    """Whether, within 2 s, no session of the database is still running pg_sleep."""
    for _ in range(40):
        sessions = await witness.other_sessions()
        if not any(s["state"] == "active" and "pg_sleep" in s["query"] for s in sessions):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_server_ends_a_statement_past_the_deadline_and_the_connection_is_kept(
    ledger: AsyncEngine,
) -> None:
    # A margin wide enough for a noisy host: the server's 57014 must win the race
    # against the client's timer for the connection to be kept.
    db = ResilientEngine(ledger, timeout=0.5, retries=0, breaker=False, server_timeout_margin=0.25)
    before = await backend_pid(db)

    async def sleepy(session: AsyncSession) -> None:
        await session.execute(text("SELECT pg_sleep(5)"))

    with pytest.raises(AttemptTimeout) as info:
        await db.run_transaction(sleepy)
    assert "57014" in repr(info.value.__cause__) or "statement timeout" in str(info.value.__cause__)
    assert await backend_pid(db) == before  # the server ended it cleanly: same connection


async def test_frozen_server_the_client_gives_up_in_time_and_replaces_the_connection(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    before = await backend_pid(db)
    proxy.half_open()
    started = time.monotonic()
    with pytest.raises(TimeoutExceeded):
        await db.run_transaction(book, "frozen")
    elapsed = time.monotonic() - started
    proxy.half_open(False)
    assert elapsed < 1.5  # bound: 0.5 + ABORT_GRACE; a plain asyncio.timeout takes 2.5 s
    assert await backend_pid(db) != before


async def test_a_statement_on_a_frozen_server_outside_a_transaction_is_bounded(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness, ledger: AsyncEngine
) -> None:
    # `db.connect()`'s statements are timed by their connection (no attempt timer):
    # the statement is still bounded, and its connection discarded.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    async with db.connect() as conn:
        await conn.execute(text("SELECT 1"))  # connected: only the statement is frozen
        proxy.half_open()
        elapsed = await seconds_to_fail(proxy, lambda: conn.execute(text("SELECT 2")))
    assert elapsed < 1.5  # bound: 0.5 + ABORT_GRACE, with slack for a noisy machine
    assert proxied.pool.checkedout() == 0  # type: ignore[attr-defined]
    await proxied.dispose()
    await ledger.dispose()  # the fixture's own pooled connection
    assert await witness.wait_sessions(0) == []  # the aborted backend is gone too


async def seconds_to_fail(
    proxy: ChaosProxy,
    call: Callable[[], Awaitable[object]],
    errors: type[BaseException] | tuple[type[BaseException], ...] = TimeoutExceeded,
) -> float:
    """How long ``call()`` takes to fail with our timeout while the proxy is frozen
    (it thaws after): 0.5 s + ABORT_GRACE is the bound, 2 s leaves slack for a noisy
    machine, 10 s is the safety net if nothing bounds it."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(10):
            with pytest.raises(errors):
                await call()
    finally:
        proxy.half_open(False)
    return time.monotonic() - started


async def test_what_a_commit_sends_first_is_bounded_too(
    proxied: AsyncEngine, proxy: ChaosProxy
) -> None:
    # A transaction with no statement: with verify_commits, the transaction id is
    # read on the connection just before its COMMIT. On a frozen server that read
    # must be bounded by the COMMIT's timeout like the COMMIT itself.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False, verify_commits=True)
    async with db.connect() as conn:
        await conn.execute(text("SELECT 1"))  # a warm connection

    async def empty_transaction_on_a_frozen_server() -> None:
        async with db.begin():
            proxy.half_open()

    assert await seconds_to_fail(proxy, empty_transaction_on_a_frozen_server) < 2.0


async def test_what_a_begun_transactions_first_statement_sends_first_is_bounded_too(
    proxied: AsyncEngine, proxy: ChaosProxy
) -> None:
    # db.begin(): the server-side settings go before the first statement. On a frozen
    # server they must be bounded by that statement's timeout like the statement.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    async with db.begin() as conn:
        await conn.execute(text("SELECT 1"))  # a warm connection, the default read

    async def first_statement_on_a_frozen_server() -> None:
        async with db.begin() as conn:
            proxy.half_open()
            await conn.execute(text("SELECT 1"))

    assert await seconds_to_fail(proxy, first_statement_on_a_frozen_server) < 2.0


async def _savepoint_on_a_frozen_server(db: ResilientEngine, proxy: ChaosProxy) -> None:
    async with db.connect() as conn, conn.begin():
        await conn.execute(text("SELECT 1"))
        proxy.half_open()
        await conn.begin_nested()


async def _flush_at_session_savepoint_on_a_frozen_server(
    db: ResilientEngine, proxy: ChaosProxy
) -> None:
    # session.begin_nested() flushes first (its SAVEPOINT waits for a statement).
    async with db.sessionmaker()() as session, session.begin():
        await session.execute(text("SELECT 1"))
        session.add(_Entry(key="s", amount=1))
        proxy.half_open()
        await session.begin_nested()


async def _release_on_a_frozen_server(db: ResilientEngine, proxy: ChaosProxy) -> None:
    async with db.connect() as conn, conn.begin(), conn.begin_nested():
        await conn.execute(text("SELECT 1"))
        proxy.half_open()


@pytest.mark.parametrize(
    "sends",
    [
        _savepoint_on_a_frozen_server,
        _flush_at_session_savepoint_on_a_frozen_server,
        _release_on_a_frozen_server,
    ],
    ids=["SAVEPOINT", "flush at session SAVEPOINT", "RELEASE SAVEPOINT"],
)
async def test_savepoints_are_bounded_like_statements(
    proxied: AsyncEngine, proxy: ChaosProxy, sends: Any
) -> None:
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    assert await seconds_to_fail(proxy, lambda: sends(db, proxy)) < 2.0


@pytest.mark.parametrize("nested", [False, True], ids=["ROLLBACK", "ROLLBACK TO SAVEPOINT"])
async def test_a_failed_block_on_a_frozen_server_keeps_its_error_and_is_bounded(
    proxied: AsyncEngine, proxy: ChaosProxy, nested: bool
) -> None:
    # The block's error says what went wrong; the rollback that could not reach the
    # server only costs the connection (discarded, logged), within the timeout.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)

    async def fail_on_a_frozen_server() -> None:
        async with asyncio.timeout(10), db.connect() as conn, conn.begin():
            if nested:
                await conn.begin_nested()
            await conn.execute(text("SELECT 1"))
            proxy.half_open()
            raise ZeroDivisionError

    started = time.monotonic()
    with pytest.raises(ZeroDivisionError):
        await fail_on_a_frozen_server()
    elapsed = time.monotonic() - started
    proxy.half_open(False)
    assert elapsed < 2.0  # 0.5 s + ABORT_GRACE, with slack for a noisy machine
    assert proxied.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_savepoint_block_releases_and_its_rows_commit_with_the_transaction(
    ledger: AsyncEngine, witness: Witness
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False)

    async def undone(session: AsyncSession) -> None:
        async with session.begin_nested():
            await session.execute(text("INSERT INTO ledger VALUES ('undone', 1)"))
            raise ZeroDivisionError

    async with db.sessionmaker().begin() as session:
        async with session.begin_nested():
            await session.execute(text("INSERT INTO ledger VALUES ('kept', 1)"))
        with pytest.raises(ZeroDivisionError):
            await undone(session)
    rows = await witness.conn.fetch("SELECT key FROM ledger ORDER BY key")
    assert [r["key"] for r in rows] == ["kept"]


async def _release_a_connection(db: ResilientEngine, proxy: ChaosProxy) -> None:
    async with db.connect() as conn:
        await conn.execute(text("SELECT 1"))  # its transaction is rolled back at release
        proxy.half_open()


async def _release_a_session(db: ResilientEngine, proxy: ChaosProxy) -> None:
    async with db.sessionmaker()() as session:
        await session.execute(text("SELECT 1"))
        proxy.half_open()


async def _reset_a_session(db: ResilientEngine, proxy: ChaosProxy) -> None:
    session = db.sessionmaker()()
    await session.execute(text("SELECT 1"))
    proxy.half_open()
    await session.reset()  # releases like close()


@pytest.mark.parametrize("release", [_release_a_connection, _release_a_session, _reset_a_session])
async def test_a_release_on_a_frozen_server_is_bounded_and_discards_the_connection(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness, ledger: AsyncEngine, release: Any
) -> None:
    # The ROLLBACK that releasing sends would wait for TCP to give up (minutes); the
    # block's work is done, so the release succeeds without the connection.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    started = time.monotonic()
    async with asyncio.timeout(10):
        await release(db, proxy)
    elapsed = time.monotonic() - started
    proxy.half_open(False)
    assert elapsed < 2.0  # 0.5 s + ABORT_GRACE, with slack for a noisy machine
    assert proxied.pool.checkedout() == 0  # type: ignore[attr-defined]
    await proxied.dispose()
    await ledger.dispose()  # the fixture's own pooled connection
    assert await witness.wait_sessions(0) == []  # the discarded one's backend is gone too


async def test_a_release_inside_a_unit_without_a_timeout_is_bounded_by_the_engine(
    proxied: AsyncEngine, proxy: ChaosProxy
) -> None:
    # No unit timer to lean on: the engine's own bound applies.
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)

    @resilient(retries=0, breaker=False)
    async def unit_without_timeout() -> None:
        await _release_a_connection(db, proxy)

    started = time.monotonic()
    async with asyncio.timeout(10):
        await unit_without_timeout()
    elapsed = time.monotonic() - started
    proxy.half_open(False)
    assert elapsed < 2.0  # 0.5 s + ABORT_GRACE, with slack for a noisy machine


async def test_an_explicit_rollback_on_a_frozen_server_is_bounded(
    proxied: AsyncEngine, proxy: ChaosProxy
) -> None:
    db = ResilientEngine(proxied, timeout=0.5, retries=0, breaker=False)
    async with db.sessionmaker()() as session:
        await session.execute(text("SELECT 1"))
        proxy.half_open()
        assert await seconds_to_fail(proxy, session.rollback) < 2.0
    assert proxied.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_server_timeout_in_the_flush_at_commit_is_our_timeout_error(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=0.5, retries=0, breaker=False)
    sessions = db.sessionmaker()

    async def flush_at_commit() -> None:
        async with sessions.begin() as session:
            session.add(_Entry(key="k", amount=1))  # INSERTed by the flush at COMMIT

    async with ledger.connect() as holder:
        await holder.execute(text("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(TimeoutExceeded) as info:
            await flush_at_commit()
        await holder.rollback()
    assert isinstance(info.value.__cause__, sa_exc.DBAPIError)  # the server's 57014


async def test_a_commit_cancelled_in_flight_is_reported_as_unknown(
    proxied: AsyncEngine, proxy: ChaosProxy, caplog: pytest.LogCaptureFixture
) -> None:
    db = ResilientEngine(proxied, timeout=10, retries=0, breaker=False)

    async def write() -> None:
        async with db.begin() as conn:
            await conn.execute(text("INSERT INTO ledger VALUES ('cancelled', 1)"))
            proxy.half_open()  # the COMMIT goes out and nothing comes back

    task = asyncio.ensure_future(write())
    await asyncio.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="resilient_db"):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    proxy.half_open(False)
    (record,) = [
        r
        for r in caplog.records
        if getattr(r, "resilient_db_event", "") == "commit_outcome_unknown"
    ]
    assert "cancelled after sending a COMMIT" in record.getMessage()


async def test_transaction_local_settings_do_not_leak_to_the_next_checkout(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=2, retries=0, breaker=False, lock_timeout=0.5)
    async with db.begin() as conn:
        inside = (await conn.execute(text("SHOW statement_timeout"))).scalar()
        locks = (await conn.execute(text("SHOW lock_timeout"))).scalar()
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
    async with db.connect() as conn:
        after = (await conn.execute(text("SHOW statement_timeout"))).scalar()
        locks_after = (await conn.execute(text("SHOW lock_timeout"))).scalar()
        same = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar() == pid
    # 2 s minus the 50 ms margin, minus what the attempt already used when it was sent
    assert inside.endswith("ms") and 1500 <= int(inside.removesuffix("ms")) <= 1950
    assert locks == "500ms"
    assert same  # the very same pooled connection...
    assert (after, locks_after) == ("0", "0")  # ...without the transaction's settings


@pytest.fixture
async def strict(ledger: AsyncEngine, pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose server sessions have a statement_timeout of their own: 1 s."""
    engine = create_async_engine(
        pg_url, connect_args={"server_settings": {"statement_timeout": "1000"}}
    )
    yield engine
    await engine.dispose()


async def test_no_server_round_trip_when_the_server_default_is_tighter(
    strict: AsyncEngine,
) -> None:
    db = ResilientEngine(strict, timeout=30, retries=0, breaker=False)
    seen = count_statements(strict)
    async with db.begin() as conn:
        await conn.execute(text("SELECT 1"))
    assert not any("set_config" in s for s in seen)


async def test_the_servers_own_statement_timeout_is_not_taken_for_ours(
    strict: AsyncEngine,
) -> None:
    # The server's own 1 s statement_timeout ends the query while the call still has
    # 0.6 s left; we sent none (1.55 s would not have been tighter), so the 57014 is
    # the server's, not our DeadlineExceeded, however little time remains.
    db = ResilientEngine(strict, deadline=1.6, retries=0, breaker=False)

    async def slow(session: AsyncSession) -> None:
        await session.execute(text("SELECT pg_sleep(2)"))

    with pytest.raises(sa_exc.DBAPIError, match="statement timeout"):
        await db.run_transaction(slow)


# -- the breaker, pools, failover, loops, concurrency -----------------------------------


async def test_an_open_breaker_sends_nothing_to_the_database(
    ledger: AsyncEngine, witness: Witness
) -> None:
    breaker = CircuitBreaker("ledger-db")
    db = ResilientEngine(ledger, timeout=2, breaker=breaker)
    await ledger.dispose()
    seen = count_statements(ledger)
    breaker.force_open()
    for _ in range(20):
        with pytest.raises(Exception, match="open"):
            await db.run_transaction(book, "never")
        with pytest.raises(Exception, match="open"):
            async with db.connect() as conn:
                await conn.execute(text("SELECT 1"))
    assert seen == []  # the same count as with no calls at all
    assert await witness.other_sessions() == []  # not even a connection was opened


async def test_checkouts_do_not_hide_failing_statements_from_the_breaker(
    ledger: AsyncEngine,
) -> None:
    # Checking a connection out of a warm pool says nothing about the database's
    # health; counted as a success, it would reset the consecutive-failure count
    # before every statement, and a database that times out every query would
    # never trip the breaker.
    breaker = CircuitBreaker("checkout-test", failure_threshold=3, failure_rate_threshold=None)
    db = ResilientEngine(ledger, timeout=0.1, retries=0, breaker=breaker)
    seen = count_statements(ledger)
    for _ in range(3):
        with pytest.raises(AttemptTimeout):
            async with db.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(2)"))
    assert breaker.state.value == "open"
    with pytest.raises(Exception, match="open"):
        async with db.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(2)"))
    assert seen.count("SELECT pg_sleep(2)") == 3  # the fourth never reached the server


async def test_a_failed_checkout_counts_for_the_breaker(pg_url: str) -> None:
    unreachable = create_async_engine(make_url(pg_url).set(port=1))
    breaker = CircuitBreaker("connect-test", failure_threshold=2, failure_rate_threshold=None)
    db = ResilientEngine(unreachable, timeout=2, retries=0, breaker=breaker)
    for _ in range(2):
        with pytest.raises((OSError, sa_exc.DBAPIError)):
            async with db.connect():
                pass
    await unreachable.dispose()
    assert breaker.state.value == "open"


async def test_a_read_only_refusal_empties_the_pool(ledger: AsyncEngine, witness: Witness) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=2, backoff=FAST, breaker=False)
    async with db.connect() as a, db.connect() as b:  # two pooled connections
        old = {
            (await a.execute(text("SELECT pg_backend_pid()"))).scalar(),
            (await b.execute(text("SELECT pg_backend_pid()"))).scalar(),
        }
    attempts = 0

    async def write(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await session.execute(text("SET TRANSACTION READ ONLY"))  # a demoted primary
        await session.execute(text("INSERT INTO ledger VALUES ('fo', 1)"))

    await db.run_transaction(write)
    assert attempts == 2
    async with db.connect() as a, db.connect() as b:
        new = {
            (await a.execute(text("SELECT pg_backend_pid()"))).scalar(),
            (await b.execute(text("SELECT pg_backend_pid()"))).scalar(),
        }
    assert old.isdisjoint(new)  # every connection of the old generation was replaced
    assert await witness.scalar("SELECT count(*) FROM ledger") == 1


async def test_pool_exhaustion_is_not_retried(pg_url: str) -> None:
    engine = create_async_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    db = ResilientEngine(engine, timeout=5, retries=3, breaker=CircuitBreaker("pool-test"))

    async with engine.connect() as hog:
        await hog.execute(text("SELECT 1"))
        with pytest.raises(sa_exc.TimeoutError) as info:
            await db.run_transaction(book, "never")
    await engine.dispose()
    assert not getattr(info.value, "__notes__", [])  # a retried error carries the attempts note
    assert db.policy.breaker is not None
    assert db.policy.breaker.snapshot().consecutive_failures == 0  # type: ignore[attr-defined]


async def test_pool_bulkhead_fails_fast_instead_of_waiting(pg_url: str) -> None:
    engine = create_async_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=30)
    db = ResilientEngine(engine, timeout=5, breaker=False, pool_bulkhead=True)
    async with db.connect() as hog:
        await hog.execute(text("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(BulkheadFull):
            await db.run_transaction(book, "x")
        assert time.monotonic() - started < 1.0  # not the 30 s pool_timeout
    await engine.dispose()


async def test_one_session_used_by_two_tasks_gets_a_clear_error(ledger: AsyncEngine) -> None:
    db = ResilientEngine(ledger, timeout=5, breaker=False)
    async with db.session() as session:
        first = asyncio.ensure_future(session.execute(text("SELECT pg_sleep(0.3)")))
        await asyncio.sleep(0.05)
        with pytest.raises(ConcurrentSessionUse, match="share the engine"):
            await session.execute(text("SELECT 1"))
        await first


async def test_a_commit_while_another_task_uses_the_session_is_refused_before_sending(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=5, breaker=False)
    async with db.session() as session:
        await session.execute(text("INSERT INTO ledger VALUES ('k', 1)"))
        first = asyncio.ensure_future(session.execute(text("SELECT pg_sleep(0.3)")))
        await asyncio.sleep(0.05)
        with pytest.raises(ConcurrentSessionUse, match="share the engine"):
            await session.commit()
        await first  # the statement in flight was not disturbed
        await session.commit()
    async with ledger.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM ledger"))).scalar() == 1


async def test_a_serializable_conflict_converges_and_money_is_conserved(
    ledger: AsyncEngine, witness: Witness
) -> None:
    # Heavy contention on purpose: conflicts are retried as often as it takes, so no
    # retry budget here (a budget is for outages, where retries add load to a sick server).
    db = ResilientEngine(
        ledger, timeout=10, retries=30, backoff=FAST, breaker=False, retry_budget=None
    )
    rng = random.Random(3)

    async def transfer(session: AsyncSession, src: int, dst: int, amount: int) -> None:
        await session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        total = (await session.execute(text("SELECT sum(balance) FROM accounts"))).scalar_one()
        assert total == 500
        await session.execute(
            text("UPDATE accounts SET balance = balance - :a WHERE id = :s"),
            {"a": amount, "s": src},
        )
        await session.execute(
            text("UPDATE accounts SET balance = balance + :a WHERE id = :d"),
            {"a": amount, "d": dst},
        )

    pairs = [rng.sample(range(1, 6), 2) for _ in range(20)]
    with set_testing():
        await asyncio.gather(*(db.run_transaction(transfer, s, d, 1) for s, d in pairs))
    assert await witness.scalar("SELECT sum(balance) FROM accounts") == 500


async def test_the_same_engine_works_from_a_second_event_loop(pg_url: str, tmp_path: Any) -> None:
    import sys

    script = tmp_path / "two_loops.py"
    script.write_text(
        "import asyncio\n"
        "from sqlalchemy import text\n"
        "from sqlalchemy.ext.asyncio import create_async_engine\n"
        "from resilient_db import ResilientEngine\n"
        f"db = ResilientEngine(create_async_engine({pg_url!r}), timeout=5, breaker=False)\n"
        "async def once():\n"
        "    async with db.connect() as conn:\n"
        "        return (await conn.execute(text('SELECT 41 + 1'))).scalar()\n"
        "print(asyncio.run(once()), asyncio.run(once()))\n"
        "async def both():\n"
        "    return await once()\n"
        "print(asyncio.run(both()))\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        "-X",
        "dev",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().split() == ["42", "42", "42"]
    assert stderr == b""  # no "attached to a different loop", no "Event loop is closed"


# -- streaming -----------------------------------------------------------------------------


async def test_a_stream_yields_rows_without_loading_them_all(ledger: AsyncEngine) -> None:
    db = ResilientEngine(ledger, timeout=10, breaker=False)
    seen = 0
    async with db.stream(
        text("SELECT g FROM generate_series(1, 100000) AS g"),
        execution_options={"yield_per": 100},
    ) as rows:
        async for _row in rows:
            seen += 1
            if seen == 150:
                break
    assert seen == 150
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_connections_stream_is_entered_or_awaited_as_sqlalchemys(
    ledger: AsyncEngine,
) -> None:
    db = ResilientEngine(ledger, timeout=10, breaker=False)
    series = text("SELECT g FROM generate_series(1, 3) AS g")
    async with db.connect() as conn:
        async with conn.stream(series) as rows:
            entered = [row[0] async for row in rows]
        awaited = [row[0] async for row in await conn.stream(series)]
        async with conn.stream_scalars(series) as scalars:
            scalars_entered = [value async for value in scalars]
        scalars_awaited = [value async for value in await conn.stream_scalars(series)]
    assert entered == awaited == scalars_entered == scalars_awaited == [1, 2, 3]
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"timeout": 0.3}, (AttemptTimeout, DeadlineExceeded)),
        # deadline= alone: nothing per attempt, yet the whole stream is bounded.
        ({"deadline": 0.3}, DeadlineExceeded),
    ],
    ids=["timeout", "deadline"],
)
async def test_the_deadline_covers_the_whole_stream(
    ledger: AsyncEngine, witness: Witness, settings: dict[str, float], expected: Any
) -> None:
    db = ResilientEngine(ledger, breaker=False, **settings)  # type: ignore[arg-type]

    async def slow_consumer() -> None:
        async with db.stream(
            text("SELECT g FROM generate_series(1, 100000) AS g"),
            execution_options={"yield_per": 10},
        ) as rows:
            async for _ in rows:
                await asyncio.sleep(0.01)

    started = time.monotonic()
    with pytest.raises(expected):
        await asyncio.wait_for(slow_consumer(), 10)  # unbounded would fail at 10 s
    assert time.monotonic() - started < 2.0
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]
    sessions = await witness.wait_sessions(0)
    assert [s for s in sessions if s["state"] != "idle"] == []


async def test_cancelling_mid_stream_cleans_up(ledger: AsyncEngine, witness: Witness) -> None:
    db = ResilientEngine(ledger, timeout=30, breaker=False)
    started = asyncio.Event()

    async def consume() -> None:
        async with db.stream(
            text("SELECT g FROM generate_series(1, 1000000) AS g"),
            execution_options={"yield_per": 10},
        ) as rows:
            async for _ in rows:
                started.set()
                await asyncio.sleep(0.001)

    task = asyncio.ensure_future(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]
    sessions = await witness.wait_sessions(0)
    assert [s for s in sessions if s["state"] != "idle"] == []


async def test_select_statements_are_detected_as_read_only() -> None:
    from resilient_db import is_read_only

    assert is_read_only(select(text("1")))
    assert not is_read_only(select(text("1")).with_for_update())
    assert is_read_only(text("WITH x AS (SELECT 1) SELECT * FROM x"))
    assert not is_read_only(text("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"))
    assert not is_read_only(text("SELECT nextval('s')"))
    assert not is_read_only(text("SELECT pg_try_advisory_lock(1)"))
    assert not is_read_only(text("UPDATE t SET x = 1"))
    assert is_read_only(text("UPDATE t SET x = 1").execution_options(idempotent=True))


@pytest.mark.parametrize(
    "where",
    [
        "cte in FROM",
        "add_cte",
        "cte in WHERE",
        "nextval()",
        "Sequence.next_value()",
        "pg_try_advisory_lock()",
        "literal nextval",
        "locking subquery",
    ],
)
async def test_a_select_that_writes_or_locks_anywhere_is_not_read_only(where: str) -> None:
    from resilient_db import is_read_only

    t = table("t", column("id"), column("x"))
    cte = insert(t).values(x=1).returning(t.c.id).cte("written")
    statement = {
        "cte in FROM": select(cte.c.id),
        "add_cte": select(t.c.id).add_cte(cte),
        "cte in WHERE": select(t.c.id).where(t.c.id.in_(select(cte.c.id))),
        "nextval()": select(func.nextval("s")),
        "Sequence.next_value()": select(Sequence("s").next_value()),
        "pg_try_advisory_lock()": select(func.pg_try_advisory_lock(1)),
        "literal nextval": select(literal_column("nextval('s')")),
        "locking subquery": select(select(t.c.id).with_for_update().subquery().c.id),
    }[where]
    assert not is_read_only(statement)
    assert is_read_only(statement, {"idempotent": True})


async def test_a_select_with_functions_subqueries_and_text_is_still_read_only() -> None:
    from resilient_db import is_read_only

    t = table("t", column("id"), column("x"))
    inner = select(t.c.id).where(text("x > 1")).subquery()
    assert is_read_only(select(func.count()).select_from(inner))


async def test_the_commit_of_conn_begin_is_tracked_like_db_begin(
    proxied: AsyncEngine, proxy: ChaosProxy, witness: Witness
) -> None:
    # `async with conn.begin():` on a guarded connection commits on exit; that
    # COMMIT must be bounded and tracked like every other one, not left to hang.
    db = ResilientEngine(proxied, timeout=1, retries=0, breaker=False)
    proxy.add_toxic(DropCommitAck(count=1))
    async with asyncio.timeout(10):
        with pytest.raises(CommitOutcomeUnknown):
            async with db.connect() as conn, conn.begin():
                await conn.execute(text("INSERT INTO ledger VALUES ('tx-1', 1)"))
    assert await witness.scalar("SELECT count(*) FROM ledger WHERE key = 'tx-1'") == 1


async def test_conn_begin_sends_the_server_side_deadline(ledger: AsyncEngine) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False)
    async with db.connect() as conn, conn.begin():
        setting = (await conn.execute(text("SHOW statement_timeout"))).scalar()
    assert setting not in (None, "0")  # SET LOCAL from the remaining time
    async with db.connect() as conn:  # and nothing leaks to the next checkout
        assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == "0"


@pytest.mark.parametrize("verify_commits", [False, True])
async def test_an_empty_session_transaction_sends_nothing(
    ledger: AsyncEngine, verify_commits: bool
) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False, verify_commits=verify_commits)
    seen = count_statements(ledger)
    async with db.sessionmaker().begin():
        pass
    assert seen == []
    assert ledger.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_an_empty_connection_transaction_sends_only_its_commit(ledger: AsyncEngine) -> None:
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False)
    seen = count_statements(ledger)
    async with db.begin():
        pass
    assert seen == []


async def test_a_rolled_back_empty_transaction_leaves_no_settings_to_the_next(
    ledger: AsyncEngine,
) -> None:
    # The settings wait for the first statement of the transaction begun; rolled
    # back before any, they must not go ahead of the next, implicit transaction's
    # statement (which could then no longer be retried alone).
    db = ResilientEngine(ledger, timeout=5, retries=0, breaker=False)
    seen = count_statements(ledger)
    async with db.sessionmaker()() as session:
        transaction = await session.begin()
        await transaction.rollback()
        await session.execute(text("SELECT 1"))
    assert seen == ["SELECT 1"]
