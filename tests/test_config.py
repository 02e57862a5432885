"""Configuration from dicts, RESILIENT_DB_* variables and TOML, validated when built."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from resilient_db import Policy, RetryBudget, get_breaker


def test_keyword_arguments_accept_timedelta_and_normalise_to_seconds() -> None:
    policy = Policy(timeout=timedelta(milliseconds=1500), deadline=timedelta(seconds=4))
    assert (policy.timeout, policy.deadline) == (1.5, 4.0)


def test_a_zero_retries_policy_is_legitimate() -> None:
    assert Policy(retries=0).retries == 0


def test_from_mapping_with_tables() -> None:
    policy = Policy.from_mapping(
        {
            "timeout": 2,
            "retries": 5,
            "backoff": {"initial": 0.1, "max": 1.0, "jitter": 0.5},
            "breaker": {"name": "orders-db", "failure_threshold": 7},
            "bulkhead": {"max_concurrent": 4, "max_queue": 8},
            "retry_budget": {"ratio": 0.1},
        }
    )
    assert (policy.timeout, policy.retries) == (2.0, 5)
    assert (policy.backoff.initial, policy.backoff.max, policy.backoff.jitter) == (0.1, 1.0, 0.5)
    assert policy.breaker is get_breaker("orders-db")
    assert get_breaker("orders-db").failure_threshold == 7
    assert policy.bulkhead is not None and policy.bulkhead.max_queue == 8
    assert isinstance(policy.retry_budget, RetryBudget) and policy.retry_budget.ratio == 0.1


def test_from_mapping_with_flat_keys_and_disabled_parts() -> None:
    policy = Policy.from_mapping(
        {"backoff_initial": 0.2, "backoff_max": 3, "breaker": False, "retry_budget": False}
    )
    assert policy.backoff.initial == 0.2
    assert policy.breaker is None
    assert policy.retry_budget is None


def test_from_env() -> None:
    policy = Policy.from_env(
        {
            "RESILIENT_DB_TIMEOUT": "2.5",
            "RESILIENT_DB_DEADLINE": "none",
            "RESILIENT_DB_RETRIES": "1",
            "RESILIENT_DB_IDEMPOTENT": "yes",
            "RESILIENT_DB_BACKOFF_JITTER": "0",
            "RESILIENT_DB_BREAKER": "off",
            "RESILIENT_DB_BULKHEAD": "12",
            "PATH": "/usr/bin",
        }
    )
    assert (policy.timeout, policy.deadline, policy.retries) == (2.5, None, 1)
    assert policy.idempotent is True
    assert policy.backoff.jitter == 0.0
    assert policy.breaker is None
    assert policy.bulkhead is not None and policy.bulkhead.max_concurrent == 12


def test_from_toml_table_in_pyproject(tmp_path: Path) -> None:
    file = tmp_path / "pyproject.toml"
    file.write_text(
        '[tool.resilient_db]\ntimeout = 1.5\nretries = 2\nbreaker = "billing"\n'
        "[tool.resilient_db.backoff]\ninitial = 0.01\n"
    )
    policy = Policy.from_toml(file, table="tool.resilient_db")
    assert (policy.timeout, policy.retries, policy.backoff.initial) == (1.5, 2, 0.01)
    assert policy.breaker is get_breaker("billing")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout": -1}, ValueError, "timeout must be a number of seconds or a timedelta, > 0"),
        ({"timeout": 0}, ValueError, "timeout must be a number of seconds or a timedelta, > 0"),
        ({"timeout": "2"}, TypeError, "timeout must be a number of seconds"),
        ({"deadline": float("nan")}, ValueError, "deadline must be a number of seconds"),
        ({"retries": -1}, ValueError, "retries must be an integer >= 0; got -1"),
        ({"retries": 2.5}, TypeError, "retries must be an integer >= 0"),
        ({"retries": True}, TypeError, "retries must be an integer >= 0"),
        ({"backoff": {"jitter": 1.5}}, ValueError, "backoff.jitter must be a number in [0, 1]"),
        ({"backoff": {"jitter": -0.1}}, ValueError, "backoff.jitter must be a number in [0, 1]"),
        ({"backoff": {"initial": 2, "max": 1}}, ValueError, "backoff.max must be >= backoff"),
        ({"backoff": {"multiplier": 0.5}}, ValueError, "backoff.multiplier must be a number >= 1"),
        ({"backoff": {"speed": 1}}, ValueError, "backoff got unknown key(s) ['speed']"),
        ({"breaker": 3}, TypeError, "breaker must be a CircuitBreaker"),
        ({"bulkhead": 0}, ValueError, "bulkhead must be an integer >= 1; got 0"),
        ({"idempotent": 1}, TypeError, "idempotent must be True or False"),
        ({"retry_budget": 0.2}, TypeError, "retry_budget must be a RetryBudget or None"),
        ({"classifier": "x"}, TypeError, "classifier must be callable or None"),
    ],
)
def test_bad_values_are_refused_when_built(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        Policy(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_unknown_key_in_a_mapping_lists_the_accepted_keys() -> None:
    with pytest.raises(ValueError, match="unknown key 'timout'; accepted keys: backoff, breaker"):
        Policy.from_mapping({"timout": 2})


def test_unknown_environment_variable_is_an_error() -> None:
    typo = {"RESILIENT_DB_TIMOUT": "2"}
    with pytest.raises(ValueError, match="RESILIENT_DB_TIMOUT: unknown setting 'timout'"):
        Policy.from_env(typo)


def test_unreadable_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="RESILIENT_DB_RETRIES: cannot read 'three' as int"):
        Policy.from_env({"RESILIENT_DB_RETRIES": "three"})


def test_out_of_range_environment_value_names_the_source() -> None:
    with pytest.raises(ValueError, match=r"environment \(RESILIENT_DB_\*\): timeout must be"):
        Policy.from_env({"RESILIENT_DB_TIMEOUT": "-3"})


def test_toml_errors_name_the_file_and_table(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("[resilient_db]\nretries = -2\n")
    with pytest.raises(ValueError, match=r"settings.toml \[resilient_db\]: retries must be"):
        Policy.from_toml(file)


def test_toml_unknown_key_in_a_table(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("[resilient_db.breaker]\nfailures = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['failures'\] in breaker"):
        Policy.from_toml(file)


def test_missing_toml_table_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("[other]\nx = 1\n")
    with pytest.raises(ValueError, match=r"no \[resilient_db\] table"):
        Policy.from_toml(file)
