"""Chaos scenarios: a TOML file that says what to run, what to break, and what must hold.

A scenario is read with the standard library (``tomllib``) and validated into frozen
dataclasses; every error names the file, the key and the accepted values::

    quick.toml: workload.mix.inserts: unknown operation; accepted: insert, increment, rmw, read

The shape of a file (every table but ``[scenario]`` is optional; see
``docs/chaos.md`` for each key)::

    [scenario]
    name = "flaky-network"      # default: the file's name
    description = "..."
    seed = 7                    # default: random, printed so the run replays
    duration = 30               # seconds; default: the end of the last phase

    [target]
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"  # default: embedded SQLite
    proxy = true                # route through a ChaosProxy (default: when proxy faults exist)

    [workload]
    concurrency = 8
    rate = 80                   # operations offered per second
    api = "engine"              # "engine" (ResilientEngine.run_transaction) or "decorator"

    [workload.policy]           # every operation (keys of resilient_db.Policy)
    timeout = 1.0
    retries = 3

    [workload.mix]              # operation: weight, or a table with weight and policy keys
    insert = 4
    increment = 2
    rmw = { weight = 1, retries = 5 }
    read = 3

    [[phase]]
    name = "baseline"
    start = 0
    end = 5

    [[phase]]
    name = "flaky"
    start = 5
    end = 20
    faults = [{ proxy = "latency", latency = 0.03 }, { proxy = "reset_peer", toxicity = 0.3 }]

    [steady_state]
    baseline = "baseline"

    [[steady_state.check]]
    phase = "recovery"
    min_success_rate = 0.99
    max_p99_ratio = 3.0

Built-in scenarios live in ``resilient_db/chaos/scenarios/*.toml`` and are named
by their file stem (``resilient-db chaos list``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import math
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from resilient_db.chaos.injector import (
    Strategy,
    connect_failure,
    disconnect,
    hang,
    latency,
    sqlite_busy,
    sqlstate_error,
)
from resilient_db.chaos.proxy import TOXIC_TYPES, Toxic

__all__ = [
    "DEFAULT_SCENARIO",
    "INVARIANTS",
    "OPERATION_KINDS",
    "WRITE_KINDS",
    "BackoffSpec",
    "BreakerSpec",
    "BudgetSpec",
    "BulkheadSpec",
    "FaultSpec",
    "InvariantsSpec",
    "OperationSpec",
    "Phase",
    "PolicySpec",
    "Scenario",
    "ScenarioError",
    "SteadyState",
    "SteadyStateCheck",
    "TargetSpec",
    "Workload",
    "builtin_scenarios",
    "load_scenario",
    "parse_scenario",
]

DEFAULT_SCENARIO: Final = "quick"
"""The built-in scenario ``resilient-db chaos run`` runs without arguments."""

OPERATION_KINDS: Final = ("insert", "increment", "rmw", "read")
"""Workload operations: a unique insert, a counter increment, a read-modify-write
under SERIALIZABLE, a read."""

WRITE_KINDS: Final = ("insert", "increment", "rmw")

INVARIANTS: Final = (
    "acknowledged_writes_present",
    "no_duplicate_keys",
    "counters_within_bounds",
    "failed_writes_absent",
    "pool_checked_in",
    "no_leaked_sessions",
    "no_stray_tasks",
    "faults_fired",
)
"""The invariants a run checks (each can be turned off in ``[invariants]``)."""

Api: TypeAlias = Literal["engine", "decorator"]
Via: TypeAlias = Literal["proxy", "injector"]

_SUPPORTED_URLS: Final = "postgresql+asyncpg://... or sqlite+aiosqlite:///path"


class ScenarioError(ValueError):
    """A scenario file (or a command-line override) is invalid.

    Attributes:
        source: the file (or ``"builtin:<name>"``, or the option) the value came from.
        key: the dotted key of the offending value (``phase[2].faults[1].latency``).
        problem: what is wrong, with the accepted values.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


# -- the validated model ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackoffSpec:
    """Backoff between retries (see :class:`resilient_db.Backoff`)."""

    initial: float = 0.02
    max: float = 0.5
    multiplier: float = 2.0
    jitter: float = 1.0


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The policy one operation runs under (keys of :class:`resilient_db.Policy`).

    Attributes:
        timeout: per-attempt limit in seconds (``None``: none).
        deadline: overall limit of one operation, retries included (``None``: none).
        retries: additional attempts after the first.
        backoff: waits between attempts.
        idempotent: declare the unit safe to run twice, so that an attempt whose
            COMMIT was sent is retried. True of a unit that writes an idempotency
            key; a lie for the plain writes of this workload — which is how a
            scenario demonstrates a broken policy.
        verify_commits: resolve ambiguous COMMITs with ``pg_xact_status`` (engine
            API on PostgreSQL only).
    """

    timeout: float | None = 1.0
    deadline: float | None = 5.0
    retries: int = 3
    backoff: BackoffSpec = BackoffSpec()
    idempotent: bool = False
    verify_commits: bool = False


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """The circuit breaker guarding the database (keys of :class:`resilient_db.CircuitBreaker`)."""

    failure_threshold: int | None = 5
    failure_rate_threshold: float | None = 0.5
    minimum_calls: int = 20
    window: float = 10.0
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 0.8
    reset_timeout: float = 2.0
    half_open_max_calls: int = 1
    success_threshold: int | None = None


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """The retry budget shared by every operation (see :class:`resilient_db.RetryBudget`)."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    max_tokens: float = 100.0


@dataclass(frozen=True, slots=True)
class BulkheadSpec:
    """A bulkhead shared by every operation (see :class:`resilient_db.Bulkhead`)."""

    max_concurrent: int
    max_queue: int = 0
    queue_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """One operation of the mix: its kind, its weight and its policy."""

    kind: str
    weight: float
    policy: PolicySpec


@dataclass(frozen=True, slots=True)
class Workload:
    """What the clients do.

    Attributes:
        concurrency: workers, each running one operation at a time.
        rate: operations offered per second over all workers (a ceiling: a worker
            waits for its slot, and starts late when all workers are busy).
        api: ``"engine"``: units of work through :meth:`ResilientEngine.run_transaction`;
            ``"decorator"``: ``async def`` units decorated with a :class:`Policy`.
        operations: stop after this many operations (``None``: run for the duration).
        counters: how many counters (and SERIALIZABLE registers) the increments
            and read-modify-writes spread over.
        mix: the operations and their weights.
        breaker: the breaker guarding the database, ``None`` for none.
        retry_budget: the budget shared by all operations, ``None`` for none.
        bulkhead: a bulkhead shared by all operations, ``None`` for none.
    """

    concurrency: int = 4
    rate: float = 50.0
    api: Api = "engine"
    operations: int | None = None
    counters: int = 4
    mix: tuple[OperationSpec, ...] = ()
    breaker: BreakerSpec | None = BreakerSpec()
    retry_budget: BudgetSpec | None = BudgetSpec()
    bulkhead: BulkheadSpec | None = None

    def operation(self, kind: str) -> OperationSpec | None:
        """The spec of ``kind`` in the mix, if it is there."""
        return next((op for op in self.mix if op.kind == kind), None)


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """The database under test.

    Attributes:
        url: a ``postgresql+asyncpg`` or ``sqlite+aiosqlite`` URL; ``None``: an
            embedded SQLite database in a temporary file (faults from the
            in-process injector).
        proxy: connections go through a :class:`ChaosProxy` (PostgreSQL only).
        pool_size, max_overflow, pool_timeout, pool_pre_ping: the run engine's pool
            (``pool_size`` and ``max_overflow`` default to the workload's concurrency).
        sqlite_busy_timeout: SQLite's own wait for a lock before SQLITE_BUSY.
    """

    url: str | None = None
    proxy: bool = False
    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float = 5.0
    pool_pre_ping: bool = True
    sqlite_busy_timeout: float = 0.25

    @property
    def dialect(self) -> Literal["postgresql", "sqlite"]:
        """The database the URL names (SQLite for the embedded default)."""
        if self.url is None:
            return "sqlite"
        return "postgresql" if make_url(self.url).get_backend_name() == "postgresql" else "sqlite"


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault a phase adds at its start and removes at its end.

    Attributes:
        via: ``"proxy"`` (a :class:`ChaosProxy` toxic or action) or ``"injector"``
            (a :class:`FaultInjector` strategy).
        kind: the toxic type (``latency``, ``reset_peer``, ``drop_commit_ack``...), the
            proxy action (``disable``, ``refuse``, ``half_open``, ``kill``,
            ``connect_delay``) or the injector strategy (``disconnect``, ``hang``...).
        name: unique within the run: ``"<phase>/<kind>"`` unless given.
        phase: the phase that applies it.
        params: the validated parameters, in the units of the Python API.
        every: for ``kill``: repeat every this many seconds during the phase.
    """

    via: Via
    kind: str
    name: str
    phase: str
    params: tuple[tuple[str, Any], ...] = ()
    every: float | None = None

    def param(self, key: str, default: Any = None) -> Any:
        """The value of parameter ``key`` (``default`` when not given)."""
        return dict(self.params).get(key, default)

    def toxic(self) -> Toxic:
        """The :class:`~resilient_db.chaos.Toxic` of a proxy toxic fault."""
        cls = TOXIC_TYPES[self.kind]
        return cls(name=self.name, **dict(self.params))

    def strategy(self, enabled: bool | Callable[[], bool] = True) -> Strategy:
        """The :class:`~resilient_db.chaos.Strategy` of an injector fault."""
        params = dict(self.params)
        build = _STRATEGY_BUILDERS[self.kind]
        return build(name=self.name, enabled=enabled, **params)

    @property
    def is_action(self) -> bool:
        """A proxy action (``disable``...) rather than a toxic or a strategy."""
        return self.via == "proxy" and self.kind in _PROXY_ACTIONS


@dataclass(frozen=True, slots=True)
class Phase:
    """A window of the run, with the faults in force during it.

    Attributes:
        name: unique within the scenario.
        start: seconds from the start of the run.
        end: seconds from the start of the run (exclusive).
        faults: added at ``start``, removed at ``end``. Phases may overlap.
        rate: operations offered per second during the phase (``None``: the
            workload's rate) — an overload is a phase with a higher rate.
    """

    name: str
    start: float
    end: float
    faults: tuple[FaultSpec, ...] = ()
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class SteadyStateCheck:
    """Expectations for one phase, relative to the baseline phase where they can be.

    Attributes:
        phase: the phase whose operations are judged (those that started and ended
            within it).
        min_success_rate: acknowledged / all operations of the phase.
        max_p99_ratio: p99 latency of acknowledged operations <=
            ``max_p99_ratio`` × the baseline's p99 (+ ``p99_tolerance``).
        max_p99: p99 latency of acknowledged operations, in seconds.
        min_throughput_ratio: acknowledged operations per second >= this × the
            baseline's.
        breaker_closed_within: the breaker is closed this many seconds after the
            end of the phase.
    """

    phase: str
    min_success_rate: float | None = None
    max_p99_ratio: float | None = None
    max_p99: float | None = None
    min_throughput_ratio: float | None = None
    breaker_closed_within: float | None = None


@dataclass(frozen=True, slots=True)
class SteadyState:
    """The steady-state hypothesis: a baseline phase and checks against it.

    Attributes:
        baseline: the phase (without faults) ratios are relative to.
        p99_tolerance: seconds added to ``ratio × baseline p99`` before comparing,
            so that a baseline of a millisecond does not make a check of noise.
        checks: the expectations.
    """

    baseline: str | None = None
    p99_tolerance: float = 0.025
    checks: tuple[SteadyStateCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class InvariantsSpec:
    """Which invariants are checked (all, unless turned off)."""

    acknowledged_writes_present: bool = True
    no_duplicate_keys: bool = True
    counters_within_bounds: bool = True
    failed_writes_absent: bool = True
    pool_checked_in: bool = True
    no_leaked_sessions: bool = True
    no_stray_tasks: bool = True
    faults_fired: bool = True

    def enabled(self, name: str) -> bool:
        """Whether invariant ``name`` is checked."""
        return bool(getattr(self, name))


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated chaos scenario.

    Attributes:
        name: the scenario's name (reports are written under it).
        description: one paragraph saying what it shows.
        source: the file it was read from, or ``"builtin:<name>"``.
        sha256: hash of the file's bytes (the report's ``scenario_hash``).
        seed: every random decision of the run derives from it.
        seed_origin: ``"scenario"``, ``"--seed"`` or ``"random"``.
        duration: planned seconds of workload.
        target, workload, phases, steady_state, invariants: see their classes.
        overrides: command-line overrides applied (``{"url": ..., "seed": ...}``).
    """

    name: str
    source: str
    sha256: str
    seed: int
    duration: float
    description: str = ""
    seed_origin: str = "scenario"
    target: TargetSpec = TargetSpec()
    workload: Workload = Workload()
    phases: tuple[Phase, ...] = ()
    steady_state: SteadyState = SteadyState()
    invariants: InvariantsSpec = InvariantsSpec()
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def faults(self) -> tuple[FaultSpec, ...]:
        """Every fault of every phase, in phase order."""
        return tuple(f for phase in self.phases for f in phase.faults)

    def phase(self, name: str) -> Phase:
        """The phase called ``name`` (``KeyError`` if none)."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise KeyError(name)

    @property
    def uses_injector(self) -> bool:
        """Some phase has an in-process injector fault."""
        return any(f.via == "injector" for f in self.faults)


# -- reading -----------------------------------------------------------------------------


def builtin_scenarios() -> dict[str, str]:
    """The built-in scenarios: name → TOML text."""
    root = importlib.resources.files("resilient_db.chaos") / "scenarios"
    found: dict[str, str] = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name[: -len(".toml")]] = entry.read_text(encoding="utf-8")
    return dict(sorted(found.items()))


def load_scenario(
    scenario: str | Path | None = None,
    *,
    url: str | None = None,
    seed: int | None = None,
    duration: float | None = None,
) -> Scenario:
    """Read a scenario file, or a built-in scenario by name, and validate it.

    Args:
        scenario: a path to a ``.toml`` file, or the name of a built-in scenario
            (default: :data:`DEFAULT_SCENARIO`). A name that is also an existing
            file is read as the file.
        url: replaces ``target.url`` (``--url``).
        seed: replaces ``scenario.seed`` (``--seed``).
        duration: replaces ``scenario.duration`` (``--duration``); phases and
            their checks are scaled to it.

    Raises:
        ScenarioError: the file is missing, is not TOML, or fails validation.
    """
    if scenario is None:
        scenario = DEFAULT_SCENARIO
    path = Path(scenario)
    builtins = builtin_scenarios()
    if path.is_file():
        source = str(scenario)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(source, "", f"cannot read the file: {exc}") from exc
        default_name = path.stem
    elif isinstance(scenario, str) and scenario in builtins:
        source = f"builtin:{scenario}"
        text = builtins[scenario]
        default_name = scenario
    else:
        names = ", ".join(builtins) or "none"
        raise ScenarioError(
            str(scenario),
            "",
            f"no such file, and not a built-in scenario; built-in scenarios: {names}",
        )
    return parse_scenario(
        text, source=source, default_name=default_name, url=url, seed=seed, duration=duration
    )


def parse_scenario(
    text: str,
    *,
    source: str = "<scenario>",
    default_name: str = "scenario",
    url: str | None = None,
    seed: int | None = None,
    duration: float | None = None,
) -> Scenario:
    """Validate scenario TOML text (see :func:`load_scenario` for the overrides)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"not valid TOML: {exc}") from exc
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _Validator(source).scenario(
        data, digest=digest, default_name=default_name, url=url, seed=seed, duration=duration
    )


# -- validation ------------------------------------------------------------------------------

_ACCEPTED_NUMBER = "a number"


def _kind_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


class _Validator:
    """Turns the parsed TOML into the model; every error names source and key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(self.source, key, problem)

    def bad(self, key: str, value: object, accepted: str) -> ScenarioError:
        return self.fail(key, f"got {_kind_name(value)} {value!r}; accepted: {accepted}")

    # -- scalar checks --

    def number(
        self,
        key: str,
        value: object,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
        accepted = _ACCEPTED_NUMBER + (" " + " and ".join(parts) if parts else "")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(key, value, accepted)
        result = float(value)
        if math.isnan(result) or math.isinf(result):
            raise self.bad(key, value, accepted)
        if minimum is not None and (result < minimum or (exclusive_minimum and result == minimum)):
            raise self.bad(key, value, accepted)
        if maximum is not None and result > maximum:
            raise self.bad(key, value, accepted)
        return result

    def seconds(self, key: str, value: object, *, allow_zero: bool = False) -> float:
        accepted = f"a number of seconds {'>= 0' if allow_zero else '> 0'}"
        try:
            return self.number(key, value, minimum=0.0, exclusive_minimum=not allow_zero)
        except ScenarioError:
            raise self.bad(key, value, accepted) from None

    def optional_seconds(self, key: str, value: object) -> float | None:
        if value is False:
            return None
        try:
            return self.seconds(key, value)
        except ScenarioError:
            raise self.bad(key, value, "a number of seconds > 0, or false for none") from None

    def integer(self, key: str, value: object, *, minimum: int) -> int:
        accepted = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.bad(key, value, accepted)
        return value

    def fraction(self, key: str, value: object, *, allow_zero: bool = True) -> float:
        accepted = "a number in [0, 1]" if allow_zero else "a number in (0, 1]"
        try:
            return self.number(
                key, value, minimum=0.0, maximum=1.0, exclusive_minimum=not allow_zero
            )
        except ScenarioError:
            raise self.bad(key, value, accepted) from None

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.bad(key, value, "a non-empty string")
        return value

    def choice(self, key: str, value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.bad(key, value, ", ".join(choices))
        return value

    def regex(self, key: str, value: object) -> str:
        text = self.string(key, value)
        try:
            re.compile(text)
        except re.error as exc:
            raise self.fail(
                key, f"not a valid regular expression ({exc}); accepted: a regular expression"
            ) from exc
        return text

    def table(self, key: str, value: object, accepted_keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key, value, "a table with keys " + ", ".join(accepted_keys))
        for name in value:
            if name not in accepted_keys:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, "unknown key; accepted: " + ", ".join(accepted_keys))
        return value

    # -- the scenario --

    def scenario(
        self,
        data: dict[str, Any],
        *,
        digest: str,
        default_name: str,
        url: str | None,
        seed: int | None,
        duration: float | None,
    ) -> Scenario:
        top = self.table(
            "",
            data,
            ("scenario", "target", "workload", "phase", "steady_state", "invariants"),
        )
        head = self.table(
            "scenario", top.get("scenario", {}), ("name", "description", "seed", "duration")
        )
        name = self.string("scenario.name", head.get("name", default_name))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise self.bad(
                "scenario.name",
                name,
                "letters, digits, '-', '_' and '.' (it names the report folder)",
            )
        description = head.get("description", "")
        if not isinstance(description, str):
            raise self.bad("scenario.description", description, "a string")
        overrides: dict[str, Any] = {}
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ScenarioError(
                    "--seed", "scenario.seed", f"got {seed!r}; accepted: an integer >= 0"
                )
            run_seed, origin = seed, "--seed"
            overrides["seed"] = seed
        elif "seed" in head:
            run_seed, origin = self.integer("scenario.seed", head["seed"], minimum=0), "scenario"
        else:
            run_seed, origin = random.SystemRandom().randrange(2**31), "random"

        target, proxy_given = self.target(top.get("target", {}), url)
        if url is not None:
            overrides["url"] = url
        workload = self.workload(top.get("workload", {}), target)
        phases = self.phases(top.get("phase", []), target)
        wants_proxy = any(f.via == "proxy" for p in phases for f in p.faults)
        if proxy_given is None:
            # Not asked for explicitly: proxy faults switch the proxy on.
            target = dataclasses.replace(target, proxy=wants_proxy)
        elif wants_proxy and not proxy_given:
            raise self.fail(
                "target.proxy",
                "got false, but phases have proxy faults; accepted: proxy = true (or remove "
                "the proxy faults)",
            )

        last_end = max((p.end for p in phases), default=None)
        if "duration" in head:
            planned = self.seconds("scenario.duration", head["duration"])
        elif last_end is not None:
            planned = last_end
        else:
            raise self.fail(
                "scenario.duration",
                "required when there are no phases; accepted: a number of seconds > 0",
            )
        for index, phase in enumerate(phases, 1):
            if phase.end > planned:
                raise self.fail(
                    f"phase[{index}].end",
                    f"got {phase.end:g}, past scenario.duration ({planned:g}); accepted: "
                    f"a number of seconds <= {planned:g}",
                )
        steady = self.steady_state(top.get("steady_state", {}), phases, workload, planned)
        invariants = self.invariants(top.get("invariants", {}))

        if duration is not None:
            if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
                raise ScenarioError(
                    "--duration",
                    "scenario.duration",
                    f"got {duration!r}; accepted: a number of seconds > 0",
                )
            factor = float(duration) / planned
            phases = tuple(
                Phase(p.name, p.start * factor, p.end * factor, p.faults, p.rate) for p in phases
            )
            planned = float(duration)
            overrides["duration"] = planned
            self.check_breaker_windows(steady, phases, planned, source="--duration")

        return Scenario(
            name=name,
            source=self.source,
            sha256=digest,
            seed=run_seed,
            seed_origin=origin,
            duration=planned,
            description=" ".join(description.split()),
            target=target,
            workload=workload,
            phases=phases,
            steady_state=steady,
            invariants=invariants,
            overrides=overrides,
        )

    def target(self, value: object, url_override: str | None) -> tuple[TargetSpec, bool | None]:
        data = self.table(
            "target",
            value,
            (
                "url",
                "proxy",
                "pool_size",
                "max_overflow",
                "pool_timeout",
                "pool_pre_ping",
                "sqlite_busy_timeout",
            ),
        )
        url: str | None = None
        url_source = self.source
        if url_override is not None:
            raw: object = url_override
            url_source = "--url"
        else:
            raw = data.get("url")
        if raw is not None:
            key = "target.url"
            if not isinstance(raw, str):
                raise ScenarioError(url_source, key, f"got {raw!r}; accepted: {_SUPPORTED_URLS}")
            try:
                parsed = make_url(raw)
            except ArgumentError as exc:
                raise ScenarioError(
                    url_source, key, f"not a database URL ({exc}); accepted: {_SUPPORTED_URLS}"
                ) from exc
            if parsed.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
                raise ScenarioError(
                    url_source,
                    key,
                    f"driver {parsed.drivername!r} is not supported; accepted: {_SUPPORTED_URLS}",
                )
            if parsed.drivername == "sqlite+aiosqlite" and parsed.database in (
                None,
                "",
                ":memory:",
            ):
                raise ScenarioError(
                    url_source,
                    key,
                    "an in-memory SQLite database shares one connection between all workers; "
                    "accepted: sqlite+aiosqlite:///path/to/file.db",
                )
            url = raw
        proxy_raw = data.get("proxy")
        proxy_given = None if proxy_raw is None else self.boolean("target.proxy", proxy_raw)
        pool_size = None
        if "pool_size" in data:
            pool_size = self.integer("target.pool_size", data["pool_size"], minimum=1)
        spec = TargetSpec(
            url=url,
            proxy=bool(proxy_given),
            pool_size=pool_size,
            max_overflow=(
                self.integer("target.max_overflow", data["max_overflow"], minimum=0)
                if "max_overflow" in data
                else None
            ),
            pool_timeout=self.seconds("target.pool_timeout", data.get("pool_timeout", 5.0)),
            pool_pre_ping=self.boolean("target.pool_pre_ping", data.get("pool_pre_ping", True)),
            sqlite_busy_timeout=self.seconds(
                "target.sqlite_busy_timeout", data.get("sqlite_busy_timeout", 0.25), allow_zero=True
            ),
        )
        if spec.proxy and spec.dialect != "postgresql":
            raise ScenarioError(
                url_source if url_override is not None else self.source,
                "target.proxy",
                "the chaos proxy reads the PostgreSQL protocol; accepted: proxy = true with a "
                "postgresql+asyncpg URL, or proxy = false",
            )
        return spec, proxy_given

    def policy(self, key: str, data: dict[str, Any], base: PolicySpec, api: Api) -> PolicySpec:
        backoff = base.backoff
        if "backoff" in data:
            raw = self.table(
                f"{key}.backoff", data["backoff"], ("initial", "max", "multiplier", "jitter")
            )
            initial = self.seconds(
                f"{key}.backoff.initial", raw.get("initial", backoff.initial), allow_zero=True
            )
            maximum = self.seconds(
                f"{key}.backoff.max", raw.get("max", backoff.max), allow_zero=True
            )
            if maximum < initial:
                raise self.fail(
                    f"{key}.backoff.max",
                    f"got {maximum:g}, below backoff.initial ({initial:g}); accepted: a number "
                    f"of seconds >= {initial:g}",
                )
            multiplier = self.number(
                f"{key}.backoff.multiplier", raw.get("multiplier", backoff.multiplier), minimum=1.0
            )
            jitter = self.fraction(f"{key}.backoff.jitter", raw.get("jitter", backoff.jitter))
            backoff = BackoffSpec(initial, maximum, multiplier, jitter)
        spec = PolicySpec(
            timeout=(
                self.optional_seconds(f"{key}.timeout", data["timeout"])
                if "timeout" in data
                else base.timeout
            ),
            deadline=(
                self.optional_seconds(f"{key}.deadline", data["deadline"])
                if "deadline" in data
                else base.deadline
            ),
            retries=(
                self.integer(f"{key}.retries", data["retries"], minimum=0)
                if "retries" in data
                else base.retries
            ),
            backoff=backoff,
            idempotent=(
                self.boolean(f"{key}.idempotent", data["idempotent"])
                if "idempotent" in data
                else base.idempotent
            ),
            verify_commits=(
                self.boolean(f"{key}.verify_commits", data["verify_commits"])
                if "verify_commits" in data
                else base.verify_commits
            ),
        )
        if "verify_commits" in data and spec.verify_commits and api != "engine":
            raise self.fail(
                f"{key}.verify_commits",
                'needs the engine wrapper; accepted: workload.api = "engine", '
                "or verify_commits = false",
            )
        if spec.timeout is None and spec.deadline is None:
            raise self.fail(
                f"{key}.timeout",
                "an operation needs a timeout or a deadline, or a run could wait forever; "
                "accepted: a number of seconds > 0",
            )
        return spec

    def workload(self, value: object, target: TargetSpec) -> Workload:
        data = self.table(
            "workload",
            value,
            (
                "concurrency",
                "rate",
                "api",
                "operations",
                "counters",
                "policy",
                "mix",
                "breaker",
                "retry_budget",
                "bulkhead",
            ),
        )
        api: Api = "engine"
        if "api" in data:
            api = (
                "engine"
                if self.choice("workload.api", data["api"], ("engine", "decorator")) == "engine"
                else "decorator"
            )
        policy_keys = ("timeout", "deadline", "retries", "backoff", "idempotent", "verify_commits")
        base = self.policy(
            "workload.policy",
            self.table("workload.policy", data.get("policy", {}), policy_keys),
            PolicySpec(),
            api,
        )
        mix_raw = data.get("mix", {"insert": 4, "increment": 2, "rmw": 1, "read": 3})
        if not isinstance(mix_raw, dict) or not mix_raw:
            raise self.bad(
                "workload.mix",
                mix_raw,
                "a table of operation = weight (or = { weight = ..., policy keys }); operations: "
                + ", ".join(OPERATION_KINDS),
            )
        mix: list[OperationSpec] = []
        for kind, entry in mix_raw.items():
            key = f"workload.mix.{kind}"
            if kind not in OPERATION_KINDS:
                raise self.fail(key, "unknown operation; accepted: " + ", ".join(OPERATION_KINDS))
            if isinstance(entry, dict):
                entry = self.table(key, entry, ("weight", *policy_keys))
                if "weight" not in entry:
                    raise self.fail(f"{key}.weight", "required; accepted: a number >= 0")
                weight = self.number(f"{key}.weight", entry["weight"], minimum=0.0)
                policy = self.policy(
                    key, {k: v for k, v in entry.items() if k != "weight"}, base, api
                )
            else:
                weight = self.number(key, entry, minimum=0.0)
                policy = base
            if policy.verify_commits and target.dialect != "postgresql":
                raise self.fail(
                    f"{key}.verify_commits"
                    if isinstance(entry, dict) and "verify_commits" in entry
                    else "workload.policy.verify_commits",
                    "pg_xact_status needs PostgreSQL; accepted: verify_commits = false on SQLite",
                )
            mix.append(OperationSpec(kind, weight, policy))
        if not any(op.weight > 0 for op in mix):
            raise self.fail("workload.mix", "every weight is 0; accepted: at least one weight > 0")

        breaker: BreakerSpec | None = BreakerSpec()
        if "breaker" in data:
            raw_breaker = data["breaker"]
            if raw_breaker is False:
                breaker = None
            else:
                fields_ = BreakerSpec.__slots__
                raw = self.table("workload.breaker", raw_breaker, tuple(fields_))
                default = BreakerSpec()
                k = "workload.breaker."
                breaker = BreakerSpec(
                    failure_threshold=(
                        None
                        if raw.get("failure_threshold") is False
                        else self.integer(
                            k + "failure_threshold",
                            raw.get("failure_threshold", default.failure_threshold),
                            minimum=1,
                        )
                    ),
                    failure_rate_threshold=(
                        None
                        if raw.get("failure_rate_threshold") is False
                        else self.fraction(
                            k + "failure_rate_threshold",
                            raw.get("failure_rate_threshold", default.failure_rate_threshold),
                            allow_zero=False,
                        )
                    ),
                    minimum_calls=self.integer(
                        k + "minimum_calls",
                        raw.get("minimum_calls", default.minimum_calls),
                        minimum=1,
                    ),
                    window=self.seconds(k + "window", raw.get("window", default.window)),
                    slow_call_duration=(
                        self.optional_seconds(k + "slow_call_duration", raw["slow_call_duration"])
                        if "slow_call_duration" in raw
                        else None
                    ),
                    slow_call_rate_threshold=self.fraction(
                        k + "slow_call_rate_threshold",
                        raw.get("slow_call_rate_threshold", default.slow_call_rate_threshold),
                        allow_zero=False,
                    ),
                    reset_timeout=self.seconds(
                        k + "reset_timeout", raw.get("reset_timeout", default.reset_timeout)
                    ),
                    half_open_max_calls=self.integer(
                        k + "half_open_max_calls",
                        raw.get("half_open_max_calls", default.half_open_max_calls),
                        minimum=1,
                    ),
                    success_threshold=(
                        self.integer(k + "success_threshold", raw["success_threshold"], minimum=1)
                        if "success_threshold" in raw
                        else None
                    ),
                )
        budget: BudgetSpec | None = BudgetSpec()
        if "retry_budget" in data:
            raw_budget = data["retry_budget"]
            if raw_budget is False:
                budget = None
            else:
                raw = self.table(
                    "workload.retry_budget", raw_budget, ("ratio", "min_per_second", "max_tokens")
                )
                default_budget = BudgetSpec()
                budget = BudgetSpec(
                    ratio=self.fraction(
                        "workload.retry_budget.ratio", raw.get("ratio", default_budget.ratio)
                    ),
                    min_per_second=self.number(
                        "workload.retry_budget.min_per_second",
                        raw.get("min_per_second", default_budget.min_per_second),
                        minimum=0.0,
                    ),
                    max_tokens=self.number(
                        "workload.retry_budget.max_tokens",
                        raw.get("max_tokens", default_budget.max_tokens),
                        minimum=0.0,
                    ),
                )
        bulkhead: BulkheadSpec | None = None
        if "bulkhead" in data and data["bulkhead"] is not False:
            raw = self.table(
                "workload.bulkhead",
                data["bulkhead"],
                ("max_concurrent", "max_queue", "queue_timeout"),
            )
            if "max_concurrent" not in raw:
                raise self.fail(
                    "workload.bulkhead.max_concurrent", "required; accepted: an integer >= 1"
                )
            bulkhead = BulkheadSpec(
                max_concurrent=self.integer(
                    "workload.bulkhead.max_concurrent", raw["max_concurrent"], minimum=1
                ),
                max_queue=self.integer(
                    "workload.bulkhead.max_queue", raw.get("max_queue", 0), minimum=0
                ),
                queue_timeout=(
                    self.seconds(
                        "workload.bulkhead.queue_timeout", raw["queue_timeout"], allow_zero=True
                    )
                    if "queue_timeout" in raw
                    else None
                ),
            )
        operations = None
        if "operations" in data:
            operations = self.integer("workload.operations", data["operations"], minimum=1)
        return Workload(
            concurrency=self.integer("workload.concurrency", data.get("concurrency", 4), minimum=1),
            rate=self.number(
                "workload.rate", data.get("rate", 50.0), minimum=0.0, exclusive_minimum=True
            ),
            api=api,
            operations=operations,
            counters=self.integer("workload.counters", data.get("counters", 4), minimum=1),
            mix=tuple(mix),
            breaker=breaker,
            retry_budget=budget,
            bulkhead=bulkhead,
        )

    def phases(self, value: object, target: TargetSpec) -> tuple[Phase, ...]:
        if not isinstance(value, list):
            raise self.bad(
                "phase", value, "an array of tables ([[phase]] with name, start, end, faults)"
            )
        phases: list[Phase] = []
        names: set[str] = set()
        fault_names: set[str] = set()
        for index, raw in enumerate(value, 1):
            key = f"phase[{index}]"
            data = self.table(key, raw, ("name", "start", "end", "faults", "rate"))
            for required in ("name", "start", "end"):
                if required not in data:
                    accepted = (
                        "a non-empty string" if required == "name" else "a number of seconds >= 0"
                    )
                    raise self.fail(f"{key}.{required}", f"required; accepted: {accepted}")
            name = self.string(f"{key}.name", data["name"])
            if name in names:
                raise self.fail(
                    f"{key}.name",
                    f"{name!r} is already the name of another phase; accepted: a unique name",
                )
            names.add(name)
            start = self.seconds(f"{key}.start", data["start"], allow_zero=True)
            end = self.seconds(f"{key}.end", data["end"])
            if end <= start:
                raise self.fail(
                    f"{key}.end",
                    f"got {end:g}, not after start ({start:g}); accepted: a number > {start:g}",
                )
            rate = None
            if "rate" in data:
                rate = self.number(f"{key}.rate", data["rate"], minimum=0.0, exclusive_minimum=True)
            faults_raw = data.get("faults", [])
            if not isinstance(faults_raw, list):
                raise self.bad(f"{key}.faults", faults_raw, "an array of tables (one per fault)")
            faults: list[FaultSpec] = []
            for number, fault_raw in enumerate(faults_raw, 1):
                fault = self.fault(f"{key}.faults[{number}]", fault_raw, phase=name)
                if fault.name in fault_names:
                    raise self.fail(
                        f"{key}.faults[{number}].name",
                        f"{fault.name!r} is already the name of another fault; "
                        "accepted: a unique name",
                    )
                fault_names.add(fault.name)
                self.fault_fits_target(f"{key}.faults[{number}]", fault, target)
                faults.append(fault)
            phases.append(Phase(name, start, end, tuple(faults), rate))
        return tuple(phases)

    def fault(self, key: str, value: object, *, phase: str) -> FaultSpec:
        if not isinstance(value, dict):
            raise self.bad(key, value, 'a table such as { proxy = "latency", latency = 0.05 }')
        has_proxy, has_injector = "proxy" in value, "injector" in value
        if has_proxy == has_injector:
            raise self.fail(
                key,
                'name exactly one of proxy = "<toxic or action>" or injector = "<strategy>"; '
                "accepted proxy faults: "
                + ", ".join(sorted(_PROXY_KINDS))
                + "; accepted injector faults: "
                + ", ".join(sorted(_INJECTOR_KINDS)),
            )
        via: Via = "proxy" if has_proxy else "injector"
        kinds = _PROXY_KINDS if has_proxy else _INJECTOR_KINDS
        kind = self.choice(f"{key}.{via}", value[via], tuple(sorted(kinds)))
        params_spec = kinds[kind]
        accepted_keys = (via, "name", *params_spec)
        if via == "proxy" and kind == "kill":
            accepted_keys = (*accepted_keys, "every")
        data = self.table(key, value, accepted_keys)
        name = self.string(f"{key}.name", data["name"]) if "name" in data else f"{phase}/{kind}"
        params: dict[str, Any] = {}
        for param, check in params_spec.items():
            if param in data:
                params[param] = check(self, f"{key}.{param}", data[param])
            elif param in _REQUIRED.get((via, kind), ()):
                raise self.fail(f"{key}.{param}", f"required for {via} = {kind!r}")
        every = None
        if "every" in data:
            every = self.seconds(f"{key}.every", data["every"])
        fault = FaultSpec(via, kind, name, phase, tuple(sorted(params.items())), every)
        # Build the real toxic or strategy now, so that what part 1 refuses fails here,
        # naming the key, and never in the middle of a run.
        try:
            if via == "proxy" and not fault.is_action:
                fault.toxic()
            elif via == "injector":
                fault.strategy()
        except (TypeError, ValueError) as exc:
            raise self.fail(key, str(exc)) from exc
        return fault

    def fault_fits_target(self, key: str, fault: FaultSpec, target: TargetSpec) -> None:
        dialect = target.dialect
        if fault.via == "proxy" and dialect != "postgresql":
            raise self.fail(
                f"{key}.proxy",
                f"the proxy fault {fault.kind!r} needs a PostgreSQL target (the embedded "
                "SQLite default has no network); accepted on SQLite: injector faults "
                "(" + ", ".join(sorted(_INJECTOR_KINDS)) + ")",
            )
        if fault.via == "injector":
            if fault.kind == "sqlstate_error" and dialect != "postgresql":
                raise self.fail(
                    f"{key}.injector",
                    "sqlstate_error needs PostgreSQL; accepted on SQLite: sqlite_busy, "
                    "disconnect, hang, latency, connect_failure",
                )
            if fault.kind == "sqlite_busy" and dialect != "sqlite":
                raise self.fail(
                    f"{key}.injector",
                    "sqlite_busy needs SQLite; accepted on PostgreSQL: sqlstate_error, "
                    "disconnect, hang, latency, connect_failure",
                )

    def steady_state(
        self, value: object, phases: tuple[Phase, ...], workload: Workload, duration: float
    ) -> SteadyState:
        data = self.table("steady_state", value, ("baseline", "p99_tolerance", "check"))
        names = tuple(p.name for p in phases)
        baseline: str | None = None
        if "baseline" in data:
            if not names:
                raise self.fail(
                    "steady_state.baseline", "there are no phases; accepted: the name of a phase"
                )
            baseline = self.choice("steady_state.baseline", data["baseline"], names)
        elif phases and not phases[0].faults:
            baseline = phases[0].name
        if baseline is not None:
            base_phase = next(p for p in phases if p.name == baseline)
            if base_phase.faults:
                raise self.fail(
                    "steady_state.baseline",
                    f"phase {baseline!r} has faults; accepted: a phase without faults "
                    "(the baseline is measured with none)",
                )
        tolerance = self.seconds(
            "steady_state.p99_tolerance", data.get("p99_tolerance", 0.025), allow_zero=True
        )
        raw_checks = data.get("check", [])
        if not isinstance(raw_checks, list):
            raise self.bad(
                "steady_state.check", raw_checks, "an array of tables ([[steady_state.check]])"
            )
        checks: list[SteadyStateCheck] = []
        criteria = (
            "min_success_rate",
            "max_p99_ratio",
            "max_p99",
            "min_throughput_ratio",
            "breaker_closed_within",
        )
        for index, raw in enumerate(raw_checks, 1):
            key = f"steady_state.check[{index}]"
            entry = self.table(key, raw, ("phase", *criteria))
            if "phase" not in entry:
                raise self.fail(
                    f"{key}.phase", "required; accepted: " + (", ".join(names) or "(no phases)")
                )
            if not names:
                raise self.fail(
                    f"{key}.phase", "there are no phases; accepted: the name of a phase"
                )
            phase = self.choice(f"{key}.phase", entry["phase"], names)
            if not any(c in entry for c in criteria):
                raise self.fail(key, "no expectation given; accepted: " + ", ".join(criteria))
            relative = [c for c in ("max_p99_ratio", "min_throughput_ratio") if c in entry]
            if relative and baseline is None:
                raise self.fail(
                    f"{key}.{relative[0]}",
                    "is relative to the baseline, and there is none; accepted: set "
                    "steady_state.baseline to a phase without faults",
                )
            check = SteadyStateCheck(
                phase=phase,
                min_success_rate=(
                    self.fraction(f"{key}.min_success_rate", entry["min_success_rate"])
                    if "min_success_rate" in entry
                    else None
                ),
                max_p99_ratio=(
                    self.number(
                        f"{key}.max_p99_ratio",
                        entry["max_p99_ratio"],
                        minimum=0.0,
                        exclusive_minimum=True,
                    )
                    if "max_p99_ratio" in entry
                    else None
                ),
                max_p99=(
                    self.seconds(f"{key}.max_p99", entry["max_p99"]) if "max_p99" in entry else None
                ),
                min_throughput_ratio=(
                    self.number(
                        f"{key}.min_throughput_ratio", entry["min_throughput_ratio"], minimum=0.0
                    )
                    if "min_throughput_ratio" in entry
                    else None
                ),
                breaker_closed_within=(
                    self.seconds(
                        f"{key}.breaker_closed_within",
                        entry["breaker_closed_within"],
                        allow_zero=True,
                    )
                    if "breaker_closed_within" in entry
                    else None
                ),
            )
            if check.breaker_closed_within is not None and workload.breaker is None:
                raise self.fail(
                    f"{key}.breaker_closed_within",
                    "the workload has no breaker (workload.breaker = false); accepted: a "
                    "breaker table, or no breaker_closed_within",
                )
            checks.append(check)
        steady = SteadyState(baseline, tolerance, tuple(checks))
        self.check_breaker_windows(steady, phases, duration, source=self.source)
        return steady

    def check_breaker_windows(
        self, steady: SteadyState, phases: tuple[Phase, ...], duration: float, *, source: str
    ) -> None:
        ends = {p.name: p.end for p in phases}
        for index, check in enumerate(steady.checks, 1):
            if check.breaker_closed_within is None:
                continue
            due = ends[check.phase] + check.breaker_closed_within
            if due > duration + 1e-9:
                raise ScenarioError(
                    source,
                    f"steady_state.check[{index}].breaker_closed_within",
                    f"phase {check.phase!r} ends at {ends[check.phase]:g} s, so the breaker "
                    f"would be checked at {due:g} s, after the run ends ({duration:g} s); "
                    f"accepted: a number of seconds <= {max(0.0, duration - ends[check.phase]):g}",
                )

    def invariants(self, value: object) -> InvariantsSpec:
        data = self.table("invariants", value, INVARIANTS)
        return InvariantsSpec(
            **{
                name: self.boolean(f"invariants.{name}", data.get(name, True))
                for name in INVARIANTS
            }
        )


# -- what each fault accepts ------------------------------------------------------------------


def _p_seconds(v: _Validator, key: str, value: object) -> float:
    return v.seconds(key, value, allow_zero=True)


def _p_positive_seconds(v: _Validator, key: str, value: object) -> float:
    return v.seconds(key, value)


def _p_fraction(v: _Validator, key: str, value: object) -> float:
    return v.fraction(key, value)


def _p_int0(v: _Validator, key: str, value: object) -> int:
    return v.integer(key, value, minimum=0)


def _p_int1(v: _Validator, key: str, value: object) -> int:
    return v.integer(key, value, minimum=1)


def _p_rate(v: _Validator, key: str, value: object) -> float:
    return v.number(key, value, minimum=1.0)


def _p_string(v: _Validator, key: str, value: object) -> str:
    return v.string(key, value)


def _p_regex(v: _Validator, key: str, value: object) -> str:
    return v.regex(key, value)


def _p_choice(*choices: str) -> Callable[[_Validator, str, object], str]:
    def check(v: _Validator, key: str, value: object) -> str:
        return v.choice(key, value, choices)

    return check


def _p_sqlstate(v: _Validator, key: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Z]{5}", value):
        raise v.bad(key, value, 'five digits or capital letters, e.g. "40001"')
    return value


_ParamCheck: TypeAlias = Callable[[_Validator, str, object], Any]

_TOXIC_COMMON: Final[dict[str, _ParamCheck]] = {
    "stream": _p_choice("upstream", "downstream"),
    "toxicity": _p_fraction,
}
_PG_COMMON: Final[dict[str, _ParamCheck]] = {"toxicity": _p_fraction}

_PROXY_ACTIONS: Final = frozenset({"disable", "refuse", "half_open", "kill", "connect_delay"})

_PROXY_KINDS: Final[dict[str, dict[str, _ParamCheck]]] = {
    "latency": {
        "latency": _p_seconds,
        "jitter": _p_seconds,
        "distribution": _p_choice("uniform", "normal"),
        **_TOXIC_COMMON,
    },
    "bandwidth": {"rate": _p_rate, **_TOXIC_COMMON},
    "slow_close": {"delay": _p_seconds, **_TOXIC_COMMON},
    "timeout": {"timeout": _p_seconds, **_TOXIC_COMMON},
    "reset_peer": {"timeout": _p_seconds, **_TOXIC_COMMON},
    "slicer": {
        "average_size": _p_int1,
        "size_variation": _p_int0,
        "delay": _p_seconds,
        **_TOXIC_COMMON,
    },
    "limit_data": {"bytes": _p_int0, **_TOXIC_COMMON},
    "fail_first_n": {
        "n": _p_int1,
        "sqlstate": _p_sqlstate,
        "message": _p_string,
        "match": _p_regex,
        **_PG_COMMON,
    },
    "drop_commit_ack": {"count": _p_int1, **_PG_COMMON},
    "disable": {},
    "refuse": {},
    "half_open": {},
    "kill": {"which": _p_choice("all", "in_transaction", "idle"), "mode": _p_choice("rst", "fin")},
    "connect_delay": {"delay": _p_seconds},
}

_ON_ANY: Final = _p_choice("statement", "commit", "connect")
_ON_NO_CONNECT: Final = _p_choice("statement", "commit")

_INJECTOR_KINDS: Final[dict[str, dict[str, _ParamCheck]]] = {
    "disconnect": {
        "rate": _p_fraction,
        "on": _ON_NO_CONNECT,
        "phase": _p_choice("before", "after"),
        "when": _p_regex,
    },
    "hang": {"rate": _p_fraction, "duration": _p_positive_seconds, "on": _ON_ANY, "when": _p_regex},
    "sqlstate_error": {
        "sqlstate": _p_sqlstate,
        "rate": _p_fraction,
        "on": _ON_ANY,
        "when": _p_regex,
    },
    "sqlite_busy": {"rate": _p_fraction, "on": _ON_NO_CONNECT, "when": _p_regex},
    "latency": {"delay": _p_positive_seconds, "rate": _p_fraction, "on": _ON_ANY, "when": _p_regex},
    "connect_failure": {"rate": _p_fraction},
}

_REQUIRED: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("proxy", "latency"): ("latency",),
    ("proxy", "bandwidth"): ("rate",),
    ("proxy", "slow_close"): ("delay",),
    ("proxy", "timeout"): ("timeout",),
    ("proxy", "slicer"): ("average_size",),
    ("proxy", "limit_data"): ("bytes",),
    ("proxy", "fail_first_n"): ("n",),
    ("proxy", "connect_delay"): ("delay",),
    ("injector", "disconnect"): ("rate",),
    ("injector", "hang"): ("rate",),
    ("injector", "sqlstate_error"): ("sqlstate", "rate"),
    ("injector", "sqlite_busy"): ("rate",),
    ("injector", "latency"): ("delay", "rate"),
    ("injector", "connect_failure"): ("rate",),
}

_STRATEGY_BUILDERS: Final[dict[str, Callable[..., Strategy]]] = {
    "disconnect": disconnect,
    "hang": hang,
    "sqlstate_error": sqlstate_error,
    "sqlite_busy": sqlite_busy,
    "latency": latency,
    "connect_failure": connect_failure,
}


def parse_fault(text: str, *, source: str = "--fault", phase: str = "cli") -> FaultSpec:
    """One fault from the inside of a TOML inline table: ``'proxy = "latency", latency = 0.1'``."""
    try:
        data = tomllib.loads(f"fault = {{ {text} }}")
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(
            source,
            "",
            f'not a TOML inline table ({exc}); example: proxy = "latency", latency = 0.1',
        ) from exc
    return _Validator(source).fault("fault", data["fault"], phase=phase)
