"""Scenario runs end to end, on real databases: the verdicts a run can reach.

The broken policy (blind retry of non-idempotent writes under lost COMMIT
acknowledgements) must fail with exit 1 and name the keys written twice; the
correct policy must pass the same scenario — on SQLite with the in-process
injector, and on PostgreSQL through the chaos proxy. A fault that never fires makes
a run inconclusive (3); a hung workload is ended by the watchdog (2); a database
that cannot be reached is a harness error (4). The same seed replays the same
fault decisions.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from resilient_db.chaos import ExitCode, RunResult, load_scenario, run_scenario

BLIND_RETRY = """
[scenario]
name = "{name}"
seed = {seed}
duration = 4

[target]
{target}

[workload]
concurrency = 2
rate = 40
api = "{api}"

[workload.policy]
timeout = 1.0
deadline = 4.0
retries = 3
backoff = {{ initial = 0.01, max = 0.05 }}

[workload.breaker]
failure_threshold = 50

[workload.mix]
insert = {{ weight = 1, idempotent = {idempotent} }}

[[phase]]
name = "baseline"
start = 0
end = 1

[[phase]]
name = "lost-acks"
start = 1
end = 4
faults = [{fault}]

[[steady_state.check]]
phase = "baseline"
min_success_rate = 0.9
"""

SQLITE_LOST_ACK = '{ injector = "disconnect", on = "commit", phase = "after", rate = 0.2 }'
PROXY_LOST_ACK = '{ proxy = "drop_commit_ack", count = 6 }'


def scenario_file(tmp_path: Path, body: str, name: str = "scenario") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


def blind_retry(
    tmp_path: Path,
    *,
    idempotent: bool,
    api: str = "engine",
    target: str = "",
    fault: str = SQLITE_LOST_ACK,
    seed: int = 11,
) -> Path:
    name = "broken" if idempotent else "correct"
    body = BLIND_RETRY.format(
        name=name,
        seed=seed,
        target=target,
        api=api,
        idempotent=str(idempotent).lower(),
        fault=fault,
    )
    return scenario_file(tmp_path, body, name)


def duplicated_keys_in(result: RunResult) -> dict[str, int]:
    check = result.check("no_duplicate_keys")
    assert check.data is not None
    return dict(check.data["duplicated"])


@pytest.mark.parametrize("api", ["engine", "decorator"])
async def test_blind_retry_of_non_idempotent_inserts_fails_naming_the_duplicated_keys(
    tmp_path: Path, api: str
) -> None:
    scenario = load_scenario(blind_retry(tmp_path, idempotent=True, api=api))
    result = await run_scenario(scenario, report_dir=tmp_path / "reports")

    assert result.exit_code is ExitCode.SAFETY
    duplicated = duplicated_keys_in(result)
    assert duplicated, result.check("no_duplicate_keys")
    # Named in the check's summary, and each is a key of an insert acknowledged or
    # failed after more than one attempt: what a blind retry does.
    check = result.check("no_duplicate_keys")
    assert check.status == "fail"
    first = sorted(duplicated, key=lambda k: int(k.split("-")[1]))[0]
    assert first in check.summary
    retried = {r.key for r in result.records if r.attempts > 1}
    assert set(duplicated) <= retried
    # The report written to disk says the same.
    report = json.loads((tmp_path / "reports" / "broken" / "report.json").read_text())
    assert report["exit_code"] == 1
    dup = next(c for c in report["invariants"] if c["name"] == "no_duplicate_keys")
    assert set(dup["data"]["duplicated"]) == set(duplicated)


@pytest.mark.parametrize("api", ["engine", "decorator"])
async def test_the_correct_policy_passes_the_same_scenario(tmp_path: Path, api: str) -> None:
    scenario = load_scenario(blind_retry(tmp_path, idempotent=False, api=api))
    result = await run_scenario(scenario)

    assert result.exit_code is ExitCode.PASS, [c for c in result.checks if c.status != "pass"]
    unknown = [r for r in result.records if r.outcome == "unknown"]
    assert unknown, "the lost acknowledgements should surface as unknown outcomes"
    assert all(r.error == "CommitOutcomeUnknown" for r in unknown)
    listed = result.check("unknown_outcomes")
    assert listed.status == "info"
    assert listed.data is not None
    # Every unknown outcome is classified, as recovered (the COMMIT had landed) or absent.
    assert sorted(listed.data["recovered"] + listed.data["absent"]) == sorted(
        r.key for r in unknown if r.key is not None
    )
    assert listed.data["recovered"], "a COMMIT whose ack was lost after it landed is present"
    assert duplicated_keys_in_or_empty(result) == {}


def duplicated_keys_in_or_empty(result: RunResult) -> dict[str, int]:
    check = result.check("no_duplicate_keys")
    return {} if check.data is None else dict(check.data["duplicated"])


@pytest.mark.postgres
@pytest.mark.parametrize("idempotent", [True, False], ids=["broken", "correct"])
async def test_on_postgresql_through_the_proxy(
    tmp_path: Path, pg_url: str, idempotent: bool
) -> None:
    path = blind_retry(
        tmp_path, idempotent=idempotent, target=f'url = "{pg_url}"', fault=PROXY_LOST_ACK
    )
    scenario = load_scenario(path)
    assert scenario.target.proxy
    result = await run_scenario(scenario)

    assert result.target["proxy"] is not None
    assert result.check("faults_fired").status == "pass"
    assert result.check("no_leaked_sessions").status == "pass"
    if idempotent:
        assert result.exit_code is ExitCode.SAFETY
        assert duplicated_keys_in(result)
    else:
        assert result.exit_code is ExitCode.PASS, [c for c in result.checks if c.status != "pass"]
        assert any(r.outcome == "unknown" for r in result.records)


async def test_a_fault_that_never_fires_makes_the_run_inconclusive(tmp_path: Path) -> None:
    body = """
    [scenario]
    duration = 2
    [workload]
    rate = 30
    [[phase]]
    name = "baseline"
    start = 0
    end = 1
    [[phase]]
    name = "never"
    start = 1
    end = 2
    # The workload never deletes anything: this fault has nothing to act on.
    faults = [{ injector = "disconnect", rate = 1.0, when = "^DELETE" }]
    """
    result = await run_scenario(load_scenario(scenario_file(tmp_path, body)))
    assert result.exit_code is ExitCode.INCONCLUSIVE
    check = result.check("faults_fired")
    assert check.status == "inconclusive"
    assert "never/disconnect" in check.summary


async def test_the_watchdog_ends_a_hung_run_at_twice_its_duration(tmp_path: Path) -> None:
    body = """
    [scenario]
    duration = 1
    [workload]
    concurrency = 2
    rate = 20
    mix = { insert = 1 }
    [workload.policy]
    timeout = 30
    deadline = 30
    retries = 0
    [[phase]]
    name = "frozen"
    start = 0
    end = 1
    faults = [{ injector = "hang", rate = 1.0, when = "INSERT" }]
    """
    result = await run_scenario(load_scenario(scenario_file(tmp_path, body)))
    assert result.watchdog_fired
    assert 2.0 <= result.elapsed < 5.0
    assert result.exit_code is ExitCode.STEADY_STATE
    assert result.check("run ended within 2 x its planned duration").status == "fail"
    cancelled = [r for r in result.records if r.error == "CancelledError"]
    assert cancelled and all(r.outcome == "unknown" for r in cancelled)
    # Cleaned up all the same: nothing checked out, no task left behind.
    assert result.check("pool_checked_in").status == "pass"
    assert result.check("no_stray_tasks").status == "pass"


async def test_a_database_that_cannot_be_reached_is_a_harness_error(tmp_path: Path) -> None:
    body = """
    [scenario]
    duration = 2
    [target]
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    """
    result = await run_scenario(
        load_scenario(scenario_file(tmp_path, body)), report_dir=tmp_path / "reports"
    )
    assert result.exit_code is ExitCode.HARNESS_ERROR
    assert result.error is not None
    assert result.error.startswith("cannot set up the run on postgresql+asyncpg://")
    assert "ConnectionRefusedError" in result.error
    report = json.loads((tmp_path / "reports" / "scenario" / "report.json").read_text())
    assert report["verdict"] == "HARNESS ERROR"


# One worker, a fixed number of operations, and nothing that depends on time: no
# breaker (its reset timeout) and no retry budget (its refill per second), so that the
# sequence of statements is a function of the seed alone.
REPLAY = """
[scenario]
duration = 3
[workload]
concurrency = 1
rate = 100
operations = 80
mix = { insert = 2, increment = 1, read = 1 }
breaker = false
retry_budget = false
[workload.policy]
backoff = { initial = 0.001, max = 0.002 }
[[phase]]
name = "faults"
start = 0
end = 3
faults = [
  { injector = "disconnect", rate = 0.1 },
  { injector = "sqlite_busy", rate = 0.1 },
  { injector = "disconnect", name = "lost-ack", on = "commit", phase = "after", rate = 0.1 },
]
"""


def fault_decisions(result: RunResult) -> list[tuple[object, ...]]:
    assert result.files, "reports were written"
    lines = Path(result.files["faults.jsonl"]).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return [
        (e["source"], e["target"], e["ordinal"], e["strategy"], e["kind"], e["statement"])
        for e in entries
    ]


async def test_the_same_seed_replays_the_same_fault_decisions(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, REPLAY)
    logs = []
    for run, seed in enumerate((5, 5, 6)):
        result = await run_scenario(
            load_scenario(path, seed=seed), report_dir=tmp_path / f"run{run}"
        )
        assert result.exit_code is ExitCode.PASS, [c for c in result.checks if c.status != "pass"]
        assert len(result.records) == 80
        logs.append(fault_decisions(result))
    assert len(logs[0]) >= 10
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]
