"""Render the classification tables as Markdown (docs/errors.md embeds them; a test
checks that the page and the code agree)."""

from __future__ import annotations

from ._classify import SQLITE_RULES, SQLSTATE_RULES, Rule

__all__ = ["sqlite_table", "sqlstate_table"]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _row(key: str, rule: Rule) -> str:
    extra = " (ResilientEngine empties the pool)" if rule.failover else ""
    return (
        f"| `{key}` | {rule.name} | {rule.category.value} | {_yes(rule.retryable)} "
        f"| {_yes(rule.counts_for_breaker)}{extra} |"
    )


def sqlstate_table() -> str:
    """SQLSTATE rules: exact codes first, then whole classes (``08`` = ``08xxx``)."""
    header = [
        "| SQLSTATE | condition | category | retried | counted by the breaker |",
        "|---|---|---|---|---|",
    ]
    exact = sorted(k for k in SQLSTATE_RULES if len(k) == 5)
    classes = sorted(k for k in SQLSTATE_RULES if len(k) == 2)
    rows = [_row(k, SQLSTATE_RULES[k]) for k in exact]
    rows += [_row(f"{k}xxx", SQLSTATE_RULES[k]) for k in classes]
    return "\n".join(header + rows)


def sqlite_table() -> str:
    """SQLite extended result codes."""
    header = [
        "| SQLite code | name | category | retried | counted by the breaker |",
        "|---|---|---|---|---|",
    ]
    rows = [_row(str(k), SQLITE_RULES[k]) for k in sorted(SQLITE_RULES)]
    return "\n".join(header + rows)
