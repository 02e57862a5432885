"""The Toxiproxy-compatible HTTP API, driven by a plain HTTP client (urllib).

Requests and answers are the JSON Toxiproxy clients (and Chaos Toolkit's
toxiproxy driver) send and expect; the effect of each call is checked on real
PostgreSQL connections through the proxies it creates.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from resilient_db.chaos.proxy import ChaosProxy, ToxiproxyServer

pytestmark = pytest.mark.postgres


def _send(method: str, url: str, body: Any = None, agent: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if agent is not None:
        request.add_header("User-Agent", agent)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        exc.close()
    return status, json.loads(raw) if raw else None


async def http(method: str, url: str, body: Any = None, agent: str | None = None) -> Any:
    return await asyncio.to_thread(_send, method, url, body, agent)


@pytest.fixture
async def api() -> AsyncIterator[ToxiproxyServer]:
    async with ToxiproxyServer() as server:
        yield server


def _dsn_through(pg_dsn: str, listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return make_url(pg_dsn).set(host=host, port=int(port)).render_as_string(hide_password=False)


async def _median_rtt(conn: Any) -> float:
    durations = []
    for _ in range(5):
        start = time.perf_counter()
        await conn.fetchval("SELECT 1")
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


async def test_version_and_an_empty_proxy_list(api: ToxiproxyServer) -> None:
    status, version = await http("GET", f"{api.url}/version")
    assert status == 200 and version["version"].startswith("2.")
    assert await http("GET", f"{api.url}/proxies") == (200, {})


async def test_a_latency_toxic_created_over_http_slows_postgres_and_its_removal_restores(
    api: ToxiproxyServer, upstream: str, pg_dsn: str
) -> None:
    status, proxy = await http(
        "POST", f"{api.url}/proxies", {"name": "pg", "upstream": upstream, "listen": "127.0.0.1:0"}
    )
    assert status == 201
    assert proxy["enabled"] is True and proxy["toxics"] == []
    assert not proxy["listen"].endswith(":0")  # the real port, for clients to read
    base_url = f"{api.url}/proxies/pg/toxics"
    conn = await asyncpg.connect(_dsn_through(pg_dsn, proxy["listen"]))
    try:
        base = await _median_rtt(conn)
        toxic = {"type": "latency", "attributes": {"latency": 100, "jitter": 0}}
        status, created = await http("POST", base_url, toxic)
        assert status == 200
        assert (created["name"], created["stream"]) == ("latency_downstream", "downstream")
        assert created["toxicity"] == 1.0 and created["attributes"]["latency"] == 100
        slowed = await _median_rtt(conn) - base

        status, updated = await http(
            "POST", f"{base_url}/latency_downstream", {"attributes": {"latency": 200}}
        )
        assert status == 200 and updated["attributes"] == {
            "latency": 200,
            "jitter": 0,
            "distribution": "uniform",
        }
        slower = await _median_rtt(conn) - base

        assert (await http("DELETE", f"{base_url}/latency_downstream"))[0] == 204
        restored = await _median_rtt(conn) - base
    finally:
        await conn.close()
    assert 0.09 <= slowed <= 0.18
    assert 0.19 <= slower <= 0.28
    assert restored < 0.03
    assert await http("GET", base_url) == (200, [])


async def test_disabling_over_http_refuses_connections_and_reset_restores(
    api: ToxiproxyServer, upstream: str, pg_dsn: str
) -> None:
    _, proxy = await http("POST", f"{api.url}/proxies", {"name": "pg", "upstream": upstream})
    dsn = _dsn_through(pg_dsn, proxy["listen"])
    await http("POST", f"{api.url}/proxies/pg/toxics", {"type": "timeout", "name": "hole"})
    status, disabled = await http("POST", f"{api.url}/proxies/pg", {"enabled": False})
    assert status == 200 and disabled["enabled"] is False
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(dsn)

    assert await http("POST", f"{api.url}/reset") == (204, None)
    conn = await asyncpg.connect(dsn)  # enabled again, and the black hole is gone
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    _, shown = await http("GET", f"{api.url}/proxies/pg")
    assert shown["enabled"] is True and shown["toxics"] == []


async def test_the_postgres_toxics_are_served_too(
    api: ToxiproxyServer, upstream: str, pg_dsn: str
) -> None:
    _, proxy = await http("POST", f"{api.url}/proxies", {"name": "pg", "upstream": upstream})
    toxic = {"type": "fail_first_n", "attributes": {"n": 1, "sqlstate": "40P01"}}
    status, created = await http("POST", f"{api.url}/proxies/pg/toxics", toxic)
    assert status == 200 and created["stream"] == "upstream"
    conn = await asyncpg.connect(_dsn_through(pg_dsn, proxy["listen"]))
    try:
        with pytest.raises(asyncpg.DeadlockDetectedError):
            await conn.fetchval("SELECT 1")
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_errors_are_answered_as_toxiproxy_answers_them(
    api: ToxiproxyServer, upstream: str
) -> None:
    url = api.url
    body = {"name": "pg", "upstream": upstream}
    assert (await http("POST", f"{url}/proxies", body))[0] == 201
    assert await http("POST", f"{url}/proxies", body) == (
        409,
        {"error": "proxy already exists", "status": 409},
    )
    assert (await http("POST", f"{url}/proxies", {"name": "x"}))[0] == 400  # no upstream
    assert (await http("GET", f"{url}/proxies/nope"))[0] == 404
    assert (await http("GET", f"{url}/proxies/pg/toxics/nope"))[0] == 404
    toxics = f"{url}/proxies/pg/toxics"
    assert (await http("POST", toxics, {"type": "teleport"}))[0] == 400
    status, error = await http("POST", toxics, {"type": "latency", "attributes": {"latency": -5}})
    assert status == 400 and "latency" in error["error"]
    assert (await http("POST", toxics, {"type": "latency", "attributes": {"typo": 1}}))[0] == 400
    assert (await http("POST", toxics, {"type": "latency", "name": "l"}))[0] == 200
    assert (await http("POST", toxics, {"type": "latency", "name": "l"}))[0] == 409
    assert (await http("GET", f"{url}/proxies", agent="Mozilla/5.0"))[0] == 403


async def test_populate_creates_proxies_and_existing_proxies_can_be_served(
    upstream: str,
) -> None:
    async with ChaosProxy(upstream, name="mine") as mine:
        async with ToxiproxyServer(proxies=[mine]) as api:
            status, result = await http(
                "POST", f"{api.url}/populate", [{"name": "made", "upstream": upstream}]
            )
            assert status == 201 and [p["name"] for p in result["proxies"]] == ["made"]
            _, listed = await http("GET", f"{api.url}/proxies")
            assert sorted(listed) == ["made", "mine"]
            made = api.proxies["made"]
        assert not made.running  # the server's own proxies stop with it
        assert mine.running  # the ones it was lent do not
