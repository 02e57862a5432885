"""resilient-db's process-wide SQLAlchemy hooks, and what installing them switches on."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _flags_in_a_fresh_interpreter(steps: str) -> str:
    # A fresh interpreter: no other class-level listener, nothing installed yet.
    script = textwrap.dedent(
        """
        from sqlalchemy.engine import Dialect, Engine
        from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

        """
    ) + textwrap.dedent(steps)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_installing_the_hooks_keeps_every_engine_off_sqlalchemys_event_path() -> None:
    # Any connection-event listener sets Engine._has_events, and that flag alone puts
    # every connection of every engine on SQLAlchemy's event-dispatching path (6-10 %
    # of a short unit, docs/performance.md): the COMMIT and statement tracking wraps
    # dialect methods instead, so the flag stays unset.
    out = _flags_in_a_fresh_interpreter(
        """
        install_commit_tracking()
        print(Engine._has_events)
        """
    )
    assert out.split() == ["False"], out


def test_removing_the_hooks_clears_the_event_flags_they_set() -> None:
    # The benchmarks remove the hooks for their raw baseline: the flag listening set
    # (Dialect's, for handle_error) must be cleared again, or that baseline is not raw.
    out = _flags_in_a_fresh_interpreter(
        """
        install_commit_tracking()
        installed = Dialect._has_events
        uninstall_commit_tracking()
        print(installed, Dialect._has_events, Engine._has_events)
        """
    )
    assert out.split() == ["True", "False", "False"], out
