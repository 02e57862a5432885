"""One request ID from the HTTP request to the spans, the log lines and PostgreSQL itself."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
from conftest import Witness
from otel_support import Telemetry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from resilient_db import (
    CorrelationIdFilter,
    CorrelationIdMiddleware,
    ResilientEngine,
    current_correlation_id,
)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def app_log() -> Iterator[tuple[logging.Logger, Records]]:
    logger = logging.getLogger("tests.app")
    handler = Records()
    handler.addFilter(CorrelationIdFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def reply(body: str) -> Any:
    async def send_reply(send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    return send_reply


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(app: Any) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.mark.postgres
async def test_a_request_id_reaches_spans_logs_and_application_name_for_the_transaction_only(
    pg_engine: AsyncEngine,
    witness: Witness,
    app_log: tuple[logging.Logger, Records],
    client_for: Any,
) -> None:
    logger, handler = app_log
    db = ResilientEngine(pg_engine, timeout=5, breaker=False, correlation_in_application_name=True)
    during: list[str] = []

    async def application_names() -> list[str]:
        return [s["application_name"] for s in await witness.other_sessions()]

    async def place_order(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        # Seen from a second connection while our transaction is open.
        during.extend(await application_names())
        logger.info("placing the order")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.run_transaction(place_order)
        await reply("ok")(send)

    with Telemetry().installed() as telemetry:
        response = await client_for(CorrelationIdMiddleware(app)).get(
            "/orders", headers={"X-Request-ID": "req-7f3a"}
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-7f3a"
    assert during == ["req-7f3a"]
    after = await application_names()
    assert len(after) == 1 and after != ["req-7f3a"]  # pooled, idle, and the ID is gone
    ids = {(s.attributes or {}).get("resilient_db.correlation_id") for s in telemetry.spans()}
    assert ids == {"req-7f3a"}
    assert len(telemetry.spans()) == 2
    (record,) = handler.records
    assert record.correlation_id == "req-7f3a"  # type: ignore[attr-defined]


@pytest.mark.postgres
async def test_application_name_is_cut_to_63_bytes_with_the_prefix_kept(
    pg_engine: AsyncEngine, witness: Witness, client_for: Any
) -> None:
    db = ResilientEngine(
        pg_engine,
        timeout=5,
        breaker=False,
        correlation_in_application_name=True,
        application_name_prefix="orders-api ",
    )
    during: list[str] = []

    async def unit(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        during.extend(s["application_name"] for s in await witness.other_sessions())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.run_transaction(unit)
        await reply("ok")(send)

    request_id = "r" + "0123456789" * 10  # 101 characters
    await client_for(CorrelationIdMiddleware(app)).get("/", headers={"X-Request-ID": request_id})
    assert during == [("orders-api " + request_id)[:63]]


async def app_echoing_the_id(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        return
    await reply(current_correlation_id())(send)


async def test_the_trace_id_of_traceparent_is_used_when_there_is_no_request_id(
    client_for: Any,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client_for(CorrelationIdMiddleware(app_echoing_the_id)).get(
        "/", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert response.text == trace_id
    assert response.headers["x-request-id"] == trace_id


@pytest.mark.parametrize(
    "bad", ["has space", "quote'd", "x" * 129, "new\nline"], ids=["space", "quote", "long", "nl"]
)
async def test_a_request_id_that_does_not_look_like_one_is_replaced(
    client_for: Any, bad: str
) -> None:
    client = client_for(CorrelationIdMiddleware(app_echoing_the_id))
    response = await client.get("/", headers={"X-Request-ID": bad.replace("\n", "%0A")})
    assert response.text != bad
    assert len(response.text) == 32 and int(response.text, 16) >= 0
    assert response.headers["x-request-id"] == response.text


async def test_untrusted_mode_ignores_the_client_ids(client_for: Any) -> None:
    app = CorrelationIdMiddleware(app_echoing_the_id, trust_incoming=False)
    response = await client_for(app).get("/", headers={"X-Request-ID": "chosen-by-client"})
    assert response.text != "chosen-by-client"
    assert len(response.text) == 32


async def test_each_request_gets_its_own_generated_id(client_for: Any) -> None:
    client = client_for(CorrelationIdMiddleware(app_echoing_the_id, header="X-Correlation-ID"))
    first, second = (await client.get("/")).text, (await client.get("/")).text
    assert first != second
    assert (await client.get("/", headers={"X-Correlation-ID": "abc"})).text == "abc"


async def test_non_http_scopes_pass_through_untouched() -> None:
    app = CorrelationIdMiddleware(app_echoing_the_id)
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"header": "bad header"}, ValueError),
        ({"header": ""}, ValueError),
        ({"trust_incoming": 1}, TypeError),
        ({"echo": "yes"}, TypeError),
    ],
)
def test_middleware_settings_are_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        CorrelationIdMiddleware(app_echoing_the_id, **kwargs)
