"""pytest plugin (registered through the ``pytest11`` entry point): chaos fixtures.

Installed with resilient-db, it gives every test suite:

``resilient_no_waits``
    Backoff waits off for the test (``resilient_db.testing.set_testing``).
``chaos_seed``
    The run's seed: ``--chaos-seed N`` or the ``RESILIENT_CHAOS_SEED`` environment
    variable, else a random one, printed in the test header so a failure replays.
``chaos_proxy``
    A factory: ``proxy = chaos_proxy("127.0.0.1:5432", toxics=[...])`` starts a
    :class:`~resilient_db.chaos.ChaosProxy` (seeded with ``chaos_seed``), stopped
    after the test.
``chaos_proxied_engine``
    A factory: ``engine, proxy = chaos_proxied_engine(url, **engine_kwargs)`` — an
    ``AsyncEngine`` whose connections go through a fresh proxy; disposed after
    the test.
``chaos_injector``
    A factory: ``injector = chaos_injector(engine, disconnect(rate=0.1))`` — an
    attached :class:`~resilient_db.chaos.FaultInjector` (seeded), detached after
    the test.

Example::

    async def test_orders_survive_resets(chaos_proxied_engine, resilient_no_waits):
        engine, proxy = chaos_proxied_engine(DATABASE_URL)
        proxy.add_toxic(ResetPeer(timeout=0.05, toxicity=0.2))
        ...
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..testing import set_testing
from .injector import FaultInjector, Strategy
from .proxy import ChaosProxy

__all__ = [
    "chaos_injector",
    "chaos_proxied_engine",
    "chaos_proxy",
    "chaos_seed",
    "pytest_addoption",
    "pytest_report_header",
    "resilient_no_waits",
]

_SEED_VAR = "RESILIENT_CHAOS_SEED"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("resilient-db")
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help=f"seed for chaos proxies and injectors (default: ${_SEED_VAR} or random)",
    )


def _seed(config: pytest.Config) -> int:
    cached = getattr(config, "_resilient_chaos_seed", None)
    if isinstance(cached, int):
        return cached
    option = config.getoption("--chaos-seed", default=None)
    if option is None and os.environ.get(_SEED_VAR):
        option = int(os.environ[_SEED_VAR])
    seed = int(option) if option is not None else random.SystemRandom().randrange(2**31)
    config._resilient_chaos_seed = seed  # type: ignore[attr-defined]
    return seed


def pytest_report_header(config: pytest.Config) -> str:
    return f"resilient-db chaos seed: {_seed(config)} (replay with --chaos-seed {_seed(config)})"


@pytest.fixture
def resilient_no_waits() -> Iterator[None]:
    """Backoff waits off for this test; attempts, timeouts and breakers still apply."""
    with set_testing(True):
        yield


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    """The run's chaos seed (``--chaos-seed``, ``$RESILIENT_CHAOS_SEED`` or random)."""
    return _seed(request.config)


@pytest.fixture
def chaos_proxy(chaos_seed: int) -> Iterator[Callable[..., ChaosProxy]]:
    """Factory of started proxies, all stopped after the test."""
    started: list[ChaosProxy] = []

    def start(upstream: str | tuple[str, int], **kwargs: Any) -> ChaosProxy:
        kwargs.setdefault("seed", chaos_seed)
        proxy = ChaosProxy(upstream, **kwargs)
        proxy.start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in reversed(started):
            proxy.stop()


@pytest.fixture
async def chaos_proxied_engine(
    chaos_proxy: Callable[..., ChaosProxy],
) -> AsyncIterator[Callable[..., tuple[AsyncEngine, ChaosProxy]]]:
    """Factory of engines whose connections go through a fresh proxy."""
    engines: list[AsyncEngine] = []

    def make(url: str, **engine_kwargs: Any) -> tuple[AsyncEngine, ChaosProxy]:
        parsed = make_url(url)
        if not parsed.host:
            raise ValueError(f"chaos_proxied_engine needs a URL with a host; got {url!r}")
        default_port = 5432 if parsed.get_backend_name() == "postgresql" else None
        port = parsed.port or default_port
        if port is None:
            raise ValueError(f"chaos_proxied_engine needs a URL with a port; got {url!r}")
        proxy = chaos_proxy(f"{parsed.host}:{port}")
        engine = create_async_engine(proxy.proxied_url(url), **engine_kwargs)
        engines.append(engine)
        return engine, proxy

    try:
        yield make
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.fixture
def chaos_injector(chaos_seed: int) -> Iterator[Callable[..., FaultInjector]]:
    """Factory of attached fault injectors, detached after the test."""
    attached: list[FaultInjector] = []

    def attach(engine: AsyncEngine, *strategies: Strategy, **kwargs: Any) -> FaultInjector:
        kwargs.setdefault("seed", chaos_seed)
        injector = FaultInjector(engine, *strategies, **kwargs)
        injector.attach()
        attached.append(injector)
        return injector

    try:
        yield attach
    finally:
        for injector in reversed(attached):
            if injector.attached:
                injector.detach()
