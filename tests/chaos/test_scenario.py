"""Scenario files: what is accepted, and errors that name the file, the key and the
accepted values (one message per case)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resilient_db.chaos import ScenarioError, builtin_scenarios, load_scenario
from resilient_db.chaos.scenario import parse_fault, parse_scenario

ROOT = Path(__file__).parent.parent.parent

MINIMAL = """
[scenario]
duration = 4
"""

PG = 'url = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"'


def write(tmp_path: Path, body: str, name: str = "case.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def error_of(tmp_path: Path, body: str, **overrides: object) -> str:
    path = write(tmp_path, body)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, **overrides)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every message names the file
    return message


CASES = [
    pytest.param(
        "[scenario]\nduration = 4\n[workloads]\n",
        "workloads: unknown key; accepted: scenario, target, workload, phase, steady_state, "
        "invariants",
        id="unknown-table",
    ),
    pytest.param(
        "[scenario]\nduration = 0\n",
        "scenario.duration: got an integer 0; accepted: a number of seconds > 0",
        id="zero-duration",
    ),
    pytest.param(
        "[scenario]\n",
        "scenario.duration: required when there are no phases; accepted: a number of seconds > 0",
        id="no-duration",
    ),
    pytest.param(
        "[scenario]\nduration = 4\nname = 'a b'\n",
        "scenario.name: got a string 'a b'; accepted: letters, digits, '-', '_' and '.'",
        id="bad-name",
    ),
    pytest.param(
        MINIMAL + "[workload]\nconcurrency = 0\n",
        "workload.concurrency: got an integer 0; accepted: an integer >= 1",
        id="concurrency",
    ),
    pytest.param(
        MINIMAL + "[workload]\nrate = -5\n",
        "workload.rate: got an integer -5; accepted: a number > 0",
        id="rate",
    ),
    pytest.param(
        MINIMAL + "[workload]\napi = 'orm'\n",
        "workload.api: got a string 'orm'; accepted: engine, decorator",
        id="api",
    ),
    pytest.param(
        MINIMAL + "[workload.mix]\ninserts = 1\n",
        "workload.mix.inserts: unknown operation; accepted: insert, increment, rmw, read",
        id="unknown-operation",
    ),
    pytest.param(
        MINIMAL + "[workload.mix]\ninsert = 0\nread = 0\n",
        "workload.mix: every weight is 0; accepted: at least one weight > 0",
        id="zero-weights",
    ),
    pytest.param(
        MINIMAL + "[workload.mix]\ninsert = { idempotent = true }\n",
        "workload.mix.insert.weight: required; accepted: a number >= 0",
        id="mix-table-without-weight",
    ),
    pytest.param(
        MINIMAL + "[workload.mix]\ninsert = { weight = 1, retry = 3 }\n",
        "workload.mix.insert.retry: unknown key; accepted: weight, timeout, deadline, retries, "
        "backoff, idempotent, verify_commits",
        id="mix-unknown-policy-key",
    ),
    pytest.param(
        MINIMAL + "[workload.policy]\nretries = -1\n",
        "workload.policy.retries: got an integer -1; accepted: an integer >= 0",
        id="retries",
    ),
    pytest.param(
        MINIMAL + "[workload.policy]\ntimeout = false\ndeadline = false\n",
        "workload.policy.timeout: an operation needs a timeout or a deadline",
        id="unbounded-operations",
    ),
    pytest.param(
        MINIMAL + "[workload.policy]\nbackoff = { initial = 0.5, max = 0.1 }\n",
        "workload.policy.backoff.max: got 0.1, below backoff.initial (0.5); accepted: a number "
        "of seconds >= 0.5",
        id="backoff",
    ),
    pytest.param(
        MINIMAL + "[workload]\napi = 'decorator'\n[workload.policy]\nverify_commits = true\n",
        "workload.policy.verify_commits: needs the engine wrapper; "
        'accepted: workload.api = "engine"',
        id="verify-commits-decorator",
    ),
    pytest.param(
        MINIMAL + "[workload.policy]\nverify_commits = true\n",
        "workload.policy.verify_commits: pg_xact_status needs PostgreSQL; accepted: "
        "verify_commits = false on SQLite",
        id="verify-commits-sqlite",
    ),
    pytest.param(
        MINIMAL + "[workload.breaker]\nreset_timout = 1\n",
        "workload.breaker.reset_timout: unknown key; accepted: failure_threshold",
        id="breaker-key",
    ),
    pytest.param(
        MINIMAL + "[target]\nurl = 'mysql+aiomysql://db/x'\n",
        "target.url: driver 'mysql+aiomysql' is not supported; accepted: postgresql+asyncpg://... "
        "or sqlite+aiosqlite:///path",
        id="url-driver",
    ),
    pytest.param(
        MINIMAL + "[target]\nurl = 'sqlite+aiosqlite://'\n",
        "target.url: an in-memory SQLite database shares one connection between all workers; "
        "accepted: sqlite+aiosqlite:///path/to/file.db",
        id="memory-sqlite",
    ),
    pytest.param(
        MINIMAL + "[target]\nproxy = true\n",
        "target.proxy: the chaos proxy reads the PostgreSQL protocol; accepted: proxy = true "
        "with a postgresql+asyncpg URL, or proxy = false",
        id="proxy-on-sqlite",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 2\nend = 1\n",
        "phase[1].end: got 1, not after start (2); accepted: a number > 2",
        id="phase-end-before-start",
    ),
    pytest.param(
        "[scenario]\nduration = 5\n[[phase]]\nname = 'a'\nstart = 0\nend = 6\n",
        "phase[1].end: got 6, past scenario.duration (5); accepted: a number of seconds <= 5",
        id="phase-past-duration",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\n[[phase]]\nname = 'a'\nstart = 1\nend = 2\n",
        "phase[2].name: 'a' is already the name of another phase; accepted: a unique name",
        id="duplicate-phase",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nend = 1\n",
        "phase[1].start: required; accepted: a number of seconds >= 0",
        id="phase-without-start",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'disconect', "
        "rate = 0.1 }]\n",
        "phase[1].faults[1].injector: got a string 'disconect'; accepted: connect_failure, "
        "disconnect, hang, latency, sqlite_busy, sqlstate_error",
        id="unknown-injector-fault",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ rate = 0.1 }]\n",
        'phase[1].faults[1]: name exactly one of proxy = "<toxic or action>" or injector = '
        '"<strategy>"',
        id="fault-without-via",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'disconnect' }]\n",
        "phase[1].faults[1].rate: required for injector = 'disconnect'",
        id="fault-missing-rate",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'disconnect', "
        "rate = 2 }]\n",
        "phase[1].faults[1].rate: got an integer 2; accepted: a number in [0, 1]",
        id="fault-rate",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'disconnect', "
        "rate = 0.1, on = 'connect' }]\n",
        "phase[1].faults[1].on: got a string 'connect'; accepted: statement, commit",
        id="fault-target",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'hang', "
        "rate = 0.1, when = '(' }]\n",
        "phase[1].faults[1].when: not a valid regular expression",
        id="fault-regex",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ proxy = 'latency', "
        "latency = 0.1 }]\n",
        "phase[1].faults[1].proxy: the proxy fault 'latency' needs a PostgreSQL target",
        id="proxy-fault-on-sqlite",
    ),
    pytest.param(
        f"[target]\n{PG}\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ injector = 'sqlite_busy', rate = 0.1 }]\n",
        "phase[1].faults[1].injector: sqlite_busy needs SQLite; accepted on PostgreSQL: "
        "sqlstate_error, disconnect, hang, latency, connect_failure",
        id="sqlite-fault-on-postgres",
    ),
    pytest.param(
        f"[target]\n{PG}\nproxy = false\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ proxy = 'disable' }]\n",
        "target.proxy: got false, but phases have proxy faults; accepted: proxy = true",
        id="proxy-faults-without-proxy",
    ),
    pytest.param(
        f"[target]\n{PG}\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ proxy = 'latency', latency = 0.1, stream = 'sideways' }]\n",
        "phase[1].faults[1].stream: got a string 'sideways'; accepted: upstream, downstream",
        id="toxic-stream",
    ),
    pytest.param(
        f"[target]\n{PG}\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ proxy = 'slicer', average_size = 4, size_variation = 9 }]\n",
        "phase[1].faults[1]: size_variation must be an integer >= 0 and < average_size (4); got 9",
        id="toxic-cross-field",
    ),
    pytest.param(
        f"[target]\n{PG}\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ proxy = 'disable', every = 1 }]\n",
        "phase[1].faults[1].every: unknown key; accepted: proxy, name",
        id="every-only-for-kill",
    ),
    pytest.param(
        f"[target]\n{PG}\n[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = "
        "[{ proxy = 'disable' }, { proxy = 'disable' }]\n",
        "phase[1].faults[2].name: 'a/disable' is already the name of another fault; "
        "accepted: a unique name",
        id="duplicate-fault-name",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'hang', rate = 1 }]\n"
        "[steady_state]\nbaseline = 'a'\n",
        "steady_state.baseline: phase 'a' has faults; accepted: a phase without faults",
        id="baseline-with-faults",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\n[steady_state]\nbaseline = 'b'\n",
        "steady_state.baseline: got a string 'b'; accepted: a",
        id="unknown-baseline",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\n[[steady_state.check]]\nphase = 'a'\n",
        "steady_state.check[1]: no expectation given; accepted: min_success_rate, max_p99_ratio, "
        "max_p99, min_throughput_ratio, breaker_closed_within",
        id="check-without-expectation",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\n[[steady_state.check]]\nphase = 'a'\n"
        "min_success_rate = 1.5\n",
        "steady_state.check[1].min_success_rate: got a number 1.5; accepted: a number in [0, 1]",
        id="success-rate",
    ),
    pytest.param(
        "[scenario]\nduration = 3\n[[phase]]\nname = 'a'\nstart = 0\nend = 2\n"
        "[[steady_state.check]]\nphase = 'a'\nbreaker_closed_within = 5\n",
        "steady_state.check[1].breaker_closed_within: phase 'a' ends at 2 s, so the breaker "
        "would be checked at 7 s, after the run ends (3 s); accepted: a number of seconds <= 1",
        id="breaker-window-past-the-end",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\n[workload]\nbreaker = false\n"
        "[[steady_state.check]]\nphase = 'a'\nbreaker_closed_within = 0\n",
        "steady_state.check[1].breaker_closed_within: the workload has no breaker",
        id="breaker-check-without-breaker",
    ),
    pytest.param(
        "[[phase]]\nname = 'a'\nstart = 0\nend = 1\nfaults = [{ injector = 'hang', rate = 1 }]\n"
        "[[steady_state.check]]\nphase = 'a'\nmax_p99_ratio = 2\n",
        "steady_state.check[1].max_p99_ratio: is relative to the baseline, and there is none",
        id="relative-without-baseline",
    ),
    pytest.param(
        MINIMAL + "[invariants]\nno_lost_writes = false\n",
        "invariants.no_lost_writes: unknown key; accepted: acknowledged_writes_present, "
        "no_duplicate_keys",
        id="unknown-invariant",
    ),
    pytest.param(
        "[scenario\nduration = 4\n",
        "not valid TOML",
        id="not-toml",
    ),
]


@pytest.mark.parametrize(("body", "expected"), CASES)
def test_invalid_scenarios_are_refused_naming_file_key_and_accepted_values(
    tmp_path: Path, body: str, expected: str
) -> None:
    assert expected in error_of(tmp_path, body)


def test_a_missing_scenario_names_the_built_in_ones() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario("no-such-scenario")
    assert str(info.value) == (
        "no-such-scenario: no such file, and not a built-in scenario; built-in scenarios: "
        + ", ".join(builtin_scenarios())
    )


def test_a_bad_url_override_names_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, url="oracle://db")
    assert str(info.value).startswith("--url: target.url: driver 'oracle' is not supported")


def test_a_url_override_is_validated_against_the_faults(tmp_path: Path) -> None:
    body = f"""
    [target]
    {PG}
    [[phase]]
    name = "outage"
    start = 0
    end = 2
    faults = [{{ proxy = "disable" }}]
    """
    message = error_of(tmp_path, body, url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert "phase[1].faults[1].proxy: the proxy fault 'disable' needs a PostgreSQL target" in (
        message
    )


def test_a_duration_override_scales_the_phases(tmp_path: Path) -> None:
    body = """
    [scenario]
    duration = 10
    [[phase]]
    name = "baseline"
    start = 0
    end = 4
    [[phase]]
    name = "faults"
    start = 4
    end = 8
    faults = [{ injector = "disconnect", rate = 0.1 }]
    """
    scenario = load_scenario(write(tmp_path, body), duration=5)
    assert [(p.start, p.end) for p in scenario.phases] == [(0, 2), (2, 4)]
    assert scenario.duration == 5
    assert dict(scenario.overrides) == {"duration": 5.0}


def test_a_duration_override_that_leaves_no_room_for_a_breaker_check_is_refused(
    tmp_path: Path,
) -> None:
    body = """
    [scenario]
    duration = 10
    [[phase]]
    name = "faults"
    start = 0
    end = 5
    faults = [{ injector = "disconnect", rate = 0.1 }]
    [[steady_state.check]]
    phase = "faults"
    breaker_closed_within = 4
    """
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, body), duration=4)
    assert str(info.value).startswith(
        "--duration: steady_state.check[1].breaker_closed_within: phase 'faults' ends at 2 s"
    )


def test_the_seed_comes_from_the_option_the_file_or_chance(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "seed = 42\n")
    assert (load_scenario(path).seed, load_scenario(path).seed_origin) == (42, "scenario")
    assert (load_scenario(path, seed=7).seed, load_scenario(path, seed=7).seed_origin) == (
        7,
        "--seed",
    )
    unseeded = write(tmp_path, MINIMAL, "unseeded.toml")
    assert load_scenario(unseeded).seed_origin == "random"


def test_proxy_faults_switch_the_proxy_on_and_get_names(tmp_path: Path) -> None:
    body = f"""
    [target]
    {PG}
    [[phase]]
    name = "flaky"
    start = 0
    end = 2
    faults = [
      {{ proxy = "latency", latency = 0.01 }},
      {{ proxy = "kill", which = "in_transaction", every = 0.5, name = "killer" }},
    ]
    """
    scenario = load_scenario(write(tmp_path, body))
    assert scenario.target.proxy is True
    assert [(f.name, f.via, f.kind) for f in scenario.faults] == [
        ("flaky/latency", "proxy", "latency"),
        ("killer", "proxy", "kill"),
    ]
    assert scenario.faults[0].toxic().name == "flaky/latency"
    assert scenario.faults[1].every == 0.5


def test_the_scenario_hash_is_the_files_sha256(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path, MINIMAL)
    assert load_scenario(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_default_scenario_runs_on_the_embedded_sqlite_database() -> None:
    scenario = load_scenario()
    assert scenario.name == "quick"
    assert scenario.target.url is None
    assert scenario.target.dialect == "sqlite"
    assert 10 <= scenario.duration <= 20
    assert scenario.uses_injector


@pytest.mark.parametrize("name", sorted(builtin_scenarios()))
def test_every_built_in_scenario_is_valid(name: str) -> None:
    assert load_scenario(name).name == name


@pytest.mark.parametrize("path", sorted((ROOT / "chaos").glob("*.toml")), ids=lambda p: p.stem)
def test_every_ci_scenario_is_valid_and_fits_the_ci_budget(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.target.dialect == "postgresql"
    assert scenario.target.proxy
    assert scenario.faults or scenario.phases
    assert scenario.duration <= 40


def test_a_fault_can_be_given_inline_as_on_the_command_line() -> None:
    fault = parse_fault('proxy = "latency", latency = 0.1, jitter = 0.02')
    assert (fault.via, fault.kind, fault.param("latency"), fault.param("jitter")) == (
        "proxy",
        "latency",
        0.1,
        0.02,
    )
    with pytest.raises(ScenarioError) as info:
        parse_fault('proxy = "latency", latency = -1')
    assert str(info.value) == (
        "--fault: fault.latency: got an integer -1; accepted: a number of seconds >= 0"
    )


def test_parse_scenario_reads_text() -> None:
    scenario = parse_scenario(MINIMAL, source="inline", default_name="inline")
    assert (scenario.name, scenario.source, scenario.duration) == ("inline", "inline", 4.0)
