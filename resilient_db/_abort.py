"""Stop a driver connection's in-flight work *now*, so a timeout is a hard bound.

``asyncio.timeout`` alone is not one (DB-FAILURE-FACTS.md): after it cancels a task
blocked in asyncpg, SQLAlchemy invalidates the connection with a graceful
``close(timeout=2)``, which against a frozen server or a silent network waits the
full 2 s; with aiosqlite the worker thread keeps running the statement. So when an
attempt's time runs out, the statements it has in flight are aborted first:

* **asyncpg**: a PostgreSQL CancelRequest is sent on a separate socket (in the
  background, bounded), so a healthy server stops the statement instead of running
  it to the end; then the connection is terminated (its socket closed at once), so
  the pending query fails immediately and SQLAlchemy replaces the connection.
* **aiosqlite**: ``interrupt()`` stops the running statement at once
  (SQLITE_INTERRUPT); the connection stays usable.

Other drivers report "not aborted", and the attempt falls back to cancelling the
task.

The CancelRequest uses asyncpg's own sender (``asyncpg.connect_utils._cancel``) and
the connection's address and backend key, which asyncpg does not expose publicly;
``tests/test_engine_timeouts.py`` exercises it on every CI run, so an asyncpg
release that moves them fails loudly rather than silently degrading.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["abort_connection", "abort_driver_connection", "pending_cancel_requests"]

logger = logging.getLogger("resilient_db")

_CANCEL_REQUEST_TIMEOUT = 2.0
_pending: set[asyncio.Task[None]] = set()


def pending_cancel_requests() -> set[asyncio.Task[None]]:
    """Background CancelRequests still running (awaited by ``ResilientEngine.dispose``)."""
    return _pending


def _cancel_request_target(driver: Any) -> dict[str, Any] | None:
    """Where and how to send a CancelRequest for ``driver``'s running statement.

    Read synchronously, before ``terminate()`` drops the protocol object.
    """
    try:
        protocol = driver._protocol
        params = driver._params
        if driver._transport.get_extra_info("sslcontext") is None and params.ssl is not None:
            # The connection itself is plain (sslmode=prefer fell back, or no SSL):
            # send the CancelRequest plain too, rather than start an SSL negotiation
            # that a frozen server would leave hanging.
            params = params._replace(ssl=None)
        return {
            "addr": driver._addr,
            "params": params,
            "backend_pid": protocol.backend_pid,
            "backend_secret": protocol.backend_secret,
        }
    except AttributeError as exc:
        logger.debug("cannot send a CancelRequest with this asyncpg: %r", exc)
        return None


async def _send_cancel_request(target: dict[str, Any]) -> None:
    from asyncpg import connect_utils

    try:
        async with asyncio.timeout(_CANCEL_REQUEST_TIMEOUT):
            await connect_utils._cancel(loop=asyncio.get_running_loop(), **target)
    except (OSError, TimeoutError) as exc:
        logger.debug("CancelRequest not delivered: %r", exc)


def _driver_of(dbapi_connection: Any) -> Any:
    return getattr(dbapi_connection, "driver_connection", None)


def abort_connection(connection: Any) -> bool:
    """Abort the I/O in flight on ``connection`` — a SQLAlchemy ``Connection`` (a
    statement, a release) or the pool's connection proxy (a COMMIT); ``True`` if
    aborted. A ``Connection`` closed (back in the pool: it may be someone else's
    now) or invalidated meanwhile is left alone, as is a proxy without a DBAPI
    connection any more."""
    if hasattr(connection, "closed"):  # a SQLAlchemy Connection
        if connection.closed or connection.invalidated:
            return False
        connection = connection.connection
    driver = connection.dbapi_connection
    return driver is not None and abort_driver_connection(driver)


def abort_driver_connection(dbapi_connection: Any) -> bool:
    """Abort the in-flight work of an adapted DBAPI connection; ``True`` if done."""
    driver = _driver_of(dbapi_connection)
    if driver is None:
        return False
    module = type(driver).__module__
    if module.startswith("asyncpg"):
        if driver.is_closed():
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - timers always run in a loop
            loop = None
        target = _cancel_request_target(driver)
        if loop is not None and target is not None:
            task = loop.create_task(_send_cancel_request(target))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
        driver.terminate()
        return True
    if module.startswith("aiosqlite"):
        # sqlite3's interrupt() is safe from any thread; aiosqlite's coroutine wraps
        # it without going through the (busy) worker thread.
        coro = driver.interrupt()
        try:
            coro.send(None)
        except StopIteration:
            return True
        except Exception:  # the handle is already closed
            return False
        coro.close()  # it awaited something: not the synchronous wrapper we know
        return False
    return False
