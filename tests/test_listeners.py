"""resilient-db's process-wide SQLAlchemy hooks, and what installing them switches on."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _flags_in_a_fresh_interpreter(steps: str) -> str:
    # A fresh interpreter: no other class-level listener, nothing installed yet.
    script = textwrap.dedent(
        """
        import asyncio

        from sqlalchemy import text
        from sqlalchemy.engine import Dialect, Engine
        from sqlalchemy.ext.asyncio import create_async_engine

        from resilient_db._sqla import (
            inner_method,
            install_commit_tracking,
            uninstall_commit_tracking,
        )

        async def use(engine):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        def tracked(engine):
            return inner_method(engine.sync_engine.dialect, "do_commit") is not None

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


def test_a_checkout_from_a_warm_pool_runs_no_listener_of_ours() -> None:
    # A pool with a `checkout` listener takes SQLAlchemy's slow checkout path (and
    # calls the listener) on every checkout, guarded or not: resilient-db learns of
    # an engine from its pool's first new connection instead.
    out = _flags_in_a_fresh_interpreter(
        """
        install_commit_tracking()
        engine = create_async_engine("sqlite+aiosqlite://")

        async def main():
            await use(engine)
            await engine.dispose()

        print(bool(engine.sync_engine.pool.dispatch.checkout))
        print(tracked(engine))
        asyncio.run(main())
        print(tracked(engine))
        """
    )
    assert out.split() == ["False", "False", "True"], out


def test_engines_connected_before_the_hooks_are_installed_are_tracked() -> None:
    # A pool keeps the connections it made before resilient-db was installed, and
    # would never make a new one: installing finds such engines itself.
    out = _flags_in_a_fresh_interpreter(
        """
        from sqlalchemy.pool import AsyncAdaptedQueuePool

        engine = create_async_engine("sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool)

        async def main():
            await use(engine)
            print(engine.sync_engine.pool.checkedin(), tracked(engine))
            install_commit_tracking()
            print(tracked(engine))
            await engine.dispose()

        asyncio.run(main())
        """
    )
    assert out.split() == ["1", "False", "True"], out


def test_installing_again_wraps_what_uninstalling_unwrapped() -> None:
    # The benchmarks toggle the hooks per round for a raw baseline; the engines they
    # made meanwhile keep their pooled connections, so reinstalling must track them.
    out = _flags_in_a_fresh_interpreter(
        """
        install_commit_tracking()
        engine = create_async_engine("sqlite+aiosqlite://")
        asyncio.run(use(engine))
        print(tracked(engine))
        uninstall_commit_tracking()
        print(tracked(engine), "do_commit" in vars(engine.sync_engine.dialect))
        install_commit_tracking()
        print(tracked(engine))
        """
    )
    assert out.split() == ["True", "False", "False", "True"], out


def test_an_engine_that_connects_while_uninstalled_is_tracked_on_reinstall() -> None:
    # The benchmarks' raw rounds uninstall the tracking; an engine that opens its
    # pooled connection then must be tracked once the tracking is back, or its
    # timeouts wait out SQLAlchemy's graceful close (no in-flight registration).
    out = _flags_in_a_fresh_interpreter(
        """
        install_commit_tracking()
        uninstall_commit_tracking()
        engine = create_async_engine("sqlite+aiosqlite://")
        asyncio.run(use(engine))
        print(tracked(engine))
        install_commit_tracking()
        print(tracked(engine))
        """
    )
    assert out.split() == ["False", "True"], out
