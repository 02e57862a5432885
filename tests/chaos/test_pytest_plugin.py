"""The pytest plugin's fixtures, used as a user would (pytester runs a real session)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def test_the_plugin_is_registered_and_prints_the_seed(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--chaos-seed", "1234", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*resilient-db chaos seed: 1234*"])
    result.assert_outcomes(passed=1)


def test_fixtures_give_seeded_injectors_and_restore_waits(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine
        from resilient_db.chaos import disconnect
        from resilient_db.testing import is_testing

        @pytest.mark.asyncio
        async def test_injector(tmp_path, chaos_injector, chaos_seed, resilient_no_waits):
            assert is_testing()
            engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
            injector = chaos_injector(engine, disconnect(rate=1.0))
            assert injector.seed == chaos_seed == 99
            with pytest.raises(Exception):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            assert injector.counts == {"disconnect": 1}
            await engine.dispose()

        def test_waits_back_on():
            assert not is_testing()
        """
    )
    result = pytester.runpytest(
        "--chaos-seed", "99", "-p", "no:cacheprovider", "-W", "error", "-o", "asyncio_mode=strict"
    )
    result.assert_outcomes(passed=2)


def test_proxy_fixture_stops_the_proxy_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import socket
        STATE = {}

        def test_start(chaos_proxy):
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()
            STATE["server"] = server
            proxy = chaos_proxy(server.getsockname())
            STATE["proxy"] = proxy
            assert proxy.running

        def test_stopped():
            assert not STATE["proxy"].running
            STATE["server"].close()
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
