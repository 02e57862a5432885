"""Run a chaos scenario: drive a workload through resilient-db while faults come and go.

::

    scenario = load_scenario("chaos/flaky-network.toml", url=DATABASE_URL)
    result = await run_scenario(scenario, report_dir="reports/chaos")
    print(render_summary(result))
    raise SystemExit(result.exit_code)

What a run does, in order:

1. **Set up.** Create the run's tables (``rdb_chaos_<run id>_*``) through a direct
   connection — a database that cannot be reached here is a harness error (exit
   4). Start a :class:`ChaosProxy` in front of PostgreSQL when the scenario has
   proxy faults, attach a :class:`FaultInjector` when it has injector faults, and
   build the policies: one :class:`CircuitBreaker`, :class:`RetryBudget` and
   :class:`Bulkhead` for the database, a :class:`Policy` per operation, used as a
   decorator or through :class:`ResilientEngine`.
2. **Run.** ``concurrency`` workers take operations from a schedule offering
   ``rate`` operations per second, for ``duration`` seconds. Every operation is
   recorded (invoke and completion time, outcome, attempts, error class) and
   appended to ``operations.jsonl``. Phases add and remove their faults on time;
   the breaker's state, the pool's usage and the operations in flight are
   sampled once per second. A watchdog ends the run at twice its planned
   duration.
3. **Heal and read.** Every fault is removed (proxy reset, injector detached), the
   pool is checked (nothing may be checked out), the engine disposed, PostgreSQL
   asked for sessions of the run left in ``pg_stat_activity``, and the tables read
   once, directly, for the invariants.
4. **Always clean up** — even on a harness error or Ctrl-C: faults off, proxy
   stopped, engines disposed, tables dropped, the embedded database deleted.

The harness uses only the public API of resilient-db (``resilient_db`` and
``resilient_db.chaos``); the core never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final, Literal, TextIO

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from resilient_db import (
    Backoff,
    BreakerTransition,
    Bulkhead,
    CircuitBreaker,
    CommitOutcomeUnknown,
    Policy,
    ResilientEngine,
    RetryBudget,
    __version__,
)
from resilient_db.chaos._progress import Progress, ProgressState
from resilient_db.chaos.injector import FaultInjector
from resilient_db.chaos.invariants import (
    BreakerEvent,
    CheckResult,
    ExitCode,
    FaultActivity,
    FinalState,
    OperationRecord,
    Outcome,
    PhaseStats,
    WrittenKey,
    check_faults_fired,
    check_steady_state,
    check_writes,
    phase_stats,
    verdict,
)
from resilient_db.chaos.proxy import ChaosProxy
from resilient_db.chaos.scenario import (
    WRITE_KINDS,
    FaultSpec,
    OperationSpec,
    Phase,
    PolicySpec,
    Scenario,
)

__all__ = ["HarnessError", "RunResult", "Sample", "replay_command", "run_scenario"]

_SETUP_TIMEOUT: Final = 15.0
"""Seconds to reach the database and create the tables before giving up (exit 4)."""
_FINAL_READ_TIMEOUT: Final = 20.0
_SESSIONS_WAIT: Final = 5.0
_TASKS_WAIT: Final = 3.0
_SAMPLE_EVERY: Final = 1.0

_SQLITE_BEGIN: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rdb_chaos_sqlite_begin", default="BEGIN IMMEDIATE"
)
"""How the next SQLite transaction of this task begins: writers take the write lock
at BEGIN (``BEGIN IMMEDIATE`` honours the busy timeout and makes read-modify-writes
serializable); reads begin deferred."""


class HarnessError(Exception):
    """The run could not be carried out as planned (exit code 4)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """A once-per-second sample of the client side."""

    at: float
    breaker: str
    pool_checked_out: int | None
    in_flight: int
    proxy_connections: int | None

    def to_json(self) -> dict[str, Any]:
        """The sample as a JSON-lines object."""
        return {
            "at": round(self.at, 3),
            "breaker": self.breaker,
            "pool_checked_out": self.pool_checked_out,
            "in_flight": self.in_flight,
            "proxy_connections": self.proxy_connections,
        }


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything one run produced; reports are rendered from it.

    Attributes:
        scenario: what was run (overrides applied).
        run_id: names the run's tables and its server sessions (``rdb-chaos-<run_id>``).
        started_at: wall-clock start, ISO 8601 in UTC (for humans; durations use a
            monotonic clock).
        elapsed: seconds the workload ran.
        exit_code: the verdict.
        records: every operation.
        samples: once-per-second samples.
        breaker_events: the breaker's transitions.
        faults: what each planned fault did.
        fault_log: every fault decision of the proxy and the injector.
        phase_stats: per phase, then ``(all)`` for the whole run.
        checks: invariants, then steady-state checks.
        error: the harness error, if any.
        interrupted: stopped by Ctrl-C / SIGTERM.
        watchdog_fired: the watchdog ended the run.
        replay: the command that replays the run.
        versions: of resilient-db, Python, SQLAlchemy and the driver.
        target: the database URL (password hidden), and how faults reached it.
        files: report name → path, for the files written.
    """

    scenario: Scenario
    run_id: str
    started_at: str
    elapsed: float
    exit_code: ExitCode
    records: tuple[OperationRecord, ...]
    samples: tuple[Sample, ...]
    breaker_events: tuple[BreakerEvent, ...]
    faults: tuple[FaultActivity, ...]
    fault_log: tuple[dict[str, Any], ...]
    phase_stats: tuple[PhaseStats, ...]
    checks: tuple[CheckResult, ...]
    replay: str
    versions: dict[str, str]
    target: dict[str, Any]
    error: str | None = None
    interrupted: bool = False
    watchdog_fired: bool = False
    files: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.scenario.seed

    @property
    def invariants(self) -> tuple[CheckResult, ...]:
        """The invariant checks."""
        return tuple(c for c in self.checks if c.group == "invariant")

    @property
    def steady_state(self) -> tuple[CheckResult, ...]:
        """The steady-state checks."""
        return tuple(c for c in self.checks if c.group == "steady_state")

    def check(self, name: str) -> CheckResult:
        """The check called ``name`` (``KeyError`` if none)."""
        for result in self.checks:
            if result.name == name:
                return result
        raise KeyError(name)


def replay_command(scenario: Scenario) -> str:
    """The command line that replays ``scenario`` with the same seed and overrides."""
    if scenario.source.startswith("builtin:"):
        what = scenario.source.removeprefix("builtin:")
    else:
        what = scenario.source
    words = ["resilient-db", "chaos", "run", what, "--seed", str(scenario.seed)]
    url = scenario.overrides.get("url")
    if url is not None:
        words += ["--url", make_url(url).render_as_string(hide_password=True)]
    duration = scenario.overrides.get("duration")
    if duration is not None:
        words += ["--duration", f"{duration:g}"]
    return shlex.join(words)


def _versions(dialect: str) -> dict[str, str]:
    found = {
        "resilient-db": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    for package in ("sqlalchemy", "asyncpg" if dialect == "postgresql" else "aiosqlite"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def _short(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return message if len(message) <= 200 else message[:197] + "..."


# -- the workload's SQL ----------------------------------------------------------------------


class _Tables:
    """The run's three tables and the statements of each operation."""

    def __init__(self, run_id: str, dialect: str, counters: int) -> None:
        prefix = f"rdb_chaos_{run_id}"
        self.writes = f"{prefix}_writes"
        self.counters = f"{prefix}_counters"
        self.registers = f"{prefix}_registers"
        self.dialect = dialect
        self.count = counters
        self.insert = text(
            f"INSERT INTO {self.writes} (key, kind, target) VALUES (:key, :kind, :target)"
        )
        self.increment = text(f"UPDATE {self.counters} SET value = value + 1 WHERE id = :target")
        self.read_register = text(f"SELECT value FROM {self.registers} WHERE id = :target")
        self.write_register = text(f"UPDATE {self.registers} SET value = :value WHERE id = :target")
        self.read_counter = text(f"SELECT value FROM {self.counters} WHERE id = :target")
        self.serializable = text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")

    def ddl(self) -> list[str]:
        ident = (
            "id BIGSERIAL PRIMARY KEY"
            if self.dialect == "postgresql"
            else "id INTEGER PRIMARY KEY AUTOINCREMENT"
        )
        # The key is deliberately not unique: a write done twice must be visible.
        rows = ", ".join(f"({i}, 0)" for i in range(self.count))
        return [
            f"CREATE TABLE {self.writes} ({ident}, key TEXT NOT NULL, kind TEXT NOT NULL, "
            "target INTEGER)",
            f"CREATE INDEX {self.writes}_key ON {self.writes} (key)",
            f"CREATE TABLE {self.counters} (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)",
            f"CREATE TABLE {self.registers} (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)",
            f"INSERT INTO {self.counters} (id, value) VALUES {rows}",
            f"INSERT INTO {self.registers} (id, value) VALUES {rows}",
        ]

    def drop(self) -> list[str]:
        return [f"DROP TABLE IF EXISTS {t}" for t in (self.writes, self.counters, self.registers)]

    async def body(
        self, session: AsyncSession, kind: str, key: str | None, target: int | None
    ) -> None:
        """One attempt of an operation, inside the unit's transaction."""
        if kind == "insert":
            await session.execute(self.insert, {"key": key, "kind": kind, "target": None})
        elif kind == "increment":
            await session.execute(self.increment, {"target": target})
            await session.execute(self.insert, {"key": key, "kind": kind, "target": target})
        elif kind == "rmw":
            if self.dialect == "postgresql":
                await session.execute(self.serializable)
            value = (await session.execute(self.read_register, {"target": target})).scalar_one()
            await session.execute(self.write_register, {"value": int(value) + 1, "target": target})
            await session.execute(self.insert, {"key": key, "kind": kind, "target": target})
        else:
            (await session.execute(self.read_counter, {"target": target})).scalar_one()
            (await session.execute(self.read_register, {"target": target})).scalar_one()


# -- one run ----------------------------------------------------------------------------------


_Executor = Callable[[str, str | None, int | None, list[int]], Awaitable[None]]


class _Run:
    """The state of one run; :func:`run_scenario` drives it."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        report_dir: Path | None,
        progress: Progress | None,
    ) -> None:
        self.scenario = scenario
        self.run_id = secrets.token_hex(4)
        self.progress = progress
        self.report_dir = report_dir
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.records: list[OperationRecord] = []
        self.outcomes: Counter[str] = Counter()
        """``records`` counted by outcome, kept as they are appended (for the progress line)."""
        self.samples: list[Sample] = []
        self.breaker_events: list[BreakerEvent] = []
        self.activities: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.stopping = False
        self.interrupted = False
        self.watchdog_fired = False
        self.elapsed = 0.0
        self.workers: list[asyncio.Task[None]] = []
        self.helpers: list[asyncio.Task[None]] = []
        self.kill_tasks: dict[str, asyncio.Task[None]] = {}
        self.refcounts: dict[str, int] = {}
        self.active: dict[str, FaultSpec] = {}
        self.tasks_before: set[asyncio.Task[Any]] = set(asyncio.all_tasks())
        self.temp_dir: str | None = None
        self.url = ""
        self.admin: AsyncEngine | None = None
        self.engine: AsyncEngine | None = None
        self.wrappers: list[ResilientEngine] = []
        self.proxy: ChaosProxy | None = None
        self.injector: FaultInjector | None = None
        self.breaker: CircuitBreaker | None = None
        self.tables: _Tables | None = None
        self.tables_created = False
        self.executors: dict[str, _Executor] = {}
        self.app_name = f"rdb-chaos-{self.run_id}"
        self.ops_file: IO[str] | None = None
        self.flushed = 0
        self.pool_checked_out: int | None = None
        self.leaked_sessions: list[str] | None = None
        self.stray_tasks: list[str] = []
        self.final: FinalState | None = None
        self.error: str | None = None
        self.offered = _Offered(scenario)
        mix = [op for op in scenario.workload.mix if op.weight > 0]
        self.mix = mix
        self.weights = [op.weight for op in mix]

    def now(self) -> float:
        return self.loop.time() - self.t0

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress.event(message)

    # -- setup --

    async def setup(self) -> None:
        scenario = self.scenario
        target = scenario.target
        dialect = target.dialect
        if target.url is None:
            self.temp_dir = tempfile.mkdtemp(prefix="rdb-chaos-")
            self.url = f"sqlite+aiosqlite:///{Path(self.temp_dir) / 'chaos.db'}"
        else:
            self.url = target.url
        if dialect == "postgresql":
            try:
                import asyncpg  # noqa: F401
            except ImportError as exc:
                raise HarnessError(
                    "a PostgreSQL target needs asyncpg: pip install 'resilient-db[postgres]'"
                ) from exc
        self.tables = tables = _Tables(self.run_id, dialect, scenario.workload.counters)
        self.admin = self._make_engine(self.url, admin=True)
        # From here on, clean-up drops the tables (IF EXISTS), whatever happens next.
        self.tables_created = True
        try:
            async with asyncio.timeout(_SETUP_TIMEOUT):
                async with self.admin.begin() as conn:
                    if dialect == "sqlite":
                        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    for statement in tables.ddl():
                        await conn.exec_driver_sql(statement)
        except Exception as exc:
            shown = make_url(self.url).render_as_string(hide_password=True)
            raise HarnessError(
                f"cannot set up the run on {shown}: {type(exc).__name__}: {_short(exc)}"
            ) from exc

        run_url = self.url
        if target.proxy:
            parsed = make_url(self.url)
            if not parsed.host:
                raise HarnessError(
                    "the chaos proxy needs a URL with a host and port (not a Unix socket); "
                    f"got {parsed.render_as_string(hide_password=True)}"
                )
            self.proxy = ChaosProxy(
                (parsed.host, parsed.port or 5432), seed=scenario.seed, name=f"chaos-{self.run_id}"
            )
            await self.proxy.__aenter__()
            run_url = self.proxy.proxied_url(self.url)
        self.engine = engine = self._make_engine(run_url, admin=False)
        await self._warm_up(engine)
        if scenario.uses_injector:
            self.injector = FaultInjector(engine, seed=scenario.seed).attach()
        self._build_policies(engine, tables)

    async def _warm_up(self, engine: AsyncEngine) -> None:
        """Open the pool's connections before the clock starts, so that the baseline
        measures queries, not connection set-up."""
        target = self.scenario.target
        size = target.pool_size or self.scenario.workload.concurrency

        async def one() -> None:
            _SQLITE_BEGIN.set("BEGIN")  # a read: never queue behind the others' locks
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                await asyncio.sleep(0.05)  # hold it, so that the others open their own

        try:
            async with asyncio.timeout(_SETUP_TIMEOUT):
                await asyncio.gather(*(one() for _ in range(size)))
        except Exception as exc:
            raise HarnessError(
                f"cannot connect {'through the chaos proxy ' if self.proxy else ''}at the start: "
                f"{type(exc).__name__}: {_short(exc)}"
            ) from exc

    def _make_engine(self, url: str, *, admin: bool) -> AsyncEngine:
        target = self.scenario.target
        concurrency = self.scenario.workload.concurrency
        kwargs: dict[str, Any] = {}
        if target.dialect == "postgresql":
            app = f"{self.app_name}-check" if admin else self.app_name
            kwargs["connect_args"] = {"server_settings": {"application_name": app}, "timeout": 5}
        else:
            kwargs["connect_args"] = {"timeout": target.sqlite_busy_timeout}
        if admin:
            return create_async_engine(url, pool_size=1, max_overflow=1, **kwargs)
        engine = create_async_engine(
            url,
            pool_size=target.pool_size or concurrency,
            max_overflow=concurrency if target.max_overflow is None else target.max_overflow,
            pool_timeout=target.pool_timeout,
            pool_pre_ping=target.pool_pre_ping,
            **kwargs,
        )
        if target.dialect == "sqlite":
            _sqlite_transactions(engine)
        return engine

    def _build_policies(self, engine: AsyncEngine, tables: _Tables) -> None:
        workload = self.scenario.workload
        breaker = None
        if workload.breaker is not None:
            spec = workload.breaker
            breaker = CircuitBreaker(
                f"chaos-{self.run_id}",
                failure_threshold=spec.failure_threshold,
                failure_rate_threshold=spec.failure_rate_threshold,
                minimum_calls=spec.minimum_calls,
                window=spec.window,
                slow_call_duration=spec.slow_call_duration,
                slow_call_rate_threshold=spec.slow_call_rate_threshold,
                reset_timeout=spec.reset_timeout,
                half_open_max_calls=spec.half_open_max_calls,
                success_threshold=spec.success_threshold,
                listeners=[self._on_transition],
            )
        self.breaker = breaker
        budget = None
        if workload.retry_budget is not None:
            b = workload.retry_budget
            budget = RetryBudget(
                ratio=b.ratio, min_per_second=b.min_per_second, max_tokens=b.max_tokens
            )
        bulkhead = None
        if workload.bulkhead is not None:
            h = workload.bulkhead
            bulkhead = Bulkhead(
                h.max_concurrent,
                max_queue=h.max_queue,
                queue_timeout=h.queue_timeout,
                name=f"chaos-{self.run_id}",
            )
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        for op in workload.mix:
            policy = _policy(op, breaker if breaker is not None else False, bulkhead, budget)
            if workload.api == "engine":
                db = ResilientEngine(engine, policy=policy, verify_commits=op.policy.verify_commits)
                self.wrappers.append(db)
                self.executors[op.kind] = _engine_executor(db, tables)
            else:
                self.executors[op.kind] = _decorator_executor(policy, sessions, tables)

    def _on_transition(self, transition: BreakerTransition) -> None:
        self.breaker_events.append(
            BreakerEvent(self.now(), transition.old.value, transition.new.value, transition.reason)
        )

    # -- faults --

    def _activity(self, fault: FaultSpec) -> dict[str, Any]:
        return self.activities.setdefault(
            fault.name,
            {"fault": fault, "applied_at": None, "removed_at": None, "fired": 0, "base": 0},
        )

    def _proxy_count(self, name: str) -> int:
        assert self.proxy is not None
        return int(self.proxy.stats().faults.get(name, 0))

    def apply(self, fault: FaultSpec) -> None:
        activity = self._activity(fault)
        activity["applied_at"] = self.now()
        self.active[fault.name] = fault
        if fault.via == "injector":
            assert self.injector is not None
            self.injector.add(fault.strategy())
            return
        proxy = self.proxy
        assert proxy is not None
        kind = fault.kind
        if not fault.is_action:
            proxy.add_toxic(fault.toxic())
            return
        if kind == "kill":
            self._kill(fault)
            if fault.every is not None:
                self.kill_tasks[fault.name] = self.loop.create_task(self._kill_every(fault))
            return
        activity["base"] = self._proxy_count(kind)
        depth = self.refcounts.get(kind, 0)
        self.refcounts[kind] = depth + 1
        if kind == "disable" and depth == 0:
            proxy.disable()
        elif kind == "refuse" and depth == 0:
            proxy.refuse(True)
        elif kind == "half_open" and depth == 0:
            proxy.half_open(True)
        elif kind == "connect_delay":
            proxy.set_connect_delay(max(proxy.connect_delay, float(fault.param("delay"))))

    def _kill(self, fault: FaultSpec) -> None:
        assert self.proxy is not None
        killed = self.proxy.kill(fault.param("which", "all"), mode=fault.param("mode", "rst"))
        self._activity(fault)["fired"] += len(killed)

    async def _kill_every(self, fault: FaultSpec) -> None:
        assert fault.every is not None
        while True:
            await asyncio.sleep(fault.every)
            self._kill(fault)

    def remove(self, fault: FaultSpec) -> None:
        if self.active.pop(fault.name, None) is None:
            return
        activity = self._activity(fault)
        activity["removed_at"] = self.now()
        if fault.via == "injector":
            assert self.injector is not None
            activity["fired"] = self.injector.counts.get(fault.name, 0)
            with contextlib.suppress(KeyError):
                self.injector.remove(fault.name)
            return
        proxy = self.proxy
        assert proxy is not None
        kind = fault.kind
        if not fault.is_action:
            activity["fired"] = self._proxy_count(fault.name)
            with contextlib.suppress(KeyError):
                proxy.remove_toxic(fault.name)
            return
        if kind == "kill":
            task = self.kill_tasks.pop(fault.name, None)
            if task is not None:
                task.cancel()
            return
        activity["fired"] = self._proxy_count(kind) - int(activity["base"])
        depth = self.refcounts.get(kind, 1) - 1
        self.refcounts[kind] = depth
        if depth > 0 and kind != "connect_delay":
            return
        if kind == "disable":
            proxy.enable()
        elif kind == "refuse":
            proxy.refuse(False)
        elif kind == "half_open":
            proxy.half_open(False)
        elif kind == "connect_delay":
            still = [f.param("delay") for f in self.active.values() if f.kind == "connect_delay"]
            proxy.set_connect_delay(max(still, default=0.0))

    async def phases(self) -> None:
        """Apply and remove the phases' faults on time (those at 0 are applied by start())."""
        events: list[tuple[float, int, str, Phase]] = []
        for phase in self.scenario.phases:
            if phase.start > 0:
                events.append((phase.start, 1, "start", phase))
            if phase.end < self.scenario.duration:
                events.append((phase.end, 0, "end", phase))
        events.sort(key=lambda e: (e[0], e[1]))
        for at, _, what, phase in events:
            delay = at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if what == "start":
                self._start_phase(phase)
            else:
                self._end_phase(phase)

    def _start_phase(self, phase: Phase) -> None:
        for fault in phase.faults:
            self.apply(fault)
        faults = ", ".join(f"+{f.name}" for f in phase.faults)
        self.say(
            f"[{self.now():6.1f}s] phase {phase.name} starts" + (f": {faults}" if faults else "")
        )

    def _end_phase(self, phase: Phase) -> None:
        for fault in reversed(phase.faults):
            self.remove(fault)
        faults = ", ".join(f"-{f.name}" for f in phase.faults)
        self.say(
            f"[{self.now():6.1f}s] phase {phase.name} ends" + (f": {faults}" if faults else "")
        )

    def heal(self) -> None:
        """Remove every fault still in force and reset the proxy."""
        for task in list(self.kill_tasks.values()):
            task.cancel()
        for fault in reversed(list(self.active.values())):
            with contextlib.suppress(Exception):
                self.remove(fault)
        if self.proxy is not None and self.proxy.running:
            with contextlib.suppress(Exception):
                self.proxy.reset()
        if self.injector is not None:
            self.injector.detach()

    # -- the workload --

    def _pick(self, index: int) -> tuple[OperationSpec, random.Random]:
        rng = random.Random(f"{self.scenario.seed}:op:{index}")
        return rng.choices(self.mix, self.weights)[0], rng

    async def worker(self, number: int) -> None:
        # Stopping is done by cancelling the workers (watchdog, Ctrl-C); otherwise a
        # worker ends when the schedule offers no more operations.
        while (slot := self.offered.next()) is not None:
            index, at = slot
            delay = at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.operation(index, number)

    async def operation(self, index: int, worker: int) -> None:
        spec, rng = self._pick(index)
        kind = spec.kind
        key = f"{kind}-{index}" if kind in WRITE_KINDS else None
        target = None if kind == "insert" else rng.randrange(self.scenario.workload.counters)
        attempts = [0]
        invoke = self.now()
        outcome: Outcome = "ok"
        error: str | None = None
        message: str | None = None
        self.in_flight += 1
        token = _SQLITE_BEGIN.set("BEGIN" if kind == "read" else "BEGIN IMMEDIATE")
        try:
            await self.executors[kind](kind, key, target, attempts)
        except CommitOutcomeUnknown as exc:
            # A read changed nothing, so its outcome is not in doubt: it failed.
            outcome = "unknown" if key is not None else "failed"
            error, message = type(exc).__name__, _short(exc)
        except asyncio.CancelledError:
            # Cut short (watchdog, Ctrl-C): a write may or may not have committed.
            outcome = "unknown" if key is not None else "failed"
            error, message = "CancelledError", "cancelled when the run was stopped"
            raise
        except Exception as exc:
            outcome, error, message = "failed", type(exc).__name__, _short(exc)
        finally:
            _SQLITE_BEGIN.reset(token)
            self.in_flight -= 1
            self.outcomes[outcome] += 1
            self.records.append(
                OperationRecord(
                    index=index,
                    kind=kind,
                    key=key,
                    target=target,
                    worker=worker,
                    invoke=invoke,
                    complete=self.now(),
                    outcome=outcome,
                    attempts=attempts[0],
                    error=error,
                    message=message,
                )
            )

    # -- observing --

    def _pool_checked_out(self) -> int | None:
        if self.engine is None:
            return None
        checked_out = getattr(self.engine.sync_engine.pool, "checkedout", None)
        return int(checked_out()) if callable(checked_out) else None

    def sample(self) -> None:
        proxy_connections = None
        if self.proxy is not None and self.proxy.running:
            with contextlib.suppress(Exception):
                proxy_connections = self.proxy.stats().connections_open
        breaker = self.breaker.state.value if self.breaker is not None else "none"
        self.samples.append(
            Sample(self.now(), breaker, self._pool_checked_out(), self.in_flight, proxy_connections)
        )
        self.flush_records()

    def flush_records(self) -> None:
        if self.ops_file is None:
            return
        new = self.records[self.flushed :]
        self.flushed = len(self.records)
        for record in new:
            self.ops_file.write(json.dumps(record.to_json()) + "\n")
        self.ops_file.flush()

    async def sampler(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(_SAMPLE_EVERY)

    def phases_at(self, at: float) -> tuple[str, ...]:
        return tuple(p.name for p in self.scenario.phases if p.start <= at < p.end)

    async def show_progress(self) -> None:
        progress = self.progress
        assert progress is not None
        while True:
            at = self.now()
            progress.update(
                ProgressState(
                    elapsed=min(at, self.scenario.duration),
                    duration=self.scenario.duration,
                    phases=self.phases_at(at),
                    ops=len(self.records),
                    ok=self.outcomes["ok"],
                    unknown=self.outcomes["unknown"],
                    breaker=self.breaker.state.value if self.breaker is not None else "none",
                )
            )
            await asyncio.sleep(0.25 if progress.live else 0.5)

    # -- the whole run --

    async def start(self) -> None:
        """Start the clock, the faults at 0, the workers and the helpers."""
        if self.stopping:  # interrupted during the set-up: go straight to clean-up
            return
        self.t0 = self.loop.time()
        self.offered.reset()
        for phase in self.scenario.phases:
            if phase.start <= 0:
                self._start_phase(phase)
        for number in range(self.scenario.workload.concurrency):
            self.workers.append(
                self.loop.create_task(self.worker(number), name=f"chaos-worker-{number}")
            )
        self.helpers.append(self.loop.create_task(self.phases(), name="chaos-phases"))
        self.helpers.append(self.loop.create_task(self.sampler(), name="chaos-sampler"))
        if self.progress is not None:
            self.helpers.append(self.loop.create_task(self.show_progress(), name="chaos-progress"))

    def stop_workers(self, reason: str) -> None:
        self.stopping = True
        for task in self.workers:
            task.cancel()
        self.say(f"[{self.now():6.1f}s] {reason}")

    def on_watchdog(self) -> None:
        if not self.stopping:
            self.watchdog_fired = True
            self.stop_workers(
                f"watchdog: still running at 2 x the planned {self.scenario.duration:g} s; "
                "cancelling the operations in flight"
            )

    def on_signal(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.stop_workers(
            "interrupted: cleaning up and writing partial reports (again to stop now)"
        )

    async def wait(self) -> None:
        watchdog = self.loop.call_later(2 * self.scenario.duration, self.on_watchdog)
        try:
            results = await asyncio.gather(*self.workers, return_exceptions=True)
        finally:
            watchdog.cancel()
        self.elapsed = self.now()
        self.stopping = True
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise HarnessError(
                    f"a worker failed: {type(result).__name__}: {result}"
                ) from result
        self.sample()

    async def stop_helpers(self) -> None:
        tasks = self.helpers + list(self.kill_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.helpers.clear()
        self.kill_tasks.clear()

    async def settle(self) -> None:
        """Heal, check the pool, dispose, look for leaked sessions, read the final state."""
        self.heal()
        self.pool_checked_out = self._pool_checked_out()
        for db in self.wrappers:
            with contextlib.suppress(Exception):
                await db.dispose()
        if self.engine is not None:
            await self.engine.dispose()
        admin = self.admin
        assert admin is not None
        assert self.tables is not None
        if self.scenario.target.dialect == "postgresql":
            self.leaked_sessions = await self._sessions_left(admin)
        self.final = await self._final_read(admin, self.tables)

    async def _sessions_left(self, admin: AsyncEngine) -> list[str]:
        query = text(
            "SELECT pid, state, left(query, 80) FROM pg_stat_activity WHERE application_name = :app"
        )
        ends = self.loop.time() + _SESSIONS_WAIT
        while True:
            async with admin.connect() as conn:
                rows = (await conn.execute(query, {"app": self.app_name})).all()
            if not rows or self.loop.time() >= ends:
                return [f"pid {pid}: {state} ({sql})" for pid, state, sql in rows]
            await asyncio.sleep(0.1)

    async def _final_read(self, admin: AsyncEngine, tables: _Tables) -> FinalState:
        ends = self.loop.time() + _FINAL_READ_TIMEOUT
        while True:
            try:
                async with asyncio.timeout(max(0.5, ends - self.loop.time())):
                    async with admin.connect() as conn:
                        rows = (
                            await conn.exec_driver_sql(
                                f"SELECT key, kind, target, count(*) FROM {tables.writes} "
                                "GROUP BY key, kind, target"
                            )
                        ).all()
                        counters = (
                            await conn.exec_driver_sql(f"SELECT id, value FROM {tables.counters}")
                        ).all()
                        registers = (
                            await conn.exec_driver_sql(f"SELECT id, value FROM {tables.registers}")
                        ).all()
                break
            except Exception as exc:
                if self.loop.time() >= ends:
                    raise HarnessError(
                        f"the final read failed for {_FINAL_READ_TIMEOUT:g} s after the faults "
                        f"were healed: {type(exc).__name__}: {_short(exc)}"
                    ) from exc
                await asyncio.sleep(0.5)
        writes: dict[str, WrittenKey] = {}
        for row in rows:
            key, kind, target, count = tuple(row)
            previous = writes.get(key)
            total = int(count) + (previous.rows if previous is not None else 0)
            writes[str(key)] = WrittenKey(str(kind), None if target is None else int(target), total)
        return FinalState(
            writes=writes,
            counters=_id_values(counters),
            registers=_id_values(registers),
        )

    async def teardown(self) -> None:
        """Undo everything set up, whatever happened (never raises)."""
        with contextlib.suppress(Exception):
            self.heal()
        if self.injector is not None:
            self.injector.detach()
        for db in self.wrappers:
            with contextlib.suppress(Exception):
                await db.dispose()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await self.engine.dispose()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                await self.proxy.__aexit__(None, None, None)
        if self.admin is not None:
            if self.tables_created and self.tables is not None and self.temp_dir is None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10):
                        async with self.admin.begin() as conn:
                            for statement in self.tables.drop():
                                await conn.exec_driver_sql(statement)
            with contextlib.suppress(Exception):
                await self.admin.dispose()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.ops_file is not None:
            self.flush_records()
            self.ops_file.close()
            self.ops_file = None

    async def find_stray_tasks(self) -> list[str]:
        current = asyncio.current_task()
        ends = self.loop.time() + _TASKS_WAIT
        while True:
            stray = [
                t
                for t in asyncio.all_tasks()
                if t is not current and t not in self.tasks_before and not t.done()
            ]
            if not stray or self.loop.time() >= ends:
                return [f"{t.get_name()}: {t.get_coro()!r}" for t in stray]
            await asyncio.sleep(0.05)

    # -- the verdict --

    def fault_activities(self) -> tuple[FaultActivity, ...]:
        out = []
        for fault in self.scenario.faults:
            activity = self.activities.get(fault.name)
            if activity is None:
                out.append(
                    FaultActivity(fault.name, fault.phase, fault.via, fault.kind, None, None, 0)
                )
                continue
            out.append(
                FaultActivity(
                    fault.name,
                    fault.phase,
                    fault.via,
                    fault.kind,
                    activity["applied_at"],
                    activity["removed_at"],
                    int(activity["fired"]),
                )
            )
        return tuple(out)

    def fault_log(self) -> tuple[dict[str, Any], ...]:
        entries: list[dict[str, Any]] = []
        if self.proxy is not None:
            for record in self.proxy.fault_log():
                entries.append(
                    {
                        "source": "proxy",
                        "at": record.at,
                        "connection": record.connection,
                        "toxic": record.toxic,
                        "action": record.action,
                        "value": record.value,
                    }
                )
        if self.injector is not None:
            for injection in self.injector.log:
                entries.append(
                    {
                        "source": "injector",
                        "target": injection.target.value,
                        "ordinal": injection.ordinal,
                        "strategy": injection.strategy,
                        "kind": injection.kind.value,
                        # The table names carry the run id: normalised, so that two
                        # runs with the same seed give the same log.
                        "statement": (
                            None
                            if injection.statement is None
                            else injection.statement.replace(self.run_id, "<run>")
                        ),
                    }
                )
        return tuple(entries)

    def stats(self) -> tuple[PhaseStats, ...]:
        duration = self.scenario.duration
        out = [
            phase_stats(
                self.records,
                p.name,
                p.start,
                p.end,
                tuple(f.name for f in p.faults),
                complete_by=math.inf if p.end >= duration else p.end,
            )
            for p in self.scenario.phases
        ]
        whole = phase_stats(self.records, "(all)", 0.0, math.inf)
        # The whole run's window is the time the workload ran (for its throughput).
        out.append(dataclasses.replace(whole, end=max(self.elapsed, 1e-9)))
        return tuple(out)

    def checks(self, stats: tuple[PhaseStats, ...]) -> list[CheckResult]:
        enabled = self.scenario.invariants.enabled
        results: list[CheckResult] = []
        if self.final is not None:
            for check in check_writes(self.records, self.final):
                if check.name != "unknown_outcomes" and not enabled(check.name):
                    check = CheckResult(
                        check.name, "invariant", "skipped", "turned off in [invariants]"
                    )
                results.append(check)

        def add(name: str, ok: bool, summary: str, details: list[str] | None = None) -> None:
            if not enabled(name):
                results.append(
                    CheckResult(name, "invariant", "skipped", "turned off in [invariants]")
                )
                return
            results.append(
                CheckResult(
                    name, "invariant", "pass" if ok else "fail", summary, tuple(details or ())
                )
            )

        if self.pool_checked_out is not None:
            add(
                "pool_checked_in",
                self.pool_checked_out == 0,
                f"{self.pool_checked_out} connections checked out after the workload",
            )
        if self.leaked_sessions is not None:
            add(
                "no_leaked_sessions",
                not self.leaked_sessions,
                f"{len(self.leaked_sessions)} sessions of the run left in pg_stat_activity "
                f"(application_name {self.app_name!r})",
                self.leaked_sessions,
            )
        elif self.scenario.target.dialect != "postgresql":
            results.append(
                CheckResult(
                    "no_leaked_sessions",
                    "invariant",
                    "skipped",
                    "SQLite has no server sessions (pg_stat_activity is PostgreSQL's)",
                )
            )
        add(
            "no_stray_tasks",
            not self.stray_tasks,
            f"{len(self.stray_tasks)} asyncio tasks of the run still pending",
            self.stray_tasks,
        )
        fired = check_faults_fired(self.fault_activities())
        if not enabled("faults_fired"):
            fired = CheckResult(
                "faults_fired", "invariant", "skipped", "turned off in [invariants]"
            )
        results.append(fired)
        by_name = {s.name: s for s in stats}
        results.extend(
            check_steady_state(
                self.scenario,
                by_name,
                self.breaker_events,
                elapsed=self.elapsed,
                watchdog_fired=self.watchdog_fired,
            )
        )
        return results

    def target_info(self) -> dict[str, Any]:
        target = self.scenario.target
        shown = (
            "embedded SQLite (temporary file)"
            if target.url is None
            else make_url(target.url).render_as_string(hide_password=True)
        )
        return {
            "url": shown,
            "dialect": target.dialect,
            "proxy": self.proxy.listen if self.proxy is not None else None,
            "injector": self.injector is not None or self.scenario.uses_injector,
            "api": self.scenario.workload.api,
            "application_name": self.app_name if target.dialect == "postgresql" else None,
        }


def _id_values(rows: Sequence[Any]) -> dict[int, int]:
    values: dict[int, int] = {}
    for row in rows:
        ident, value = tuple(row)
        values[int(ident)] = int(value)
    return values


class _Offered:
    """The offered schedule: operation *n* may start at its slot time, not before."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.reset()

    def reset(self) -> None:
        self.at = 0.0
        self.index = 0

    def rate_at(self, at: float) -> float:
        rate = self.scenario.workload.rate
        for phase in self.scenario.phases:
            if phase.rate is not None and phase.start <= at < phase.end:
                rate = phase.rate
        return rate

    def next(self) -> tuple[int, float] | None:
        limit = self.scenario.workload.operations
        if limit is not None and self.index >= limit:
            return None
        at = self.at
        if at >= self.scenario.duration:
            return None
        self.index += 1
        self.at = at + 1.0 / self.rate_at(at)
        return self.index, at


def _policy(
    op: OperationSpec,
    breaker: CircuitBreaker | Literal[False],
    bulkhead: Bulkhead | None,
    budget: RetryBudget | None,
) -> Policy:
    spec: PolicySpec = op.policy
    return Policy(
        timeout=spec.timeout,
        deadline=spec.deadline,
        retries=spec.retries,
        backoff=Backoff(
            initial=spec.backoff.initial,
            max=spec.backoff.max,
            multiplier=spec.backoff.multiplier,
            jitter=spec.backoff.jitter,
        ),
        breaker=breaker,
        bulkhead=bulkhead,
        idempotent=spec.idempotent,
        retry_budget=budget,
        name=f"chaos.{op.kind}",
    )


def _engine_executor(db: ResilientEngine, tables: _Tables) -> _Executor:
    async def run(kind: str, key: str | None, target: int | None, attempts: list[int]) -> None:
        async def unit(session: AsyncSession) -> None:
            attempts[0] += 1
            await tables.body(session, kind, key, target)

        await db.run_transaction(unit)

    return run


def _decorator_executor(
    policy: Policy, sessions: async_sessionmaker[AsyncSession], tables: _Tables
) -> _Executor:
    @policy
    async def unit(kind: str, key: str | None, target: int | None, attempts: list[int]) -> None:
        attempts[0] += 1
        async with sessions.begin() as session:
            await tables.body(session, kind, key, target)

    return unit


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Take over SQLite's transactions (SQLAlchemy's recipe), so a read-modify-write
    is serializable: the driver stops emitting BEGIN itself, we emit it at the start
    of every transaction."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(_SQLITE_BEGIN.get())


# -- the entry point ------------------------------------------------------------------------


async def run_scenario(
    scenario: Scenario,
    *,
    report_dir: str | os.PathLike[str] | None = None,
    junit: str | os.PathLike[str] | None = None,
    progress: bool | TextIO = False,
    handle_signals: bool = False,
) -> RunResult:
    """Run ``scenario`` and return what happened; write the reports when asked.

    Args:
        scenario: from :func:`load_scenario`.
        report_dir: write ``operations.jsonl``, ``faults.jsonl``, ``samples.jsonl``,
            ``report.json``, ``report.html`` and ``junit.xml`` under
            ``report_dir/<scenario name>/`` (``None``: no files).
        junit: also write the JUnit XML report to this file.
        progress: show a progress line on stderr (``True``) or on this stream.
        handle_signals: on SIGINT/SIGTERM, stop the workers, clean up and return
            with :attr:`ExitCode.INTERRUPTED` (a second signal stops at once). For
            command-line use; leave it off inside an application or a test.

    The result's :attr:`RunResult.exit_code` is the verdict. This coroutine does not
    raise for a failing run, nor for a harness error (exit code 4, with
    :attr:`RunResult.error`); it raises ``KeyboardInterrupt`` on a second signal.
    """
    from resilient_db.chaos.report import write_reports

    shown: Progress | None = None
    if progress is True:
        shown = Progress()
    elif progress is not False:
        shown = Progress(progress)
    folder = None if report_dir is None else Path(report_dir) / scenario.name
    run = _Run(scenario, report_dir=folder, progress=shown)
    loop = run.loop
    installed: list[int] = []
    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, run.on_signal)
                installed.append(signum)
    run.say(
        f"chaos run {scenario.name} ({scenario.source}), seed {scenario.seed} "
        f"({scenario.seed_origin}), {scenario.duration:g} s, run id {run.run_id}"
    )
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            run.ops_file = (folder / "operations.jsonl").open("w", encoding="utf-8")
        try:
            await run.setup()
            await run.start()
            await run.wait()
            await run.stop_helpers()
            await run.settle()
        except HarnessError as exc:
            run.error = str(exc)
        except asyncio.CancelledError:
            if not run.interrupted:
                raise
        except Exception as exc:
            run.error = f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        finally:
            if not run.elapsed:
                run.elapsed = run.now() if run.workers else 0.0
            await run.stop_helpers()
            await run.teardown()
            if run.progress is not None:
                run.progress.close()
        run.stray_tasks = await run.find_stray_tasks()
    finally:
        for installed_signal in installed:
            loop.remove_signal_handler(installed_signal)

    stats = run.stats()
    checks = [] if run.error is not None else run.checks(stats)
    code = verdict(checks, harness_error=run.error is not None, interrupted=run.interrupted)
    result = RunResult(
        scenario=scenario,
        run_id=run.run_id,
        started_at=run.started_at,
        elapsed=run.elapsed,
        exit_code=code,
        records=tuple(sorted(run.records, key=lambda r: r.index)),
        samples=tuple(run.samples),
        breaker_events=tuple(run.breaker_events),
        faults=run.fault_activities(),
        fault_log=run.fault_log(),
        phase_stats=stats,
        checks=tuple(checks),
        replay=replay_command(scenario),
        versions=_versions(scenario.target.dialect),
        target=run.target_info(),
        error=run.error,
        interrupted=run.interrupted,
        watchdog_fired=run.watchdog_fired,
    )
    if folder is not None or junit is not None:
        try:
            files = write_reports(result, folder, junit=None if junit is None else Path(junit))
        except OSError as exc:
            print(f"resilient-db chaos: cannot write the reports: {exc}", file=sys.stderr)
        else:
            result.files.update(files)
    return result
