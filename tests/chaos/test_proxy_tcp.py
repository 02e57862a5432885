"""The chaos proxy's stream toxics on plain TCP (a small echo server), byte by byte.

These need no database: what each toxic does to the bytes and to the connection
is easiest to see on an echo. The PostgreSQL tests (test_proxy.py) show the same
toxics through a real driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from resilient_db.chaos.proxy import (
    Bandwidth,
    ChaosProxy,
    Latency,
    LimitData,
    Slicer,
    SlowClose,
    Timeout,
)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """An echo server on a free port; it closes its side when it reads ``bye``."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while data := await reader.read(65536):
                if data.endswith(b"bye"):
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _client(
    proxy: ChaosProxy,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_plain_tcp_is_detected_and_forwarded_blind(echo: str) -> None:
    async with ChaosProxy(echo) as proxy, _client(proxy) as (reader, writer):
        writer.write(b"hello, not postgres")
        assert await reader.readexactly(19) == b"hello, not postgres"
        assert proxy.connections()[0].transaction_status is None
        assert [(r.toxic, r.action) for r in proxy.fault_log()] == [("postgres", "not postgres")]


async def test_latency_is_counted_from_each_chunks_arrival(echo: str) -> None:
    toxic = Latency(latency=0.2, stream="upstream")
    async with ChaosProxy(echo, toxics=[toxic]) as proxy, _client(proxy) as (reader, writer):
        start = time.perf_counter()
        for _ in range(10):  # 10 chunks, 20 ms apart
            writer.write(b"x" * 100)
            await writer.drain()
            await asyncio.sleep(0.02)
        await reader.readexactly(1000)
        elapsed = time.perf_counter() - start
    # The last chunk left at ~0.18 s and is due at ~0.38 s; delays that added up
    # (a queue served one chunk after the other) would take 2 s.
    assert 0.38 <= elapsed < 0.38 + 0.3


async def test_slow_close_delays_the_close_that_follows_the_peers(echo: str) -> None:
    toxic = SlowClose(delay=0.3)  # downstream: the server's close reaches us late
    async with ChaosProxy(echo, toxics=[toxic]) as proxy, _client(proxy) as (reader, writer):
        start = time.perf_counter()
        writer.write(b"bye")
        assert await reader.read() == b""  # EOF
        elapsed = time.perf_counter() - start
    assert 0.3 <= elapsed < 0.3 + 1.0


async def test_timeout_drops_data_and_closes_after_its_timeout(echo: str) -> None:
    toxic = Timeout(timeout=0.3, stream="upstream")
    async with ChaosProxy(echo, toxics=[toxic]) as proxy:
        start = time.perf_counter()
        async with _client(proxy) as (reader, writer):
            writer.write(b"ping")
            assert await reader.read() == b""  # nothing echoed, then the close
            elapsed = time.perf_counter() - start
        assert proxy.stats().faults[toxic.name] == 2  # one chunk dropped, one close
    assert 0.3 <= elapsed < 0.3 + 1.0


async def test_removing_a_blackhole_closes_the_connections_it_held(echo: str) -> None:
    async with ChaosProxy(echo) as proxy, _client(proxy) as (reader, writer):
        proxy.add_toxic(Timeout(timeout=0, stream="upstream", name="hole"))
        writer.write(b"lost")
        await writer.drain()
        await asyncio.sleep(0.05)
        proxy.remove_toxic("hole")  # as Toxiproxy: the stream lost data, it is closed
        assert await reader.read() == b""


async def test_limit_data_closes_once_the_limit_has_passed(echo: str) -> None:
    toxic = LimitData(bytes=10)
    async with ChaosProxy(echo, toxics=[toxic]) as proxy, _client(proxy) as (reader, writer):
        writer.write(b"0123456789abcdefghij")
        assert await reader.read() == b"0123456789"  # then EOF


async def test_slicer_cuts_the_stream_without_changing_it(echo: str) -> None:
    toxic = Slicer(average_size=10, size_variation=5, delay=0.001)
    payload = bytes(range(256)) * 4
    async with ChaosProxy(echo, toxics=[toxic]) as proxy, _client(proxy) as (reader, writer):
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        pieces = sum(r.value or 0 for r in proxy.fault_log() if r.action == "slice")
    assert pieces >= len(payload) // 15


async def test_bandwidth_limits_the_rate(echo: str) -> None:
    toxic = Bandwidth(rate=50_000)  # bytes per second, downstream
    async with ChaosProxy(echo, toxics=[toxic]) as proxy, _client(proxy) as (reader, writer):
        start = time.perf_counter()
        writer.write(b"z" * 25_000)
        await reader.readexactly(25_000)
        elapsed = time.perf_counter() - start
    assert 0.45 <= elapsed < 0.5 + 1.0


async def test_kill_by_ordinal_resets_only_that_connection(echo: str) -> None:
    async with (
        ChaosProxy(echo) as proxy,
        _client(proxy) as (first_reader, first_writer),
        _client(proxy) as (second_reader, second_writer),
    ):
        for writer, reader in ((first_writer, first_reader), (second_writer, second_reader)):
            writer.write(b"up")
            assert await reader.readexactly(2) == b"up"
        assert proxy.kill([1], mode="rst") == [1]
        with pytest.raises(ConnectionResetError):
            await first_reader.read()
        second_writer.write(b"still")
        assert await second_reader.readexactly(5) == b"still"
        assert [c.ordinal for c in proxy.connections()] == [2]


async def test_half_open_holds_data_until_the_partition_heals(echo: str) -> None:
    async with ChaosProxy(echo) as proxy, _client(proxy) as (reader, writer):
        proxy.half_open()
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.2)
        proxy.half_open(False)
        assert await reader.readexactly(4) == b"held"
