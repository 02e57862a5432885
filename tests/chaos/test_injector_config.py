"""The injector's configuration is checked when it is built, naming the parameter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from resilient_db._sqla import inner_method
from resilient_db.chaos.injector import (
    FaultInjector,
    Kind,
    Operation,
    Strategy,
    Target,
    connect_failure,
    disconnect,
    hang,
    latency,
    sqlite_busy,
    sqlstate_error,
)


@pytest.fixture
async def asyncpg_engine() -> AsyncIterator[AsyncEngine]:
    """An asyncpg engine that never connects (building it needs no server)."""
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: disconnect(rate=1.5), ValueError, r"rate must be a number in \[0, 1\]; got 1.5"),
        (lambda: disconnect(rate=-0.1), ValueError, r"rate must be a number in \[0, 1\]"),
        (lambda: disconnect(rate=float("nan")), ValueError, r"rate must be a number in \[0, 1\]"),
        (lambda: disconnect(rate=True), TypeError, r"rate must be a number in \[0, 1\]; got bool"),
        (lambda: disconnect(rate="0.1"), TypeError, r"rate must be a number in \[0, 1\]; got str"),
        (lambda: disconnect(rate=1, phase="during"), ValueError, r"phase must be 'before' or"),
        (lambda: disconnect(rate=1, on="connect"), ValueError, r"on must be one of 'statement', "),
        (lambda: sqlite_busy(rate=1, on="nowhere"), ValueError, r"on must be one of"),
        (lambda: connect_failure(rate=1, name=""), TypeError, r"name must be a non-empty string"),
        (lambda: latency(0, rate=1), ValueError, r"delay must be a finite number of seconds > 0"),
        (lambda: latency(float("inf"), rate=1), ValueError, r"delay must be a finite number"),
        (lambda: latency(None, rate=1), TypeError, r"delay must be a finite number"),
        (lambda: hang(rate=1, duration=-1), ValueError, r"duration must be .* > 0, or None"),
        (lambda: sqlstate_error("4001", rate=1), ValueError, r"sqlstate must be five digits"),
        (lambda: sqlstate_error("40p01", rate=1), ValueError, r"sqlstate must be five digits"),
        (lambda: sqlstate_error("01000", rate=1), ValueError, r"not of class 00, 01 or 02"),
        (lambda: disconnect(rate=1, when="("), ValueError, r"when is not a valid regular"),
        (lambda: disconnect(rate=1, when=42), TypeError, r"when must be a regular expression"),
        (lambda: disconnect(rate=1, enabled="yes"), TypeError, r"enabled must be True, False"),
        (
            lambda: Strategy(kind=Kind.LATENCY, on="statement", rate=1, name="slow"),
            TypeError,
            r"delay must be a finite number of seconds > 0; got NoneType",
        ),
        (
            lambda: Strategy(kind=Kind.SQLSTATE, on="commit", rate=1, name="s"),
            ValueError,
            r"sqlstate must be five digits",
        ),
        (
            lambda: Strategy(kind=Kind.SQLITE_BUSY, on="statement", rate=1, name="b", delay=1),
            ValueError,
            r"a delay applies to latency and hang only, not sqlite_busy",
        ),
        (
            lambda: Strategy(kind=Kind.HANG, on="statement", rate=1, name="h", sqlstate="40001"),
            ValueError,
            r"a sqlstate applies to sqlstate errors only, not hang",
        ),
        (
            lambda: Strategy(kind=Kind.HANG, on="statement", rate=1, name="h", phase="after"),
            ValueError,
            r"phase='after' applies to disconnect only, not hang",
        ),
    ],
)
def test_strategies_refuse_bad_values(
    build: Callable[[], Strategy], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()


def test_enabled_is_checked_when_switched_at_run_time() -> None:
    strategy = disconnect(rate=1)
    with pytest.raises(TypeError, match="enabled must be True, False"):
        strategy.enabled = 1  # type: ignore[assignment]
    assert strategy.enabled is True


def test_a_regex_when_is_searched_case_insensitively_in_the_statement() -> None:
    strategy = disconnect(rate=1, when=r"^update")
    assert strategy.applies_to(Operation(Target.STATEMENT, 1, "UPDATE t SET x = 1"))
    assert not strategy.applies_to(Operation(Target.STATEMENT, 2, "SELECT 1"))
    assert not strategy.applies_to(Operation(Target.CONNECT, 1, None))


def test_the_roll_depends_on_seed_name_and_ordinal_only() -> None:
    a, b = disconnect(rate=0.5, name="a"), disconnect(rate=0.5, name="b")
    ops = [Operation(Target.STATEMENT, n, "SELECT 1") for n in range(1, 201)]
    first = [a.fires(7, op) for op in ops]
    assert first == [a.fires(7, op) for op in ops]
    assert first != [b.fires(7, op) for op in ops]  # another name rolls differently
    assert first != [a.fires(8, op) for op in ops]  # and so does another seed
    assert 60 <= sum(first) <= 140


def test_rates_zero_and_one_are_never_and_always() -> None:
    op = Operation(Target.STATEMENT, 1, "SELECT 1")
    assert all(disconnect(rate=1).fires(seed, op) for seed in range(100))
    assert not any(disconnect(rate=0).fires(seed, op) for seed in range(100))


async def test_the_injector_refuses_a_sync_engine() -> None:
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    try:
        with pytest.raises(
            TypeError, match=r"engine must be a sqlalchemy\.ext\.asyncio\.AsyncEngine"
        ):
            FaultInjector(engine)  # type: ignore[arg-type]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"seed": "7"}, TypeError, "seed must be an int or None; got str"),
        ({"seed": True}, TypeError, "seed must be an int or None; got bool"),
        ({"enabled": 1}, TypeError, "enabled must be True or False"),
    ],
)
async def test_the_injector_refuses_bad_settings(
    sqlite_engine: AsyncEngine, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        FaultInjector(sqlite_engine, **kwargs)


async def test_sqlstate_errors_need_postgres(sqlite_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="SQLSTATE errors need a postgresql\\+asyncpg engine"):
        FaultInjector(sqlite_engine, sqlstate_error("40001", rate=1))


async def test_sqlite_busy_needs_sqlite(asyncpg_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="SQLite busy errors need a sqlite\\+aiosqlite engine"):
        FaultInjector(asyncpg_engine, sqlite_busy(rate=1))


async def test_strategy_names_are_unique_within_an_injector(sqlite_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="a strategy named 'disconnect' is already added"):
        FaultInjector(sqlite_engine, disconnect(rate=1), disconnect(rate=1, on="commit"))


async def test_a_seed_is_chosen_and_kept_when_none_is_given(sqlite_engine: AsyncEngine) -> None:
    injector = FaultInjector(sqlite_engine)
    assert isinstance(injector.seed, int)
    assert FaultInjector(sqlite_engine, seed=injector.seed).seed == injector.seed


async def test_strategies_are_kept_in_order_and_can_be_removed(
    sqlite_engine: AsyncEngine,
) -> None:
    slow, drop = latency(0.01, rate=1, name="slow"), disconnect(rate=0.5)
    injector = FaultInjector(sqlite_engine, slow, drop, seed=1)
    assert injector.strategies == (slow, drop)
    assert injector["slow"] is slow
    assert injector.counts == {"slow": 0, "disconnect": 0}
    assert injector.remove("slow") is slow
    assert injector.strategies == (drop,)
    assert (drop.kind, drop.target, drop.phase) == (Kind.DISCONNECT, Target.STATEMENT, "before")


async def test_detach_puts_back_a_do_commit_someone_else_installed(
    sqlite_engine: AsyncEngine,
) -> None:
    dialect = sqlite_engine.sync_engine.dialect

    def their_do_commit(dbapi_connection: Any) -> None:
        raise AssertionError("not called in this test")

    dialect.do_commit = their_do_commit  # type: ignore[method-assign]
    injector = FaultInjector(sqlite_engine, seed=1).attach()
    # Both beneath resilient-db's COMMIT tracking, theirs beneath the injector's.
    assert inner_method(dialect, "do_commit") == injector._do_commit
    injector.detach()
    assert inner_method(dialect, "do_commit") is their_do_commit


async def test_the_injector_is_an_async_context_manager(sqlite_engine: AsyncEngine) -> None:
    async with FaultInjector(sqlite_engine, seed=1) as injector:
        assert injector.attached
    assert not injector.attached
