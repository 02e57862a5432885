"""What a chaos run proves: invariants on the data, steady-state checks, the verdict.

Everything here is a pure function of what the runner recorded — the history of
operations, the final state read once the faults had healed, the breaker's
transitions and the faults' activity — so it can be tested without a database.

The invariants, Jepsen-style (checked after the final read):

=============================  ================================================================
``acknowledged_writes_present``  every write the client saw succeed is in the database
``no_duplicate_keys``            no write's key is in the database twice (a blind retry
                                 of a COMMIT that did land writes it twice)
``counters_within_bounds``       each counter is between its acknowledged and its attempted
                                 increments (acknowledged + unknown outcome; a failed one
                                 is known not to have happened), and equals the
                                 increments logged with it in the same transactions
``failed_writes_absent``         no write the client was told failed took effect
``unknown_outcomes``             never a violation: every write whose outcome was unknown
                                 (``CommitOutcomeUnknown``, cancelled) is listed as
                                 recovered (present) or absent
``pool_checked_in``              no connection checked out of the pool after the workload
``no_leaked_sessions``           no server session of the run left (``pg_stat_activity``)
``no_stray_tasks``               no asyncio task of the run left
``faults_fired``                 every planned fault fired; if one did not, the run is
                                 inconclusive, not a pass
=============================  ================================================================
"""

from __future__ import annotations

import enum
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from resilient_db.chaos.scenario import WRITE_KINDS, Scenario, SteadyStateCheck

__all__ = [
    "BreakerEvent",
    "CheckResult",
    "ExitCode",
    "FaultActivity",
    "FinalState",
    "OperationRecord",
    "PhaseStats",
    "WrittenKey",
    "breaker_state_at",
    "check_faults_fired",
    "check_steady_state",
    "check_writes",
    "percentile",
    "phase_stats",
    "verdict",
]

Outcome: TypeAlias = Literal["ok", "failed", "unknown"]
Status: TypeAlias = Literal["pass", "fail", "inconclusive", "skipped", "info"]

_LISTED: Final = 20
"""How many offending keys a check's details list (the JSON report has them all)."""


class ExitCode(enum.IntEnum):
    """What ``resilient-db chaos run`` exits with (most serious first wins)."""

    PASS = 0
    """Every invariant held, every fault fired, every steady-state check passed."""
    SAFETY = 1
    """A safety invariant was violated: a write lost or duplicated, a leak."""
    STEADY_STATE = 2
    """The data is safe, but a steady-state (SLO) check missed."""
    INCONCLUSIVE = 3
    """A planned fault never fired: the run proves nothing about it."""
    HARNESS_ERROR = 4
    """The run could not be carried out (bad scenario, no database at the start...)."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C (SIGINT) or SIGTERM; partial reports are written."""


@dataclass(frozen=True, slots=True)
class OperationRecord:
    """One operation of the workload, as the client saw it.

    Attributes:
        index: the operation's number in the run (its slot in the offered schedule).
        kind: ``insert``, ``increment``, ``rmw`` or ``read``.
        key: the key its write carries (``"insert-17"``); ``None`` for reads.
        target: the counter or register it touches, if any.
        worker: the worker that ran it.
        invoke: seconds from the start of the run when it was invoked.
        complete: seconds from the start of the run when it returned or raised.
        outcome: ``ok``, ``failed`` (known not to have taken effect) or ``unknown``.
        attempts: how many times the unit of work ran (0 when the breaker rejected it).
        error: the class name of the error the caller got, if any.
        message: the start of that error's message.
    """

    index: int
    kind: str
    key: str | None
    target: int | None
    worker: int
    invoke: float
    complete: float
    outcome: Outcome
    attempts: int
    error: str | None = None
    message: str | None = None

    @property
    def latency(self) -> float:
        """Seconds between invocation and completion."""
        return self.complete - self.invoke

    @property
    def is_write(self) -> bool:
        """The operation writes (its key)."""
        return self.kind in WRITE_KINDS

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-lines object."""
        return {
            "index": self.index,
            "kind": self.kind,
            "key": self.key,
            "target": self.target,
            "worker": self.worker,
            "invoke": round(self.invoke, 6),
            "complete": round(self.complete, 6),
            "outcome": self.outcome,
            "attempts": self.attempts,
            "error": self.error,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class WrittenKey:
    """What the final read found for one key: its kind, target and row count."""

    kind: str
    target: int | None
    rows: int


@dataclass(frozen=True, slots=True)
class FinalState:
    """The database read once the faults had healed.

    Attributes:
        writes: key → what was found (a key never written is absent).
        counters: counter id → value.
        registers: register id → value (read-modify-writes under SERIALIZABLE).
    """

    writes: Mapping[str, WrittenKey]
    counters: Mapping[int, int]
    registers: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A breaker transition, at seconds from the start of the run."""

    at: float
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class FaultActivity:
    """What one planned fault did.

    Attributes:
        name: the fault's name (``"<phase>/<kind>"`` unless given).
        phase: the phase that planned it.
        via: ``proxy`` or ``injector``.
        kind: the toxic, action or strategy.
        applied_at: seconds from the start of the run (``None``: never applied).
        removed_at: seconds from the start of the run (``None``: not removed by its phase).
        fired: how many times it acted (delays, resets, dropped acks, killed
            connections, injections...).
    """

    name: str
    phase: str
    via: str
    kind: str
    applied_at: float | None
    removed_at: float | None
    fired: int


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The result of one invariant or steady-state check.

    ``status`` is ``pass``, ``fail``, ``inconclusive`` (faults that never fired),
    ``skipped`` (not applicable, e.g. ``pg_stat_activity`` on SQLite, or turned
    off) or ``info`` (``unknown_outcomes``: never a violation).
    """

    name: str
    group: Literal["invariant", "steady_state"]
    status: Status
    summary: str
    details: tuple[str, ...] = ()
    data: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        result: dict[str, Any] = {
            "name": self.name,
            "group": self.group,
            "status": self.status,
            "summary": self.summary,
            "details": list(self.details),
        }
        if self.data is not None:
            result["data"] = dict(self.data)
        return result


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """Operations that started and ended within one phase (or the whole run).

    Latency percentiles are those of acknowledged operations, in seconds;
    ``throughput`` is acknowledged operations per second.
    """

    name: str
    start: float
    end: float
    faults: tuple[str, ...]
    ops: int
    ok: int
    failed: int
    unknown: int
    retries: int
    rejections: int
    p50: float | None
    p95: float | None
    p99: float | None

    @property
    def success_rate(self) -> float | None:
        """Acknowledged / invoked (``None`` when nothing was invoked)."""
        return self.ok / self.ops if self.ops else None

    @property
    def throughput(self) -> float:
        """Acknowledged operations per second of the phase."""
        width = self.end - self.start
        return self.ok / width if width > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The stats as a JSON object."""
        return {
            "name": self.name,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "faults": list(self.faults),
            "ops": self.ops,
            "ok": self.ok,
            "failed": self.failed,
            "unknown": self.unknown,
            "success_rate": self.success_rate,
            "throughput": round(self.throughput, 3),
            "retries": self.retries,
            "breaker_rejections": self.rejections,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-quantile (``q`` in (0, 1]) of ``values``; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def phase_stats(
    records: Iterable[OperationRecord],
    name: str,
    start: float,
    end: float,
    faults: tuple[str, ...] = (),
    *,
    complete_by: float | None = None,
) -> PhaseStats:
    """Stats of the operations that started and ended within the phase.

    An operation counts when it was invoked in ``[start, end)`` and completed by
    ``complete_by`` (default: ``end``). One that spans a boundary — invoked in the
    baseline, cut by the outage that starts next — says nothing reliable about
    either phase: it counts in the whole run only. The runner passes
    ``complete_by=inf`` for the last phase, which nothing follows.
    """
    limit = end if complete_by is None else complete_by
    chosen = [r for r in records if start <= r.invoke < end and r.complete <= limit]
    latencies = [r.latency for r in chosen if r.outcome == "ok"]
    return PhaseStats(
        name=name,
        start=start,
        end=end,
        faults=faults,
        ops=len(chosen),
        ok=sum(1 for r in chosen if r.outcome == "ok"),
        failed=sum(1 for r in chosen if r.outcome == "failed"),
        unknown=sum(1 for r in chosen if r.outcome == "unknown"),
        retries=sum(max(0, r.attempts - 1) for r in chosen),
        rejections=sum(1 for r in chosen if r.error == "CircuitOpenError"),
        p50=percentile(latencies, 0.50),
        p95=percentile(latencies, 0.95),
        p99=percentile(latencies, 0.99),
    )


def _listing(items: Sequence[str]) -> tuple[str, ...]:
    shown = tuple(items[:_LISTED])
    if len(items) > _LISTED:
        shown += (f"... and {len(items) - _LISTED} more (see report.json)",)
    return shown


def _index_order(key: str) -> tuple[int, str]:
    number = key.rsplit("-", 1)[-1]
    return (int(number), key) if number.isdigit() else (-1, key)


def _keys(records: Iterable[OperationRecord]) -> list[str]:
    """The keys of ``records``, in operation order."""
    return sorted((r.key for r in records if r.key is not None), key=_index_order)


def check_writes(records: Sequence[OperationRecord], final: FinalState) -> list[CheckResult]:
    """The invariants on the data, from the history and the final read.

    Returns, in order: ``acknowledged_writes_present``, ``no_duplicate_keys``,
    ``counters_within_bounds``, ``failed_writes_absent``, ``unknown_outcomes``.
    """
    writes = [r for r in records if r.is_write and r.key is not None]
    found = final.writes

    acked = [r for r in writes if r.outcome == "ok"]
    missing = _keys(r for r in acked if r.key not in found)
    if missing:
        lost = CheckResult(
            "acknowledged_writes_present",
            "invariant",
            "fail",
            f"{len(missing)} of {len(acked)} acknowledged writes are missing: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else ""),
            _listing([f"{key}: acknowledged, not in the database" for key in missing]),
            {"missing": missing},
        )
    else:
        lost = CheckResult(
            "acknowledged_writes_present",
            "invariant",
            "pass",
            f"all {len(acked)} acknowledged writes are present",
        )

    duplicated = sorted((k for k, w in found.items() if w.rows > 1), key=_index_order)
    if duplicated:
        dup = CheckResult(
            "no_duplicate_keys",
            "invariant",
            "fail",
            f"{len(duplicated)} keys written more than once: "
            + ", ".join(f"{k} (x{found[k].rows})" for k in duplicated[:5])
            + (" ..." if len(duplicated) > 5 else ""),
            _listing([f"{k}: {found[k].rows} rows" for k in duplicated]),
            {"duplicated": {k: found[k].rows for k in duplicated}},
        )
    else:
        dup = CheckResult(
            "no_duplicate_keys",
            "invariant",
            "pass",
            f"{len(found)} keys in the database, each written once",
        )

    counters = _check_counters(writes, final)

    failed_present = _keys(r for r in writes if r.outcome == "failed" and r.key in found)
    failed_total = sum(1 for r in writes if r.outcome == "failed")
    by_key = {r.key: r for r in writes}
    if failed_present:
        phantom = CheckResult(
            "failed_writes_absent",
            "invariant",
            "fail",
            f"{len(failed_present)} writes reported as failed took effect: "
            + ", ".join(failed_present[:5])
            + (" ..." if len(failed_present) > 5 else ""),
            _listing(
                [
                    f"{k}: the caller got {by_key[k].error} after {by_key[k].attempts} "
                    "attempt(s), yet it is in the database"
                    for k in failed_present
                ]
            ),
            {"present": failed_present},
        )
    else:
        phantom = CheckResult(
            "failed_writes_absent",
            "invariant",
            "pass",
            f"none of the {failed_total} failed writes took effect",
        )

    unknown = [r for r in writes if r.outcome == "unknown"]
    recovered = _keys(r for r in unknown if r.key in found)
    absent = _keys(r for r in unknown if r.key not in found)
    unknown_result = CheckResult(
        "unknown_outcomes",
        "invariant",
        "info",
        f"{len(unknown)} writes with unknown outcome: {len(recovered)} recovered "
        f"(present), {len(absent)} absent",
        _listing(
            [f"{k}: {by_key[k].error}, recovered (present)" for k in recovered]
            + [f"{k}: {by_key[k].error}, absent" for k in absent]
        ),
        {"recovered": recovered, "absent": absent},
    )
    return [lost, dup, counters, phantom, unknown_result]


def _check_counters(writes: Sequence[OperationRecord], final: FinalState) -> CheckResult:
    problems: list[str] = []
    lines: list[str] = []
    checked = 0
    for kind, values, label in (
        ("increment", final.counters, "counter"),
        ("rmw", final.registers, "register"),
    ):
        ops = [r for r in writes if r.kind == kind]
        acked: Counter[int] = Counter(
            r.target for r in ops if r.outcome == "ok" and r.target is not None
        )
        unknown: Counter[int] = Counter(
            r.target for r in ops if r.outcome == "unknown" and r.target is not None
        )
        logged: defaultdict[int, int] = defaultdict(int)
        for written in final.writes.values():
            if written.kind == kind and written.target is not None:
                logged[written.target] += written.rows
        for target in sorted(set(values) | set(acked) | set(unknown)):
            value = values.get(target, 0)
            low, high = acked[target], acked[target] + unknown[target]
            checked += 1
            lines.append(
                f"{label} {target}: {value} (acknowledged {low}, attempted {high}, "
                f"logged {logged[target]})"
            )
            if not low <= value <= high:
                problems.append(
                    f"{label} {target} = {value}, outside [{low}, {high}] "
                    f"(acknowledged {low}, unknown outcome {unknown[target]})"
                )
            if value != logged[target]:
                what = "lost update" if kind == "rmw" and value < logged[target] else "not atomic"
                problems.append(
                    f"{label} {target} = {value}, but {logged[target]} writes were logged "
                    f"with it in the same transactions ({what})"
                )
    if problems:
        return CheckResult(
            "counters_within_bounds",
            "invariant",
            "fail",
            problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            _listing(problems),
        )
    return CheckResult(
        "counters_within_bounds",
        "invariant",
        "pass",
        f"{checked} counters and registers between acknowledged and attempted",
        tuple(lines),
    )


def breaker_state_at(events: Sequence[BreakerEvent], at: float) -> str:
    """The breaker's state at ``at`` seconds, from its transitions (closed at the start)."""
    state = "closed"
    for event in events:
        if event.at > at:
            break
        state = event.new
    return state


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def check_steady_state(
    scenario: Scenario,
    stats: Mapping[str, PhaseStats],
    breaker_events: Sequence[BreakerEvent],
    *,
    elapsed: float,
    watchdog_fired: bool = False,
) -> list[CheckResult]:
    """Evaluate the scenario's steady-state checks (one result per criterion).

    Args:
        stats: phase name → stats of the operations that started and ended in it.
        breaker_events: transitions, in time order.
        elapsed: seconds the workload ran.
        watchdog_fired: the watchdog ended the run (a check of its own, failed).
    """
    results: list[CheckResult] = []
    steady = scenario.steady_state
    baseline = stats.get(steady.baseline) if steady.baseline is not None else None
    for check in steady.checks:
        results.extend(
            _evaluate(
                check,
                stats[check.phase],
                baseline,
                steady.p99_tolerance,
                scenario,
                breaker_events,
                elapsed,
            )
        )
    if watchdog_fired:
        results.append(
            CheckResult(
                "run ended within 2 x its planned duration",
                "steady_state",
                "fail",
                f"the watchdog ended the run at {2 * scenario.duration:g} s: operations were "
                "still in flight past their planned end",
            )
        )
    return results


def _evaluate(
    check: SteadyStateCheck,
    phase: PhaseStats,
    baseline: PhaseStats | None,
    tolerance: float,
    scenario: Scenario,
    events: Sequence[BreakerEvent],
    elapsed: float,
) -> list[CheckResult]:
    out: list[CheckResult] = []
    name = phase.name

    def result(label: str, ok: bool, summary: str) -> None:
        out.append(
            CheckResult(f"{name}: {label}", "steady_state", "pass" if ok else "fail", summary)
        )

    if check.min_success_rate is not None:
        label = f"success_rate >= {check.min_success_rate:g}"
        rate = phase.success_rate
        if rate is None:
            result(label, False, "no operation started and ended in the phase")
        else:
            result(
                label,
                rate >= check.min_success_rate,
                f"{rate:.4f} ({phase.ok} of {phase.ops} acknowledged)",
            )
    if check.max_p99_ratio is not None:
        assert baseline is not None  # validated: relative checks need a baseline
        label = f"p99 <= {check.max_p99_ratio:g} x baseline p99"
        if baseline.p99 is None:
            result(label, False, f"the baseline ({baseline.name}) acknowledged no operation")
        elif phase.p99 is None:
            result(label, False, "no operation was acknowledged in the phase")
        else:
            limit = check.max_p99_ratio * baseline.p99 + tolerance
            result(
                label,
                phase.p99 <= limit,
                f"p99 {_fmt_ms(phase.p99)}, limit {_fmt_ms(limit)} "
                f"({check.max_p99_ratio:g} x {_fmt_ms(baseline.p99)} + {_fmt_ms(tolerance)})",
            )
    if check.max_p99 is not None:
        label = f"p99 <= {check.max_p99 * 1000:g} ms"
        if phase.p99 is None:
            result(label, False, "no operation was acknowledged in the phase")
        else:
            result(label, phase.p99 <= check.max_p99, f"p99 {_fmt_ms(phase.p99)}")
    if check.min_throughput_ratio is not None:
        assert baseline is not None
        label = f"throughput >= {check.min_throughput_ratio:g} x baseline"
        limit = check.min_throughput_ratio * baseline.throughput
        result(
            label,
            phase.throughput >= limit,
            f"{phase.throughput:.1f} ops/s, limit {limit:.1f} ops/s "
            f"({check.min_throughput_ratio:g} x {baseline.throughput:.1f})",
        )
    if check.breaker_closed_within is not None:
        label = f"breaker closed within {check.breaker_closed_within:g} s after the phase"
        end = scenario.phase(check.phase).end
        due = end + check.breaker_closed_within
        if elapsed + 1e-6 < due:
            result(label, False, f"the run ended at {elapsed:.1f} s, before {due:.1f} s")
        else:
            state = breaker_state_at(events, due)
            opened = [e for e in events if e.new == "open" and e.at <= due]
            closed_at = next(
                (e.at for e in reversed(events) if e.at <= due and e.new == "closed"), None
            )
            if state == "closed":
                if not opened:
                    summary = "the breaker never opened"
                elif closed_at is not None and closed_at > end:
                    summary = f"closed {closed_at - end:.2f} s after the phase ended"
                else:
                    summary = "closed when the phase ended"
                result(label, True, summary)
            else:
                result(label, False, f"the breaker was {state} at {due:.1f} s")
    return out


def check_faults_fired(activities: Sequence[FaultActivity]) -> CheckResult:
    """``faults_fired``: inconclusive when a planned fault never applied or never acted."""
    if not activities:
        return CheckResult("faults_fired", "invariant", "pass", "no fault was planned")
    silent = [a for a in activities if a.fired == 0]
    lines = tuple(
        f"{a.name} ({a.via} {a.kind}): "
        + ("never applied" if a.applied_at is None else f"fired {a.fired} times")
        for a in activities
    )
    if silent:
        names = ", ".join(a.name for a in silent)
        return CheckResult(
            "faults_fired",
            "invariant",
            "inconclusive",
            f"{len(silent)} of {len(activities)} planned faults never fired ({names}): "
            "the run proves nothing about them",
            lines,
        )
    return CheckResult(
        "faults_fired", "invariant", "pass", f"all {len(activities)} planned faults fired", lines
    )


def verdict(
    checks: Iterable[CheckResult], *, harness_error: bool = False, interrupted: bool = False
) -> ExitCode:
    """The exit code: interrupted, harness error, safety, inconclusive, steady state, pass."""
    if interrupted:
        return ExitCode.INTERRUPTED
    if harness_error:
        return ExitCode.HARNESS_ERROR
    results = list(checks)
    if any(c.group == "invariant" and c.status == "fail" for c in results):
        return ExitCode.SAFETY
    if any(c.status == "inconclusive" for c in results):
        return ExitCode.INCONCLUSIVE
    if any(c.group == "steady_state" and c.status == "fail" for c in results):
        return ExitCode.STEADY_STATE
    return ExitCode.PASS
