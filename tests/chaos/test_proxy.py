"""The chaos proxy against a real PostgreSQL: every fault is a real network fault.

Nothing of the database is mocked: asyncpg and SQLAlchemy talk to PostgreSQL
through a :class:`ChaosProxy`, the errors are the ones the driver raises on a
broken socket or a real ErrorResponse, and the database's own view (rows,
``pg_stat_activity`` through the ``witness``) says what really happened.
Timings are asserted only against generous bounds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import asyncpg
import pytest
from conftest import Witness
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from resilient_db import (
    AttemptTimeout,
    CommitOutcomeUnknown,
    ErrorCategory,
    classify,
    resilient,
)
from resilient_db.chaos.proxy import (
    ChaosProxy,
    DropCommitAck,
    FailFirstN,
    Latency,
    ResetPeer,
    Timeout,
)

pytestmark = pytest.mark.postgres

# SQLAlchemy may close a connection whose call timed out with close(timeout=2): on a
# silent network the error can surface as late as T + 2 s (see DB-FAILURE-FACTS).
SQLALCHEMY_CLOSE_WAIT = 2.0


@pytest.fixture
async def proxy(upstream: str) -> AsyncIterator[ChaosProxy]:
    async with ChaosProxy(upstream, seed=1, name="pg") as running:
        yield running


@pytest.fixture
async def engine(proxy: ChaosProxy, pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose every connection goes through the proxy."""
    proxied = create_async_engine(proxy.proxied_url(pg_url))
    try:
        yield proxied
    finally:
        await proxied.dispose()


@pytest.fixture
async def orders(pg_engine: AsyncEngine) -> str:
    async with pg_engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS chaos_orders"))
        await conn.execute(text("CREATE TABLE chaos_orders (id text PRIMARY KEY)"))
    return "chaos_orders"


@pytest.fixture(autouse=True)
def _no_proxy_thread_left() -> Iterator[None]:
    yield
    import threading

    left = [t.name for t in threading.enumerate() if t.name.startswith("chaos-proxy")]
    assert left == [], f"proxy threads left running: {left}"


async def _round_trip(conn: Any) -> float:
    start = time.perf_counter()
    assert await conn.fetchval("SELECT 1") == 1
    return time.perf_counter() - start


async def _median_rtt(conn: Any, n: int = 5) -> float:
    return statistics.median([await _round_trip(conn) for _ in range(n)])


async def _warm(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT 1")) == 1


def _caused_by(exc: BaseException, cls: type[BaseException]) -> bool:
    """``exc`` has a ``cls`` in its cause chain (SQLAlchemy → adapter → asyncpg)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, cls):
            return True
        seen = seen.__cause__
    return False


def _recording(errors: list[BaseException]) -> Callable[[BaseException], None]:
    """A classifier that only records what it sees (and lets the default decide)."""

    def record(exc: BaseException) -> None:
        errors.append(exc)

    return record


# -- plain forwarding ---------------------------------------------------------------


async def test_forwards_postgres_and_tracks_the_transaction_state(
    proxy: ChaosProxy, pg_dsn: str
) -> None:
    conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    try:
        states = []
        async with conn.transaction():
            assert await conn.fetchval("SELECT 41 + 1") == 42
            states.append(proxy.connections()[0].transaction_status)
        states.append(proxy.connections()[0].transaction_status)
    finally:
        await conn.close()
    assert states == ["T", "I"]
    stats = proxy.stats()
    assert stats.connections_accepted == 1
    assert stats.bytes_upstream > 0 and stats.bytes_downstream > 0


def test_sync_context_manager_serves_from_its_own_thread(upstream: str) -> None:
    import socket
    import struct

    with ChaosProxy(upstream) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.settimeout(5)
        s.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        answer = s.recv(1)
    assert answer in (b"N", b"S")  # the server's own one-byte answer
    assert not proxy.running


# -- latency ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["upstream", "downstream"])
async def test_latency_adds_the_configured_delay_to_each_round_trip(
    proxy: ChaosProxy, pg_dsn: str, stream: Literal["upstream", "downstream"]
) -> None:
    conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    try:
        before = await _median_rtt(conn)
        proxy.add_toxic(Latency(latency=0.1, stream=stream))
        added = await _median_rtt(conn) - before
    finally:
        await conn.close()
    assert 0.1 - 0.01 <= added <= 0.1 + 0.08


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
async def test_jitter_stays_within_its_bounds(
    proxy: ChaosProxy, pg_dsn: str, distribution: Literal["uniform", "normal"]
) -> None:
    conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    try:
        base = await _median_rtt(conn)
        proxy.add_toxic(
            Latency(latency=0.05, jitter=0.03, distribution=distribution, stream="upstream")
        )
        added = [await _round_trip(conn) - base for _ in range(12)]
    finally:
        await conn.close()
    delays = [r.value for r in proxy.fault_log() if r.action == "delay"]
    assert len(delays) >= 12
    assert all(v is not None and 0.02 <= v <= 0.08 for v in delays)
    assert max(delays) - min(delays) > 0.005  # it does vary
    assert all(0.02 - 0.005 <= a <= 0.08 + 0.08 for a in added)


async def test_the_same_seed_replays_the_same_decisions(upstream: str, pg_dsn: str) -> None:
    async def run(seed: int) -> dict[int, list[tuple[str, float | None]]]:
        toxic = Latency(latency=0.002, jitter=0.002, toxicity=0.5, stream="upstream")
        async with ChaosProxy(upstream, seed=seed, toxics=[toxic]) as proxy:
            for _ in range(4):  # one connection after the other: ordinals 1..4
                conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
                for _ in range(3):
                    await conn.fetchval("SELECT 1")
                await conn.close()
            log = proxy.fault_log()
        decisions: dict[int, list[tuple[str, float | None]]] = {}
        for record in log:
            decisions.setdefault(record.connection, []).append((record.action, record.value))
        # The first draws of each connection: chunking may vary after them.
        return {c: d[:4] for c, d in decisions.items()}

    first, again, other = await run(7), await run(7), await run(8)
    assert first == again
    assert first != other
    assert {c: d[0][0] for c, d in first.items()}.keys() == {1, 2, 3, 4}


# -- faults that break connections ----------------------------------------------------


async def test_reset_peer_is_a_connection_error_and_resilient_recovers(
    proxy: ChaosProxy, engine: AsyncEngine, no_waits: None
) -> None:
    await _warm(engine)
    proxy.add_toxic(ResetPeer(timeout=0, stream="upstream", name="rst"))
    errors: list[BaseException] = []
    attempts = 0

    @resilient(timeout=5, retries=3, breaker=False, classifier=_recording(errors))
    async def read() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            proxy.remove_toxic("rst")  # the fault was transient
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT 42")))

    assert await read() == 42
    assert attempts == 2 and len(errors) == 1
    assert isinstance(errors[0], sa_exc.DBAPIError)
    assert _caused_by(errors[0], asyncpg.ConnectionDoesNotExistError)
    assert _caused_by(errors[0], ConnectionResetError)  # a real RST
    assert classify(errors[0]).category is ErrorCategory.CONNECTION
    assert proxy.stats().faults["rst"] == 1


@pytest.mark.parametrize("mode", ["rst", "fin"])
async def test_kill_during_a_query_is_a_connection_error_and_resilient_recovers(
    proxy: ChaosProxy, engine: AsyncEngine, no_waits: None, mode: Literal["rst", "fin"]
) -> None:
    await _warm(engine)
    errors: list[BaseException] = []
    attempts = 0
    killed: list[int] = []

    async def kill_when_busy() -> None:
        while not any(c.in_transaction for c in proxy.connections()):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the pg_sleep is running
        killed.extend(proxy.kill("all", mode=mode))

    @resilient(timeout=10, retries=3, breaker=False, classifier=_recording(errors))
    async def slow_read() -> int:
        nonlocal attempts
        attempts += 1
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT 7 FROM pg_sleep(0.3)")))

    killer = asyncio.create_task(kill_when_busy())
    assert await slow_read() == 7
    await killer
    assert len(killed) == 1 and attempts == 2
    assert [classify(e).category for e in errors] == [ErrorCategory.CONNECTION]


async def test_kill_in_transaction_spares_idle_connections(
    proxy: ChaosProxy, engine: AsyncEngine
) -> None:
    async with engine.connect() as busy, engine.connect() as idle:
        await busy.execute(text("SELECT 1"))  # autobegin: inside a transaction
        await idle.execute(text("SELECT 1"))
        await idle.commit()  # idle
        killed = proxy.kill("in_transaction")
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await busy.execute(text("SELECT 1"))
        assert await idle.scalar(text("SELECT 2")) == 2
    assert len(killed) == 1
    assert classify(caught.value).category is ErrorCategory.CONNECTION


async def test_disable_is_an_outage_that_resilient_rides_out(
    proxy: ChaosProxy, engine: AsyncEngine
) -> None:
    await _warm(engine)
    proxy.disable()
    errors: list[BaseException] = []
    asyncio.get_running_loop().call_later(0.4, proxy.enable)

    @resilient(
        timeout=5,
        retries=30,
        breaker=False,
        retry_budget=None,
        backoff={"initial": 0.02, "max": 0.05},
        classifier=_recording(errors),
    )
    async def read() -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT 5")))

    assert await read() == 5
    assert errors and all(classify(e).category is ErrorCategory.CONNECTION for e in errors)
    assert any(isinstance(e, ConnectionRefusedError) for e in errors)  # while the outage lasted
    assert isinstance(errors[0], sa_exc.DBAPIError)  # first, the pooled connection: closed


async def test_refuse_refuses_new_connections_and_keeps_open_ones(
    proxy: ChaosProxy, pg_dsn: str
) -> None:
    kept = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    try:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(proxy.proxied_url(pg_dsn))
        assert await kept.fetchval("SELECT 3") == 3
        proxy.refuse(False)
        again = await asyncpg.connect(proxy.proxied_url(pg_dsn))
        await again.close()
    finally:
        await kept.close()


async def test_connect_delay_delays_new_connections(proxy: ChaosProxy, pg_dsn: str) -> None:
    proxy.set_connect_delay(0.3)
    start = time.perf_counter()
    conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    elapsed = time.perf_counter() - start
    await conn.close()
    assert 0.3 <= elapsed < 0.3 + 2.0


# -- silent networks: the call must fail in time and leave no session ------------------


async def test_blackhole_timeout_fails_within_the_bound_and_leaves_no_session(
    proxy: ChaosProxy, engine: AsyncEngine, witness: Witness
) -> None:
    await _warm(engine)
    assert len(await witness.wait_sessions(1)) == 1
    proxy.add_toxic(Timeout(timeout=0, stream="upstream"))  # 0: never closes by itself

    @resilient(timeout=1, retries=0, breaker=False)
    async def read() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AttemptTimeout):
        await read()
    elapsed = loop.time() - start
    assert 1.0 <= elapsed < 1.0 + SQLALCHEMY_CLOSE_WAIT + 1.5
    # The client dropped its connection; the proxy passed the close on to the server.
    assert await witness.wait_sessions(0, timeout=10) == []


async def test_half_open_fails_within_the_bound_and_leaves_no_session_once_healed(
    proxy: ChaosProxy, engine: AsyncEngine, witness: Witness
) -> None:
    await _warm(engine)
    assert len(await witness.wait_sessions(1)) == 1
    proxy.half_open()

    @resilient(timeout=1, retries=0, breaker=False)
    async def read() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AttemptTimeout):
        await read()
    elapsed = loop.time() - start
    assert 1.0 <= elapsed < 1.0 + SQLALCHEMY_CLOSE_WAIT + 1.5
    # During the partition the server cannot know; once it heals, the client's close
    # arrives and the session ends (a connection wrongly returned to the pool would
    # stay, idle).
    assert len(await witness.wait_sessions(0, timeout=0.5)) == 1  # still there
    proxy.half_open(False)
    assert await witness.wait_sessions(0, timeout=10) == []


# -- PostgreSQL-aware faults ---------------------------------------------------------


async def test_fail_first_n_answers_three_real_40001_then_lets_the_fourth_through(
    proxy: ChaosProxy, engine: AsyncEngine, orders: str, witness: Witness
) -> None:
    # No warm-up: the driver's own introspection on connect must not count.
    proxy.add_toxic(FailFirstN(n=3, sqlstate="40001"))
    errors: list[sa_exc.DBAPIError] = []
    for i in range(4):
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f"INSERT INTO {orders} (id) VALUES (:id)"), {"id": f"q{i}"})
        except sa_exc.DBAPIError as exc:
            errors.append(exc)
    assert [classify(e).sqlstate for e in errors] == ["40001", "40001", "40001"]
    assert all(classify(e).category is ErrorCategory.CONFLICT for e in errors)
    assert all(_caused_by(e, asyncpg.SerializationError) for e in errors)
    # The INSERTs failed, not the driver's set-up on connect: one connection served all.
    assert all(str(e.statement).startswith(f"INSERT INTO {orders}") for e in errors)
    assert proxy.stats().connections_accepted == 1
    # The failed INSERTs never reached the server.
    assert await witness.scalar(f"SELECT array_agg(id) FROM {orders}") == ["q3"]


async def test_fail_first_n_is_retried_by_resilient_until_it_succeeds(
    proxy: ChaosProxy, engine: AsyncEngine, orders: str, witness: Witness, no_waits: None
) -> None:
    proxy.add_toxic(FailFirstN(n=3, sqlstate="40001", match=f"INSERT INTO {orders}"))
    attempts = 0

    @resilient(timeout=5, retries=3, breaker=False, retry_budget=None)
    async def place() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.begin() as conn:
            await conn.execute(text(f"INSERT INTO {orders} (id) VALUES ('r1')"))

    await place()
    assert attempts == 4
    assert await witness.scalar(f"SELECT count(*) FROM {orders}") == 1


async def test_drop_commit_ack_makes_the_commit_ambiguous_and_the_row_durable_once(
    proxy: ChaosProxy, engine: AsyncEngine, orders: str, witness: Witness
) -> None:
    sessions = async_sessionmaker(engine)
    proxy.add_toxic(DropCommitAck())
    attempts = 0

    @resilient(timeout=5, retries=3, breaker=False)
    async def place() -> None:
        nonlocal attempts
        attempts += 1
        async with sessions.begin() as session:
            await session.execute(text(f"INSERT INTO {orders} (id) VALUES ('o1')"))

    with pytest.raises(CommitOutcomeUnknown) as caught:
        await place()
    assert attempts == 1  # never retried: that could write it twice
    assert classify(caught.value.__cause__).category is ErrorCategory.CONNECTION  # type: ignore[arg-type]
    assert await witness.scalar(f"SELECT count(*) FROM {orders} WHERE id = 'o1'") == 1


# -- toxics change while connections are open -------------------------------------------


async def test_toxics_added_updated_and_removed_apply_to_open_connections(
    proxy: ChaosProxy, pg_dsn: str
) -> None:
    conn = await asyncpg.connect(proxy.proxied_url(pg_dsn))
    try:
        base = await _median_rtt(conn)
        proxy.add_toxic(Latency(latency=0.05, name="lat"))
        added = await _median_rtt(conn, 3) - base
        proxy.update_toxic("lat", latency=0.15)
        updated = await _median_rtt(conn, 3) - base
        proxy.remove_toxic("lat")
        removed = await _median_rtt(conn, 3) - base
    finally:
        await conn.close()
    assert 0.04 <= added <= 0.12
    assert 0.14 <= updated <= 0.25
    assert removed < 0.03
