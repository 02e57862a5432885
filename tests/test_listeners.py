"""resilient-db's process-wide SQLAlchemy listeners, and what installing them switches on."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_removing_the_listeners_takes_sqlalchemy_off_its_event_path() -> None:
    # Listening at class level sets Engine._has_events (and Dialect's, for
    # handle_error); that flag alone puts every connection of every engine on
    # SQLAlchemy's event-dispatching path. The benchmarks remove the listeners for
    # their raw baseline: removing them must clear the flags again, or that
    # baseline is not raw. A fresh interpreter: no other class-level listener.
    script = textwrap.dedent(
        """
        from sqlalchemy.engine import Dialect, Engine
        from resilient_db._sqla import install_commit_tracking, uninstall_commit_tracking

        install_commit_tracking()
        installed = (Engine._has_events, Dialect._has_events)
        uninstall_commit_tracking()
        print(installed, (Engine._has_events, Dialect._has_events))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["(True,", "True)", "(False,", "False)"], out
