"""What the supported drivers do when a connection is dropped, refused or busy.

The injector decides *when* to fault; this module knows *how* each driver fails,
so that an injected fault reaches SQLAlchemy through the same door as a real one:

* the driver connection is really closed (asyncpg ``terminate()``, aiosqlite
  ``close()``) before anything is raised, so that SQLAlchemy's own
  ``is_disconnect`` recognises the error, sets ``connection_invalidated`` and
  the pool replaces the connection;
* driver exceptions are turned into DBAPI exceptions by the SQLAlchemy adapter
  itself (its ``_handle_exception``, the method its cursors and ``commit()``
  use), so that they are translated exactly as a real error would be;
* PostgreSQL errors with a SQLSTATE are raised *by the server*, on the same
  connection, so that the transaction is really aborted afterwards.

Only asyncpg and aiosqlite are supported: every act here depends on what the
driver and its SQLAlchemy adapter do, and was checked against both.
"""

from __future__ import annotations

import errno
import importlib
import sqlite3
from collections.abc import Awaitable, Mapping
from typing import Any, Final, NoReturn, Protocol, TypeVar

from sqlalchemy.engine import Dialect

try:
    from sqlalchemy.util.concurrency import await_ as _await_impl
except ImportError:  # pragma: no cover - SQLAlchemy 2.0 calls it await_only
    from sqlalchemy.util.concurrency import await_only as _await_impl

__all__ = ["AiosqliteOps", "AsyncpgOps", "DriverOps", "await_", "ops_for"]

T = TypeVar("T")

INJECTED_HINT: Final = "injected by resilient-db FaultInjector"

# The messages PostgreSQL itself sends for the codes people inject most; any
# other valid SQLSTATE gets a generic message.
_PG_MESSAGES: Final[dict[str, str]] = {
    "40001": "could not serialize access due to concurrent update",
    "40P01": "deadlock detected",
    "55P03": "could not obtain lock on row in relation",
    "57014": "canceling statement due to statement timeout",
    "57P01": "terminating connection due to administrator command",
    "57P03": "the database system is starting up",
    "25006": "cannot execute UPDATE in a read-only transaction",
    "53300": "sorry, too many clients already",
    "53200": "out of memory",
    "23505": "duplicate key value violates unique constraint",
}


def await_(awaitable: Awaitable[T]) -> T:
    """Await from inside SQLAlchemy's greenlet (event hooks of an async engine)."""
    return _await_impl(awaitable)


def pg_message(sqlstate: str) -> str:
    """The message PostgreSQL sends with ``sqlstate`` (generic for unlisted codes)."""
    return _PG_MESSAGES.get(sqlstate, f"error with SQLSTATE {sqlstate}")


def _asyncpg_exceptions() -> Any:
    """asyncpg's exception module, imported only when an asyncpg engine is faulted."""
    # import_module: asyncpg ships no type information, whatever mypy is told of it.
    return importlib.import_module("asyncpg.exceptions")


def _translate(connection: Any, error: Exception) -> NoReturn:
    """Raise ``error`` as the SQLAlchemy adapter of ``connection`` would.

    ``connection`` is the pool's proxied connection; its ``dbapi_connection`` is
    the adapter (``AsyncAdapt_asyncpg_connection`` ...), whose ``_handle_exception``
    maps driver exceptions to the DBAPI classes SQLAlchemy wraps.
    """
    connection.dbapi_connection._handle_exception(error)
    raise error  # not reached: _handle_exception always raises


class DriverOps(Protocol):
    """The driver-specific acts of fault injection."""

    name: str

    def drop(self, connection: Any) -> None:
        """Close the driver connection under ``connection`` (a pool proxy), abruptly."""

    def raise_lost(self, connection: Any) -> NoReturn:
        """Raise what the driver raises when the connection drops mid-operation."""

    def raise_closed(self, connection: Any) -> NoReturn:
        """Raise what the driver raises when a closed connection is used."""

    def refused_error(self, cparams: Mapping[str, Any]) -> OSError:
        """The error of a refused TCP connection."""


class AsyncpgOps:
    """asyncpg through SQLAlchemy's ``postgresql+asyncpg`` dialect."""

    name = "asyncpg"

    def drop(self, connection: Any) -> None:
        # terminate() aborts the socket without a goodbye, like a reset; the server
        # backend sees EOF and exits.
        connection.driver_connection.terminate()

    def raise_lost(self, connection: Any) -> NoReturn:
        # What asyncpg's protocol raises when the socket closes while a reply is awaited.
        _translate(
            connection,
            _asyncpg_exceptions().ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            ),
        )

    def raise_closed(self, connection: Any) -> NoReturn:
        # What asyncpg raises, before sending anything, on a closed connection.
        _translate(connection, _asyncpg_exceptions().InterfaceError("connection is closed"))

    def raise_server_error(self, connection: Any, sqlstate: str) -> NoReturn:
        """Have the server answer with ``sqlstate`` on this connection.

        ``RAISE EXCEPTION`` in a ``DO`` block makes PostgreSQL send a real
        ErrorResponse (the transaction is aborted, as after a real one).
        """
        if sqlstate == "57P01":
            # A real admin shutdown: the backend terminates itself while the statement
            # runs, and the driver reports the connection lost with the server's message.
            sql = "SELECT pg_terminate_backend(pg_backend_pid())"
        else:
            message = pg_message(sqlstate).replace("'", "''")
            sql = (
                "DO $rdb_chaos$BEGIN RAISE EXCEPTION USING "
                f"ERRCODE = '{sqlstate}', MESSAGE = '{message}', HINT = '{INJECTED_HINT}'; "
                "END$rdb_chaos$"
            )
        cursor = connection.cursor()
        try:
            cursor.execute(sql)
        finally:
            cursor.close()
        raise RuntimeError(f"the server did not raise SQLSTATE {sqlstate}")

    def connect_error(self, sqlstate: str) -> Exception:
        """The error asyncpg raises when the server refuses a connection with ``sqlstate``."""
        # PostgresError.new picks the class registered for the SQLSTATE, as asyncpg
        # does with the server's ErrorResponse.
        error: Exception = _asyncpg_exceptions().PostgresError.new(
            {
                "C": sqlstate,
                "M": pg_message(sqlstate),
                "S": "FATAL",
                "V": "FATAL",
                "H": INJECTED_HINT,
            }
        )
        return error

    def refused_error(self, cparams: Mapping[str, Any]) -> OSError:
        host = cparams.get("host", "127.0.0.1")
        port = cparams.get("port", 5432)
        return ConnectionRefusedError(errno.ECONNREFUSED, f"Connect call failed ({host!r}, {port})")


class AiosqliteOps:
    """aiosqlite through SQLAlchemy's ``sqlite+aiosqlite`` dialect."""

    name = "aiosqlite"

    def drop(self, connection: Any) -> None:
        # Closes the sqlite3 handle and stops aiosqlite's worker thread; aiosqlite
        # then raises ValueError("no active connection") (or "Connection closed") on
        # any use, which SQLAlchemy's adapter turns into OperationalError and its
        # is_disconnect recognises.
        await_(connection.driver_connection.close())

    def raise_lost(self, connection: Any) -> NoReturn:
        # SQLite has no wire to cut: a connection lost mid-operation looks like the
        # sqlite3 handle closed under the operation. aiosqlite's own "no active
        # connection" would be wrong here: aiosqlite raises it only *before* queueing
        # work, so resilient-db rightly reads it as "nothing was sent". sqlite3's
        # closed-handle error is a disconnect for SQLAlchemy 2.0 and 2.1 alike, and
        # proves nothing about what was done.
        error = sqlite3.ProgrammingError("Cannot operate on a closed database.")
        _translate(connection, error)

    def raise_closed(self, connection: Any) -> NoReturn:
        _translate(connection, ValueError("no active connection"))

    def busy_error(self) -> Exception:
        """SQLITE_BUSY as sqlite3 raises it: ``OperationalError`` with the result code."""
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorcode = 5
        error.sqlite_errorname = "SQLITE_BUSY"
        return error

    def refused_error(self, cparams: Mapping[str, Any]) -> OSError:
        return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def ops_for(dialect: Dialect) -> DriverOps:
    """The driver operations for an engine's dialect, or ``ValueError``."""
    if dialect.name == "postgresql" and dialect.driver == "asyncpg":
        return AsyncpgOps()
    if dialect.name == "sqlite" and dialect.driver == "aiosqlite":
        return AiosqliteOps()
    raise ValueError(
        "engine must use postgresql+asyncpg or sqlite+aiosqlite; "
        f"got {dialect.name}+{dialect.driver}"
    )
