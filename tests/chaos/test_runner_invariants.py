"""The invariants and the verdict as pure functions of a history and a final state.

Each check is fed a small hand-made history that breaks it (and one that does not),
so that a check that could never fail would be caught here.
"""

from __future__ import annotations

import math

import pytest

from resilient_db.chaos import CheckResult, ExitCode, OperationRecord, load_scenario
from resilient_db.chaos.invariants import (
    BreakerEvent,
    FaultActivity,
    FinalState,
    WrittenKey,
    breaker_state_at,
    check_faults_fired,
    check_steady_state,
    check_writes,
    percentile,
    phase_stats,
    verdict,
)
from resilient_db.chaos.scenario import parse_scenario


def op(
    index: int,
    kind: str,
    outcome: str,
    *,
    target: int | None = None,
    invoke: float = 0.0,
    latency: float = 0.01,
    attempts: int = 1,
    error: str | None = None,
) -> OperationRecord:
    return OperationRecord(
        index=index,
        kind=kind,
        key=None if kind == "read" else f"{kind}-{index}",
        target=target,
        worker=0,
        invoke=invoke,
        complete=invoke + latency,
        outcome=outcome,  # type: ignore[arg-type]
        attempts=attempts,
        error=error,
    )


def state(
    writes: dict[str, tuple[str, int | None, int]],
    counters: dict[int, int] | None = None,
    registers: dict[int, int] | None = None,
) -> FinalState:
    return FinalState(
        writes={k: WrittenKey(kind, target, rows) for k, (kind, target, rows) in writes.items()},
        counters=counters or {},
        registers=registers or {},
    )


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_a_clean_history_passes_every_data_invariant() -> None:
    history = [
        op(1, "insert", "ok"),
        op(2, "increment", "ok", target=0),
        op(3, "rmw", "ok", target=1),
        op(4, "insert", "failed", error="DBAPIError"),
        op(5, "read", "ok", target=0),
    ]
    final = state(
        {
            "insert-1": ("insert", None, 1),
            "increment-2": ("increment", 0, 1),
            "rmw-3": ("rmw", 1, 1),
        },
        counters={0: 1},
        registers={1: 1},
    )
    results = by_name(check_writes(history, final))
    assert {n: r.status for n, r in results.items()} == {
        "acknowledged_writes_present": "pass",
        "no_duplicate_keys": "pass",
        "counters_within_bounds": "pass",
        "failed_writes_absent": "pass",
        "unknown_outcomes": "info",
    }


def test_an_acknowledged_write_missing_is_a_violation_naming_it() -> None:
    results = by_name(check_writes([op(7, "insert", "ok"), op(8, "insert", "ok")], state({})))
    lost = results["acknowledged_writes_present"]
    assert lost.status == "fail"
    assert lost.summary == "2 of 2 acknowledged writes are missing: insert-7, insert-8"


def test_a_key_written_twice_is_a_violation_naming_it() -> None:
    final = state({"insert-3": ("insert", None, 2), "insert-4": ("insert", None, 1)})
    results = by_name(check_writes([op(3, "insert", "ok"), op(4, "insert", "ok")], final))
    dup = results["no_duplicate_keys"]
    assert dup.status == "fail"
    assert dup.summary == "1 keys written more than once: insert-3 (x2)"
    assert dup.data == {"duplicated": {"insert-3": 2}}


@pytest.mark.parametrize(
    ("history", "value", "logged", "expected"),
    [
        # One acknowledged increment, none applied: below the lower bound.
        ([op(1, "increment", "ok", target=0)], 0, 0, "counter 0 = 0, outside [1, 1]"),
        # One acknowledged, one unknown: 3 is above acknowledged + unknown.
        (
            [op(1, "increment", "ok", target=0), op(2, "increment", "unknown", target=0)],
            3,
            3,
            "counter 0 = 3, outside [1, 2]",
        ),
        # Within bounds, but not what was logged in the same transactions.
        ([op(1, "increment", "ok", target=0)], 1, 2, "counter 0 = 1, but 2 writes were logged"),
    ],
)
def test_a_counter_outside_its_bounds_is_a_violation(
    history: list[OperationRecord], value: int, logged: int, expected: str
) -> None:
    writes = {f"increment-{i}": ("increment", 0, 1) for i in range(1, logged + 1)}
    results = by_name(check_writes(history, state(writes, counters={0: value})))
    check = results["counters_within_bounds"]
    assert check.status == "fail"
    assert check.summary.startswith(expected)


def test_a_lost_update_under_serializable_is_named_as_such() -> None:
    history = [op(1, "rmw", "ok", target=2), op(2, "rmw", "ok", target=2)]
    writes = {"rmw-1": ("rmw", 2, 1), "rmw-2": ("rmw", 2, 1)}
    results = by_name(check_writes(history, state(writes, registers={2: 1})))
    assert "(lost update)" in "\n".join(results["counters_within_bounds"].details)


def test_a_failed_write_that_took_effect_is_a_violation() -> None:
    history = [op(9, "insert", "failed", attempts=4, error="ProgrammingError")]
    results = by_name(check_writes(history, state({"insert-9": ("insert", None, 1)})))
    phantom = results["failed_writes_absent"]
    assert phantom.status == "fail"
    assert phantom.details == (
        "insert-9: the caller got ProgrammingError after 4 attempt(s), yet it is in the database",
    )


def test_unknown_outcomes_are_listed_never_counted_as_violations() -> None:
    history = [
        op(1, "insert", "unknown", error="CommitOutcomeUnknown"),
        op(2, "insert", "unknown", error="CancelledError"),
        op(3, "increment", "unknown", target=0, error="CommitOutcomeUnknown"),
    ]
    final = state(
        {"insert-1": ("insert", None, 1), "increment-3": ("increment", 0, 1)}, counters={0: 1}
    )
    results = check_writes(history, final)
    assert [r.status for r in results if r.status != "pass"] == ["info"]
    unknown = by_name(results)["unknown_outcomes"]
    assert unknown.summary == "3 writes with unknown outcome: 2 recovered (present), 1 absent"
    assert unknown.data == {"recovered": ["insert-1", "increment-3"], "absent": ["insert-2"]}


def test_faults_that_never_fired_make_the_run_inconclusive() -> None:
    fired = FaultActivity("a/latency", "a", "proxy", "latency", 1.0, 2.0, 12)
    silent = FaultActivity("a/kill", "a", "proxy", "kill", 1.0, 2.0, 0)
    never = FaultActivity("b/disable", "b", "proxy", "disable", None, None, 0)
    assert check_faults_fired([fired]).status == "pass"
    result = check_faults_fired([fired, silent, never])
    assert result.status == "inconclusive"
    assert result.summary.startswith("2 of 3 planned faults never fired (a/kill, b/disable)")
    assert "b/disable (proxy disable): never applied" in result.details


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([("invariant", "pass"), ("steady_state", "pass")], ExitCode.PASS),
        ([("invariant", "info"), ("invariant", "skipped")], ExitCode.PASS),
        ([("invariant", "pass"), ("steady_state", "fail")], ExitCode.STEADY_STATE),
        ([("invariant", "inconclusive"), ("steady_state", "fail")], ExitCode.INCONCLUSIVE),
        ([("invariant", "fail"), ("invariant", "inconclusive")], ExitCode.SAFETY),
    ],
)
def test_the_verdict_takes_the_most_serious_outcome(
    statuses: list[tuple[str, str]], expected: ExitCode
) -> None:
    checks = [CheckResult(f"c{i}", g, s, "") for i, (g, s) in enumerate(statuses)]  # type: ignore[arg-type]
    assert verdict(checks) is expected


def test_harness_errors_and_interruptions_override_the_checks() -> None:
    failing = [CheckResult("x", "invariant", "fail", "")]
    assert verdict(failing, harness_error=True) is ExitCode.HARNESS_ERROR
    assert verdict(failing, harness_error=True, interrupted=True) is ExitCode.INTERRUPTED
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130]


def test_percentiles_and_phase_stats() -> None:
    assert percentile([], 0.99) is None
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    history = [
        op(1, "insert", "ok", invoke=0.5, latency=0.01),
        op(2, "insert", "ok", invoke=1.5, latency=0.03, attempts=3),
        op(3, "read", "failed", invoke=1.6, attempts=0, error="CircuitOpenError"),
        op(4, "insert", "unknown", invoke=1.7, error="CommitOutcomeUnknown"),
        op(5, "insert", "ok", invoke=2.5),
    ]
    stats = phase_stats(history, "p", 1.0, 2.0)
    assert (stats.ops, stats.ok, stats.failed, stats.unknown) == (3, 1, 1, 1)
    # An operation cut by the next phase counts in neither, unless nothing follows.
    spanning = [*history, op(6, "insert", "unknown", invoke=1.9, latency=0.2)]
    assert phase_stats(spanning, "p", 1.0, 2.0).ops == 3
    assert phase_stats(spanning, "p", 1.0, 2.0, complete_by=math.inf).ops == 4
    assert (stats.retries, stats.rejections) == (2, 1)
    assert stats.p99 == pytest.approx(0.03)
    assert stats.success_rate == pytest.approx(1 / 3)
    assert stats.throughput == pytest.approx(1.0)


STEADY = """
[scenario]
duration = 10
[[phase]]
name = "baseline"
start = 0
end = 3
[[phase]]
name = "outage"
start = 3
end = 5
faults = [{ injector = "hang", rate = 1 }]
[[phase]]
name = "recovery"
start = 5
end = 10
[steady_state]
p99_tolerance = 0.005
[[steady_state.check]]
phase = "recovery"
min_success_rate = 0.9
max_p99_ratio = 2
[[steady_state.check]]
phase = "outage"
breaker_closed_within = 2
"""


def steady(recovery: list[OperationRecord], events: list[BreakerEvent]) -> dict[str, str]:
    scenario = parse_scenario(STEADY)
    baseline = [op(i, "insert", "ok", invoke=i * 0.1, latency=0.01) for i in range(20)]
    records = baseline + recovery
    stats = {p.name: phase_stats(records, p.name, p.start, p.end) for p in scenario.phases}
    results = check_steady_state(scenario, stats, events, elapsed=10.0)
    return {r.name: r.status for r in results}


def test_steady_state_checks_pass_and_fail_on_what_they_measure() -> None:
    good = [op(100 + i, "insert", "ok", invoke=5 + i * 0.1, latency=0.02) for i in range(20)]
    closes = [BreakerEvent(3.5, "closed", "open", "x"), BreakerEvent(5.8, "open", "closed", "y")]
    assert steady(good, closes) == {
        "recovery: success_rate >= 0.9": "pass",
        "recovery: p99 <= 2 x baseline p99": "pass",
        "outage: breaker closed within 2 s after the phase": "pass",
    }
    slow = [op(100 + i, "insert", "ok", invoke=5 + i * 0.1, latency=0.05) for i in range(20)]
    failing = [op(200 + i, "insert", "failed", invoke=5 + i * 0.1) for i in range(5)]
    stays_open = [BreakerEvent(3.5, "closed", "open", "x")]
    assert steady(slow + failing, stays_open) == {
        "recovery: success_rate >= 0.9": "fail",
        "recovery: p99 <= 2 x baseline p99": "fail",
        "outage: breaker closed within 2 s after the phase": "fail",
    }


def test_the_breaker_state_is_read_from_its_transitions() -> None:
    events = [BreakerEvent(1.0, "closed", "open", ""), BreakerEvent(2.0, "open", "half_open", "")]
    assert [breaker_state_at(events, t) for t in (0.5, 1.0, 1.5, 2.5)] == [
        "closed",
        "open",
        "open",
        "half_open",
    ]


def test_the_built_in_scenarios_checks_are_all_reachable() -> None:
    # Every check of the default scenario names a phase that exists, with a baseline.
    scenario = load_scenario("quick")
    assert scenario.steady_state.baseline == "baseline"
    assert {c.phase for c in scenario.steady_state.checks} <= {p.name for p in scenario.phases}
