"""Build a :class:`Policy` from a dict, ``RESILIENT_DB_*`` environment variables or TOML.

All three share one schema (see ``docs/configuration.md``)::

    timeout = 2.0            # per attempt, seconds; "none" to disable
    deadline = 10.0          # whole call, seconds
    retries = 3
    idempotent = false
    name = "orders"

    [backoff]                # or backoff_initial = ... in flat form
    initial = 0.05
    max = 2.0
    multiplier = 2.0
    jitter = 1.0

    [breaker]                # or breaker = "orders-db" / breaker = false
    name = "orders-db"
    failure_threshold = 5
    reset_timeout = 10.0

    [bulkhead]               # or bulkhead = 10
    max_concurrent = 10
    max_queue = 20
    queue_timeout = 0.5

    [retry_budget]           # or retry_budget = false
    ratio = 0.2
    min_per_second = 10.0

Every problem — an unknown key, a wrong type, a value out of range — raises
``ValueError``/``TypeError`` naming where it came from (the file and table, or the
environment variable), the key, and what is accepted.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from ._policy import Policy
from .policies.breaker import get_breaker
from .policies.budget import RetryBudget
from .policies.bulkhead import Bulkhead
from .policies.retry import Backoff

__all__ = ["policy_from_env", "policy_from_mapping", "policy_from_toml"]

T = TypeVar("T")

# key -> kind, used to parse strings from the environment and to list accepted keys.
_TOP: Final[dict[str, str]] = {
    "timeout": "seconds?",
    "deadline": "seconds?",
    "retries": "int",
    "idempotent": "bool",
    "name": "str",
    "backoff": "table",
    "breaker": "table|name|false",
    "bulkhead": "table|int|none",
    "retry_budget": "table|false",
}
_SECTIONS: Final[dict[str, dict[str, str]]] = {
    "backoff": {"initial": "seconds", "max": "seconds", "multiplier": "number", "jitter": "number"},
    "breaker": {
        "name": "str",
        "failure_threshold": "int?",
        "failure_rate_threshold": "number?",
        "minimum_calls": "int",
        "window": "seconds",
        "slow_call_duration": "seconds?",
        "slow_call_rate_threshold": "number",
        "reset_timeout": "seconds",
        "half_open_max_calls": "int",
        "success_threshold": "int?",
    },
    "bulkhead": {
        "max_concurrent": "int",
        "max_queue": "int",
        "queue_timeout": "seconds?",
        "name": "str",
    },
    "retry_budget": {"ratio": "number", "min_per_second": "number", "max_tokens": "number"},
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_NONE: Final = frozenset({"", "none", "null"})


def _accepted(keys: Mapping[str, str]) -> str:
    return ", ".join(sorted(keys))


def _flatten(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Turn flat keys (``backoff_initial``) into tables, refusing unknown keys."""
    result: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        if not isinstance(raw_key, str):
            raise TypeError(f"{source}: keys must be strings; got {raw_key!r}")
        key = raw_key.lower()
        if key in _TOP:
            if key in _SECTIONS and isinstance(value, Mapping):
                result.setdefault(key, {}).update(value)
            else:
                result[key] = value
            continue
        for section, fields in _SECTIONS.items():
            prefix = section + "_"
            if key.startswith(prefix) and key[len(prefix) :] in fields:
                table = result.setdefault(section, {})
                if not isinstance(table, dict):
                    raise ValueError(
                        f"{source}: {section} = {table!r} cannot be combined with {raw_key}"
                    )
                table[key[len(prefix) :]] = value
                break
        else:
            flat = [f"{s}_{f}" for s, fields in _SECTIONS.items() for f in fields]
            raise ValueError(
                f"{source}: unknown key {raw_key!r}; accepted keys: "
                f"{_accepted(_TOP)} (tables {', '.join(_SECTIONS)}), or flat: {', '.join(flat)}"
            )
    return result


def _check_table(section: str, table: Mapping[str, Any], source: str) -> dict[str, Any]:
    fields = _SECTIONS[section]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} in {section}; accepted: {_accepted(fields)}"
        )
    return dict(table)


def _build(mapping: Mapping[str, Any], source: str, **overrides: Any) -> Policy:
    flat = _flatten(mapping, source)
    kwargs: dict[str, Any] = {}
    for key in ("timeout", "deadline", "retries", "idempotent", "name"):
        if key in flat:
            kwargs[key] = flat[key]
    if "backoff" in flat:
        table = flat["backoff"]
        if not isinstance(table, Mapping):
            raise TypeError(
                f"{source}: backoff must be a table of {_accepted(_SECTIONS['backoff'])}"
            )
        kwargs["backoff"] = _wrap(source, lambda: Backoff(**_check_table("backoff", table, source)))
    if "breaker" in flat:
        value = flat["breaker"]
        if value is False:
            kwargs["breaker"] = False
        elif isinstance(value, str):
            kwargs["breaker"] = _wrap(source, lambda: get_breaker(value))
        elif isinstance(value, Mapping):
            settings = _check_table("breaker", value, source)
            name = settings.pop("name", "default")
            kwargs["breaker"] = _wrap(source, lambda: get_breaker(name, **settings))
        else:
            raise TypeError(
                f"{source}: breaker must be false, a breaker name, or a table of "
                f"{_accepted(_SECTIONS['breaker'])}; got {value!r}"
            )
    if "bulkhead" in flat:
        value = flat["bulkhead"]
        if isinstance(value, Mapping):
            settings = _check_table("bulkhead", value, source)
            if "max_concurrent" not in settings:
                raise ValueError(f"{source}: bulkhead table needs max_concurrent")
            max_concurrent = settings.pop("max_concurrent")
            kwargs["bulkhead"] = _wrap(source, lambda: Bulkhead(max_concurrent, **settings))
        else:
            kwargs["bulkhead"] = value
    if "retry_budget" in flat:
        value = flat["retry_budget"]
        if value is False or value is None:
            kwargs["retry_budget"] = None
        elif isinstance(value, Mapping):
            settings = _check_table("retry_budget", value, source)
            kwargs["retry_budget"] = _wrap(source, lambda: RetryBudget(**settings))
        else:
            raise TypeError(
                f"{source}: retry_budget must be false or a table of "
                f"{_accepted(_SECTIONS['retry_budget'])}; got {value!r}"
            )
    kwargs.update(overrides)
    return _wrap(source, lambda: Policy(**kwargs))


def _wrap(source: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{source}: {exc}") from exc


def policy_from_mapping(
    mapping: Mapping[str, Any], *, source: str = "config", **overrides: Any
) -> Policy:
    """A :class:`Policy` from a dict (nested tables or flat ``section_key`` keys).

    ``overrides`` are passed to :class:`Policy` as they are (e.g. a ``classifier``,
    which no configuration file can express).
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{source}: expected a mapping; got {type(mapping).__name__}")
    return _build(mapping, source, **overrides)


def _parse_env(name: str, kind: str, raw: str) -> Any:
    text = raw.strip()
    low = text.lower()
    options = kind.split("|")
    if "false" in options and low in _FALSE:
        return False
    if any(o.endswith("?") or o == "none" for o in options) and low in _NONE:
        return None
    for option in options:
        base = option.rstrip("?")
        try:
            if base in ("seconds", "number"):
                return float(text)
            if base == "int":
                return int(text)
        except ValueError:
            continue
        if base == "bool":
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        if base in ("str", "name") and text:
            return text
    raise ValueError(f"{name}: cannot read {raw!r} as {kind.replace('?', ' or none')}")


def policy_from_env(
    environ: Mapping[str, str] | None = None, *, prefix: str = "RESILIENT_DB_", **overrides: Any
) -> Policy:
    """A :class:`Policy` from ``RESILIENT_DB_*`` variables (``RESILIENT_DB_TIMEOUT=2``...).

    An unknown ``RESILIENT_DB_*`` variable is an error, so that a typo cannot
    silently leave a default in place.
    """
    env = os.environ if environ is None else environ
    mapping: dict[str, Any] = {}
    for var, raw in env.items():
        if not var.startswith(prefix):
            continue
        key = var[len(prefix) :].lower()
        kind = _TOP.get(key)
        if kind is None:
            for section, fields in _SECTIONS.items():
                if key.startswith(section + "_") and key[len(section) + 1 :] in fields:
                    kind = fields[key[len(section) + 1 :]]
                    break
        if kind is None:
            flat = [f"{s}_{f}" for s, fields in _SECTIONS.items() for f in fields]
            known = sorted(k for k in [*_TOP, *flat] if _TOP.get(k) != "table")
            raise ValueError(
                f"environment variable {var}: unknown setting {key!r}; accepted: "
                + ", ".join(prefix + k.upper() for k in known)
            )
        if kind == "table":
            raise ValueError(
                f"environment variable {var}: set {prefix}{key.upper()}_<FIELD> instead"
            )
        mapping[key] = _parse_env(var, kind.replace("table|", ""), raw)
    return _build(mapping, f"environment ({prefix}*)", **overrides)


def policy_from_toml(
    path: str | os.PathLike[str], *, table: str = "resilient_db", **overrides: Any
) -> Policy:
    """A :class:`Policy` from a table of a TOML file (dotted: ``"tool.resilient_db"``)."""
    file = Path(path)
    with file.open("rb") as handle:
        try:
            document = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{file}: not valid TOML: {exc}") from exc
    node: Any = document
    for part in table.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{file}: no [{table}] table")
        node = node[part]
    if not isinstance(node, Mapping):
        raise TypeError(f"{file}: [{table}] must be a table")
    return _build(node, f"{file} [{table}]", **overrides)
