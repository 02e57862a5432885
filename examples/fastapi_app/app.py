"""A small FastAPI service on resilient-db: repository methods, the engine wrapper,
correlation IDs, OpenTelemetry, and a health endpoint showing the breaker.

    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
        python examples/fastapi_app/app.py

Run as a script, it serves a few requests in-process (no HTTP server needed) and
prints what happened; spans go to the console exporter. Under a real server:
``uvicorn app:create_app --factory`` from this folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from resilient_db import (
    CircuitOpenError,
    CommitOutcomeUnknown,
    CorrelationIdFilter,
    CorrelationIdMiddleware,
    ResilientEngine,
    current_correlation_id,
    resilient,
)

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class OrderIn(BaseModel):
    amount: int
    idempotency_key: str | None = None


class OrderRepo:
    """Each method is one unit of work, retried as a whole by the engine wrapper."""

    def __init__(self, db: ResilientEngine) -> None:
        self.db = db

    async def place(self, key: str, amount: int) -> str:
        async def unit(session: AsyncSession) -> str:
            # The idempotency key makes the unit safe to run twice (idempotent=True).
            inserted = await session.execute(
                text(
                    "INSERT INTO orders (id, amount) VALUES (:id, :amount) "
                    "ON CONFLICT (id) DO NOTHING RETURNING id"
                ),
                {"id": key, "amount": amount},
            )
            return "created" if inserted.first() is not None else "already placed"

        return await self.db.run_transaction(unit)

    @resilient(timeout=1, retries=2, breaker="orders-db")
    async def get(self, order_id: str) -> dict[str, Any] | None:
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT id, amount FROM orders WHERE id = :id"), {"id": order_id}
                )
            ).first()
        return None if row is None else {"id": row.id, "amount": row.amount}


def create_app(database_url: str | None = None) -> FastAPI:
    url = database_url or os.environ.get("DATABASE_URL", DEFAULT_URL)
    engine = create_async_engine(url, pool_pre_ping=True)
    db = ResilientEngine(
        engine,
        timeout=2,
        retries=3,
        breaker="orders-db",
        idempotent=True,
        verify_commits=True,
        correlation_in_application_name=True,
    )
    repo = OrderRepo(db)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db.begin() as conn:
            await conn.execute(
                text("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, amount INT)")
            )
        yield
        await db.dispose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(CorrelationIdMiddleware)
    logger = logging.getLogger("orders")

    @app.post("/orders")
    async def place_order(order: OrderIn) -> dict[str, str]:
        key = order.idempotency_key or uuid.uuid4().hex
        try:
            status = await repo.place(key, order.amount)
        except CommitOutcomeUnknown as exc:
            # Only when verification itself was impossible: tell the client to retry
            # with the same idempotency key, which is safe.
            raise HTTPException(503, f"outcome unknown, retry with the same key: {exc}") from exc
        logger.info("order %s %s", key, status)
        return {"id": key, "status": status, "correlation_id": current_correlation_id()}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: str) -> dict[str, Any]:
        try:
            order = await repo.get(order_id)
        except CircuitOpenError as exc:
            raise HTTPException(
                503, f"database unavailable, retry after {exc.retry_after}"
            ) from exc
        if order is None:
            raise HTTPException(404, "no such order")
        return order

    @app.get("/health")
    async def health() -> dict[str, Any]:
        breaker = db.policy.breaker
        snapshot = breaker.snapshot() if breaker is not None else None  # type: ignore[attr-defined]
        pool = db.engine.pool
        return {
            "breaker": None
            if snapshot is None
            else {
                "name": snapshot.name,
                "state": snapshot.state.value,
                "retry_after": snapshot.retry_after,
            },
            "pool": {"checked_out": pool.checkedout(), "size": pool.size()},  # type: ignore[attr-defined]
        }

    return app


async def demo() -> None:
    """Serve a few requests in-process and print what happened."""
    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(formatter=lambda s: f"  span: {s.name}\n"))
    )
    trace.set_tracer_provider(provider)
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(logging.Formatter("  log [%(correlation_id)s] %(message)s"))
    logging.getLogger("orders").addHandler(handler)
    logging.getLogger("orders").setLevel(logging.INFO)

    app = create_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
            key = f"demo-{uuid.uuid4().hex[:8]}"
            for attempt in (1, 2):
                response = await client.post(
                    "/orders",
                    json={"amount": 42, "idempotency_key": key},
                    headers={"X-Request-ID": f"req-{attempt}"},
                )
                body = response.json()
                print(
                    f"POST /orders #{attempt}: {response.status_code} {body['status']} "
                    f"(X-Request-ID echoed: {response.headers['x-request-id']})"
                )
            got = await client.get(f"/orders/{key}")
            print(f"GET /orders/{key}: {got.status_code} amount={got.json()['amount']}")
            health = (await client.get("/health")).json()
            print(f"GET /health: breaker {health['breaker']['state']}, pool {health['pool']}")
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(demo())
