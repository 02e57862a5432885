"""The guarded hot path stays specializable by the interpreter (CPython 3.11).

A third of what resilient-db added to a guarded unit of work was generic attribute
lookups that CPython 3.11 cannot specialize: ``_SCOPE.get()``, ``BreakerState.CLOSED``,
``AsyncConnection.execute``, class-level defaults read through instances
(docs/performance.md). They are easy to bring back without noticing — nothing
fails, every unit just gets slower. ``python -m bench.specialization`` lists the
generic loads a unit executes; this test holds the list to the few the
interpreter cannot specialize whatever we write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

UNAVOIDABLE = {
    # A method of asyncio's C Task (the attempt and release timers' starting count
    # of cancellation requests).
    ("AttemptTimer.__init__", "cancelling"),
    ("ConnectionTimer._arm_timer", "cancelling"),
    # Attributes of SQLAlchemy's objects: its execution context, a TextClause.
    ("_wrap_statement.<locals>.run_statement", "root_connection"),
    ("_may_retry_alone", "text"),
}
"""(function, name) of the generic loads allowed on the hot path, with why."""


@pytest.mark.skipif(
    sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11),
    reason="the specializer's forms differ between versions; this reads CPython 3.11's",
)
def test_a_guarded_unit_runs_no_avoidable_generic_lookup(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "bench.specialization", "--db", "sqlite", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (json_path,) = tmp_path.glob("specialization-*.json")
    variants = json.loads(json_path.read_text())["variants"]
    assert set(variants) == {"@resilient", "ResilientEngine"}
    for name, loads in variants.items():
        avoidable = [load for load in loads if (load["function"], load["name"]) not in UNAVOIDABLE]
        assert not avoidable, (name, avoidable)
