"""``ResilientEngine``: wrap an existing ``AsyncEngine`` so every statement is guarded.

What it adds on top of the policies (see ``docs/transactions.md``):

* **Retry at the right granularity.** Inside a unit of work (``run_transaction``, or
  a ``@resilient`` function) statements are never retried alone: the unit retries,
  with a fresh session per attempt. Outside a unit, a statement that opens a new
  transaction may be retried on its own if it is read-only (a ``SELECT`` without
  ``FOR UPDATE``) or marked ``execution_options(idempotent=True)``; anything else
  runs once, under the timeout and the breaker.
* **Ambiguous commits.** With ``verify_commits=True`` on PostgreSQL, the transaction
  id is read just before COMMIT (``pg_current_xact_id_if_assigned()``: ``NULL`` for a
  read-only transaction, which is then safe to retry) and, when the COMMIT fails
  without an answer, ``pg_xact_status(xid)`` is asked on a fresh connection:
  committed → success, aborted → safe to retry, anything else →
  ``CommitOutcomeUnknown``.
* **Deadlines reach the server.** An explicit transaction on PostgreSQL gets
  ``set_config('statement_timeout', ..., true)`` (the ``SET LOCAL`` form, which
  never leaks to the next checkout) from the remaining time minus a margin — only
  when that is shorter than the server's own setting, to save the round trip.
* **Correlation IDs reach the server** (opt-in): ``correlation_in_application_name``
  adds ``set_config('application_name', <id>, true)`` to that same statement, so the
  ID shows in ``pg_stat_activity`` and the server's logs for the transaction only;
  ``sql_comment`` appends a sqlcommenter comment to every statement instead (costly
  with asyncpg: see ``docs/observability.md``).
* **Cancellation safety, failover, pools, event loops, streaming**: see the class.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import quote

from opentelemetry import trace
from sqlalchemy import Connection, Select, TextClause, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncResult,
    AsyncSession,
    AsyncSessionTransaction,
    AsyncTransaction,
    async_sessionmaker,
)
from sqlalchemy.ext.asyncio.base import asyncstartablecontext
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.functions import FunctionElement

from . import _instrument
from . import _validate as v
from ._abort import _driver_of, abort_driver_connection, pending_cancel_requests
from ._classify import _EXIT_EXCEPTIONS, Classifier, resolve
from ._correlation import current_correlation_id
from ._errors import BulkheadFull, CommitOutcomeUnknown, ConcurrentSessionUse, TimeoutExceeded
from ._instrument import _STATE, DatabaseTarget, PoolCheckout, _Operation
from ._policy import DEFAULT, Policy, _Default
from ._scope import (
    CallScope,
    CommitRecord,
    CommitStatus,
    _get_scope,
    _reset_scope,
    _set_scope,
)
from ._sqla import XID_READER, _current_task, track_dialect
from .policies.breaker import BreakerProtocol, get_breaker
from .policies.budget import RetryBudget
from .policies.bulkhead import Bulkhead
from .policies.retry import Backoff
from .policies.timeout import _TIMER_SLOTS, ConnectionTimer

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "GuardedConnection",
    "is_read_only",
    "GuardedSession",
    "ResilientEngine",
    "ResilientSessionmaker",
    "resilient_engine",
]

logger = logging.getLogger("resilient_db")

T = TypeVar("T")


_READ_ONLY_SQL = re.compile(r"^\s*(select|with|show|values|table|explain)\b", re.IGNORECASE)
_WRITES_SQL = re.compile(
    r"\b(insert|update|delete|merge|nextval|setval|pg_(?:try_)?advisory\w*|lock|for\s+update|"
    r"for\s+share|for\s+no\s+key\s+update|for\s+key\s+share|into)\b",
    re.IGNORECASE,
)


def is_read_only(statement: Any, execution_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a statement may be retried on its own (read-only, or declared idempotent).

    A ``SELECT`` is read-only unless it locks (``FOR UPDATE``/``FOR SHARE``,
    anywhere in it) or writes: through a data-modifying CTE (``insert(...).cte()``),
    or by calling ``nextval``, ``setval`` or an advisory-lock function. A textual
    statement is judged by its words. Functions of your own that write cannot be
    seen: declare such statements ``idempotent`` or not, as they are."""
    return (
        _may_retry_alone(statement, execution_options)
        and _writes_where_unseen(statement, execution_options) is None
    )


def _may_retry_alone(statement: Any, execution_options: Mapping[str, Any] | None) -> bool:
    """:func:`is_read_only` at the price of every statement: a ``SELECT`` by its
    shape only (the rest, a walk through the whole statement, is
    :func:`_writes_where_unseen`, judged only when a retry is about to happen)."""
    # What the statement is first (reads are the common case), its options second.
    # Exact types before isinstance: a TextClause is no Select, but asking costs a
    # walk up its long MRO.
    kind = type(statement)
    if kind is Select or (kind is not TextClause and isinstance(statement, Select)):
        if statement._for_update_arg is None:
            return True
    else:
        sql = (
            statement.text if kind is TextClause or isinstance(statement, TextClause) else statement
        )
        if isinstance(sql, str):
            verdict = _READ_ONLY_TEXTS.get(sql)
            if verdict is None:
                verdict = _judge_text(sql)
            if verdict:
                return True
    return _declared_idempotent(statement, execution_options)


def _writes_where_unseen(statement: Any, execution_options: Mapping[str, Any] | None) -> str | None:
    """Why a ``SELECT`` whose shape reads only may still write or lock — found by
    walking the whole statement — unless declared idempotent; ``None`` if not."""
    if not isinstance(statement, Select) or _declared_idempotent(statement, execution_options):
        return None
    for element in visitors.iterate(statement):
        if isinstance(element, UpdateBase):
            return "the SELECT writes through a data-modifying CTE"
        if isinstance(element, Select) and element._for_update_arg is not None:
            return "the SELECT locks rows (FOR UPDATE/FOR SHARE in a subquery)"
        if isinstance(element, FunctionElement):
            name = getattr(element, "name", "")
            if isinstance(name, str) and _WRITING_FUNCTIONS.fullmatch(name):
                return f"the SELECT calls {name}()"
        elif isinstance(element, TextClause | ColumnClause) and (
            isinstance(element, TextClause) or element.is_literal
        ):
            sql = element.text if isinstance(element, TextClause) else element.name
            if _WRITES_SQL.search(sql):
                return f"the SELECT holds SQL text that writes or locks: {sql!r}"
    return None


_WRITING_FUNCTIONS = re.compile(r"nextval|setval|next_value|pg_(?:try_)?advisory\w*", re.IGNORECASE)
"""Functions whose call writes or locks (``next_value``: ``Sequence.next_value()``)."""


def _declared_idempotent(statement: Any, execution_options: Mapping[str, Any] | None) -> bool:
    if execution_options and execution_options.get("idempotent") is True:
        return True
    options = getattr(statement, "_execution_options", None)
    return options is not None and options.get("idempotent") is True


def _judge_text(sql: str) -> bool:
    verdict = bool(_READ_ONLY_SQL.match(sql)) and not _WRITES_SQL.search(sql)
    if len(_READ_ONLY_TEXTS) >= _READ_ONLY_TEXTS_MAX:
        _READ_ONLY_TEXTS.clear()
    _READ_ONLY_TEXTS[sql] = verdict
    return verdict


_READ_ONLY_TEXTS: dict[str, bool] = {}
"""SQL texts already judged by :func:`is_read_only` (applications send the same few
texts over and over; the two regular expressions cost more than the lookup)."""
_READ_ONLY_TEXTS_MAX: Final = 1024


def _engine_name(url: URL) -> str:
    host = url.host or ""
    port = f":{url.port}" if url.port else ""
    return f"{url.get_backend_name()}://{host}{port}/{url.database or ''}"


class _LoopState:
    """The engine a given event loop uses, and the hook that disposes it at loop shutdown."""

    __slots__ = ("engine", "guard", "loop", "primary")

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine, primary: bool):
        self.loop = loop
        self.engine = engine
        self.primary = primary
        self.guard: Any = None


class ResilientEngine:
    """Wrap an existing ``AsyncEngine``: timeouts, retries, breaker, commit safety.

    The engine is not taken over: it keeps working on its own, and
    :attr:`engine` gives it back.

    Args:
        engine: the ``AsyncEngine`` to wrap (asyncpg or aiosqlite; SQLAlchemy 2.0/2.1).
        policy: a prebuilt :class:`Policy`; or give the policy arguments below, as
            for :class:`Policy`.
        timeout: bounds one attempt of a unit of work, or one statement outside units.
        deadline: bounds a whole unit of work, retries included.
        retries: additional attempts of a unit of work.
        backoff: the wait between attempts.
        breaker: as for :class:`Policy`; the default is the shared breaker named
            after the database (``postgresql://host:port/db``).
        bulkhead: at most N attempts at once.
        classifier: decides what is retryable and what the breaker counts.
        retry_budget: bounds retries to a share of first attempts.
        idempotent: units of work are safe to run twice (an idempotency key), so an
            attempt that sent a COMMIT may be retried.
        verify_commits: on PostgreSQL, resolve ambiguous COMMITs with
            ``pg_xact_status`` (one extra round trip per write transaction).
        server_timeouts: send the remaining time to PostgreSQL as a transaction-local
            ``statement_timeout`` for explicit transactions.
        server_timeout_margin: how much earlier than the client the server should
            give up, so that its clean 57014 error wins the race (seconds).
        lock_timeout: a transaction-local ``lock_timeout`` for explicit transactions.
        pool_bulkhead: fail fast with :class:`BulkheadFull` instead of waiting for a
            connection when all ``pool_size + max_overflow`` connections are in use.
        verify_timeout: how long to keep asking ``pg_xact_status`` while the
            transaction is still ``in progress``.
        correlation_in_application_name: on PostgreSQL, set ``application_name`` to
            the correlation ID for each explicit transaction, with
            ``set_config('application_name', ..., true)`` (transaction-local: gone
            after COMMIT or ROLLBACK; never session-level). Sent in the same
            statement as the server-side timeouts; visible in ``pg_stat_activity``
            and in server logs (``%a`` in ``log_line_prefix``).
        application_name_prefix: put before the ID (e.g. ``"orders-api "``); the
            result is cut to PostgreSQL's 63 bytes, the ID's end going first.
        sql_comment: append a sqlcommenter comment (``correlation_id``,
            ``traceparent``) to every statement of the wrapped engine. Off by
            default: asyncpg then prepares every statement anew (its statement
            cache is keyed by the SQL text), which roughly doubles the latency of
            short queries — see ``docs/observability.md``.

    Example::

        engine = create_async_engine("postgresql+asyncpg://...", pool_pre_ping=True)
        db = ResilientEngine(engine, timeout=2, retries=3, verify_commits=True)

        async with db.connect() as conn:
            rows = (await conn.execute(select(users))).all()

        Session = db.sessionmaker(expire_on_commit=False)
        result = await db.run_transaction(transfer, src, dst, amount)
    """

    _session_class: type[GuardedSession]

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        policy: Policy | None = None,
        timeout: v.Seconds | None = None,
        deadline: v.Seconds | None = None,
        retries: int = 3,
        backoff: Backoff | Mapping[str, Any] | None = None,
        breaker: BreakerProtocol | str | Literal[False] | _Default = DEFAULT,
        bulkhead: Bulkhead | int | None = None,
        classifier: Classifier | None = None,
        retry_budget: RetryBudget | _Default | None = DEFAULT,
        idempotent: bool = False,
        verify_commits: bool = False,
        server_timeouts: bool = True,
        server_timeout_margin: v.Seconds = 0.05,
        lock_timeout: v.Seconds | None = None,
        pool_bulkhead: bool = False,
        verify_timeout: v.Seconds = 5.0,
        name: str | None = None,
        correlation_in_application_name: bool = False,
        application_name_prefix: str = "",
        sql_comment: bool = False,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(f"engine must be a sqlalchemy AsyncEngine; got {engine!r}")
        self._engine = engine
        if policy is not None:
            if not isinstance(policy, Policy):
                raise TypeError(f"policy must be a Policy; got {policy!r}")
            self._unit = policy
        else:
            if isinstance(breaker, _Default):
                breaker = get_breaker(_engine_name(engine.url))
            self._unit = Policy(
                timeout=timeout,
                deadline=deadline,
                retries=retries,
                backoff=backoff,
                breaker=breaker,
                bulkhead=bulkhead,
                classifier=classifier,
                retry_budget=retry_budget,
                idempotent=idempotent,
                name=name,
            )
        self._read = self._unit._derive(idempotent=True)
        # Checkouts: retried, bounded, their failures counted. A warm pool answers from
        # memory: its successes say nothing about the database (counted, they would
        # reset the consecutive failures of the statements between) and are not
        # traffic the retry budget should grow with.
        self._checkout = self._unit._derive(idempotent=True, traffic=False)
        self._once = self._unit._derive(retries=0)
        # Cleanup (ROLLBACK, the reset on release) is bounded too, but never refused:
        # no breaker, no bulkhead, no deadline that may already be spent.
        unit_timeouts = self._unit._timeouts
        cleanup_limit = unit_timeouts.timeout or unit_timeouts.deadline
        self._cleanup_limit = cleanup_limit
        self._cleanup = (
            None
            if cleanup_limit is None
            else Policy(
                timeout=cleanup_limit,
                retries=0,
                breaker=False,
                retry_budget=None,
                clock=self._unit.clock,
            )
        )
        self.verify_commits = v.boolean("verify_commits", verify_commits)
        self.server_timeouts = v.boolean("server_timeouts", server_timeouts)
        self.server_timeout_margin = v.required_seconds(
            "server_timeout_margin", server_timeout_margin, allow_zero=True
        )
        self.lock_timeout = v.seconds("lock_timeout", lock_timeout, allow_none=True)
        self.pool_bulkhead = v.boolean("pool_bulkhead", pool_bulkhead)
        self.verify_timeout = v.required_seconds("verify_timeout", verify_timeout)
        self.correlation_in_application_name = v.boolean(
            "correlation_in_application_name", correlation_in_application_name
        )
        self.application_name_prefix = _check_prefix(application_name_prefix)
        self.sql_comment = v.boolean("sql_comment", sql_comment)
        self._is_pg = engine.dialect.name == "postgresql"
        # Whether explicit transactions send the transaction-local set_config statement.
        self._per_transaction = self._is_pg and (
            self.server_timeouts or self.correlation_in_application_name
        )
        self._target = DatabaseTarget.from_url(engine.url, engine.dialect.name)
        self._pool_checkout = PoolCheckout(_engine_name(engine.url))
        # COMMITs and statements tracked from the first one (the per-loop copies
        # share this dialect).
        track_dialect(engine.sync_engine.dialect)
        if self.sql_comment and not event.contains(
            engine.sync_engine, "before_cursor_execute", _add_sql_comment
        ):
            event.listen(engine.sync_engine, "before_cursor_execute", _add_sql_comment, retval=True)
        self._server_statement_timeout_ms: int | None = None
        self._loops: dict[int, _LoopState] = {}
        self._last: _LoopState | None = None
        self._session_class = type("GuardedSession", (GuardedSession,), {"_db": self})
        self._default_maker: ResilientSessionmaker | None = None
        _instrument.track_engine(self)

    # -- what it wraps -------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The wrapped engine, as given."""
        return self._engine

    @property
    def policy(self) -> Policy:
        """The policy units of work run under."""
        return self._unit

    def engine_for_loop(self) -> AsyncEngine:
        """The engine (and pool) used by the running event loop.

        The first loop to use this wrapper gets the wrapped engine itself; another
        loop running at the same time gets a copy with its own pool (same dialect,
        URL, pool settings and event listeners). Each loop's pool is disposed from
        inside that loop when it shuts down (``asyncio.run``, ``asyncio.Runner`` and
        pytest-asyncio all call ``shutdown_asyncgens``), so no connection outlives
        its loop.
        """
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last.loop is loop:
            return last.engine
        state = self._loops.get(id(loop))
        if state is None or state.loop is not loop:
            state = self._attach(loop)
        self._last = state
        return state.engine

    def _attach(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        primary_taken = any(s.primary for s in self._loops.values())
        if primary_taken:
            sync = copy.copy(self._engine.sync_engine)
            sync.pool = self._engine.sync_engine.pool.recreate()
            state = _LoopState(loop, AsyncEngine(sync), primary=False)
        else:
            state = _LoopState(loop, self._engine, primary=True)
        self._loops[id(loop)] = state
        guard = self._loop_guard(state)
        state.guard = guard
        # Start the generator so that the loop's asyncgen hooks register it; the loop
        # finalizes it in shutdown_asyncgens(), which runs our cleanup in that loop.
        step: Any = guard.__anext__()
        with suppress(StopIteration):
            step.send(None)
        return state

    async def _loop_guard(self, state: _LoopState) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self._loops.get(id(state.loop)) is state:
                del self._loops[id(state.loop)]
            if self._last is state:
                self._last = None
            await _drain_cancel_requests()
            await state.engine.dispose()

    # -- connections -----------------------------------------------------------------------

    def connect(self) -> GuardedConnection:
        """A guarded connection: ``async with db.connect() as conn: ...``.

        Checking out is guarded too (timeout, breaker counts connect failures,
        retried: connecting is idempotent).
        """
        last = self._last  # engine_for_loop()'s first look, written out
        if last is not None and last.loop is asyncio.get_running_loop():
            return GuardedConnection(last.engine, None, self)
        return GuardedConnection(self.engine_for_loop(), None, self)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[GuardedConnection]:
        """A guarded connection in a transaction, committed on exit.

        The transaction gets the server-side deadline. If COMMIT fails without an
        answer, the outcome is verified (``verify_commits=True``) or
        :class:`CommitOutcomeUnknown` is raised. Not retried: the block cannot be run
        again — use :meth:`run_transaction` for that.
        """
        conn = self.connect()
        async with conn:
            await AsyncConnection.begin(conn)
            _transaction_begun(conn)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction():
                    await self._rollback_after_failure(AsyncConnection.rollback, conn)
                raise
            await conn.commit()

    def sessionmaker(self, **kw: Any) -> ResilientSessionmaker:
        """An ``async_sessionmaker`` whose sessions are guarded and bound per event loop."""
        if "bind" in kw:
            raise TypeError("sessionmaker() binds the wrapped engine itself; do not pass bind")
        return ResilientSessionmaker(self, **kw)

    def session(self, **kw: Any) -> GuardedSession:
        """A guarded session (``async with db.session() as s: ...``)."""
        if kw:
            return self.sessionmaker(**kw)()
        if self._default_maker is None:
            self._default_maker = self.sessionmaker()
        return self._default_maker()

    async def run_transaction(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> T:
        """Run ``fn(session, *args, **kwargs)`` as one unit of work, retried as a whole.

        Each attempt gets a fresh session in a fresh transaction (with the server-side
        deadline), and commits after ``fn`` returns. A retryable failure retries the
        whole unit; a COMMIT that may have taken effect is verified
        (``verify_commits=True``) or reported as :class:`CommitOutcomeUnknown`,
        never blindly retried — unless the engine was built with ``idempotent=True``.
        """
        return await self._unit._invoke(  # type: ignore[no-any-return]
            self._transaction_attempt, (fn, args, kwargs), {}, fn, self._target
        )

    async def _transaction_attempt(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        self._check_pool_capacity()
        session = self.session()
        try:
            # Leaving the block closes the session, which rolls back whatever is left.
            async with session:
                await session.begin()
                result = await fn(session, *args, **kwargs)
                await session.commit()
                return result
        except BaseException as exc:
            translated = self._translate(exc, session)
            if translated is not exc:
                raise translated from exc
            raise

    @asynccontextmanager
    async def stream(
        self,
        statement: Any,
        parameters: Mapping[str, Any] | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[AsyncResult[Any]]:
        """Stream a large result through the policy, without loading it into memory.

        Opening the stream is retried like any read-only statement. A deadline covers
        the whole stream — the engine's, counted from this call (opening included),
        or that of the enclosing unit or ``deadline()`` block; without one, the
        timeout bounds the iteration after opening. When it runs out, the
        connection is aborted and iteration raises the timeout error. Leaving the block early or
        being cancelled mid-stream invalidates the connection like any cancellation.
        """
        clock = self._unit.clock
        started = clock()
        async with self.connect() as conn:
            result = await conn.stream(statement, parameters, execution_options=execution_options)
            limit = self._current_limit()
            scope = _get_scope()
            by_deadline = scope is not None and scope.deadline_at is not None
            deadline = self._unit._timeouts.deadline
            if scope is None and deadline is not None:
                # Outside any unit or deadline block: the engine's own deadline, from
                # the moment the stream was asked for (opening and retries included).
                left = max(0.0, deadline - (clock() - started))
                if limit is None or left <= limit:
                    limit, by_deadline = left, True
            loop = asyncio.get_running_loop()
            expired = False
            watch = None
            raw = await AsyncConnection.get_raw_connection(conn)

            def expire() -> None:
                nonlocal expired
                expired = True
                abort_driver_connection(raw.dbapi_connection)

            if limit is not None:
                watch = loop.call_later(limit, expire)
            try:
                yield result
            except BaseException as exc:
                if expired and not _is_exit(exc):
                    raise self._once._timeouts.expired(limit or 0.0, by_deadline, 1) from exc
                if _is_exit(exc):
                    # Abandoned mid-stream: the cursor is open and the server may still
                    # be sending; do not try to drain it, drop the connection.
                    abort_driver_connection(raw.dbapi_connection)
                    await AsyncConnection.invalidate(conn)
                raise
            finally:
                if watch is not None:
                    watch.cancel()
                if not raw.is_valid or expired:
                    await AsyncConnection.invalidate(conn)
                else:
                    await result.close()

    async def dispose(self) -> None:
        """Close the pooled connections of the running loop's engine.

        Other loops' pools are disposed by their own loops at shutdown.
        """
        await _drain_cancel_requests()
        await self.engine_for_loop().dispose()

    # -- guards ---------------------------------------------------------------------------

    async def _release(self, close: Callable[[Any], Awaitable[None]], owner: Any) -> None:
        """Close a session: its ROLLBACK bounded as cleanup (see
        :meth:`_release_connection`)."""
        try:
            await self._cleanup_call(close, owner)
        except TimeoutExceeded as exc:
            _release_timed_out(owner, exc)
            with suppress(Exception):
                # Finish the close on the invalidated connection: nothing left to send.
                await self._cleanup_call(close, owner)

    async def _rollback_after_failure(
        self, rollback: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        """The ROLLBACK of a block that failed, bounded as cleanup. Past the bound the
        connection is discarded (logged), and the block's own error is the one that
        propagates: it says what went wrong, the lost connection only follows."""
        try:
            await self._cleanup_call(rollback, *args)
        except TimeoutExceeded as exc:
            logger.warning(
                "rolling back a failed transaction timed out (%s): its connection was discarded",
                exc,
                extra={"resilient_db_event": "rollback_timed_out"},
            )

    async def _release_connection(self, conn: GuardedConnection) -> None:
        """Close a connection, its ROLLBACK (and the pool's reset) bounded by the
        engine's timeout. Past the bound the connection is aborted at the driver and
        discarded, not returned to the pool, and the release still succeeds: the
        block's work is done, or rolled back with the connection.

        Lighter than :meth:`_cleanup_call` (it runs at every release): the
        connection is known, so the connection itself is the timer
        (:class:`ConnectionTimer`), with no call scope for the dialect's ROLLBACK
        to register in and no timer object to allocate."""
        limit = self._cleanup_limit
        scope = _get_scope()
        if (
            limit is None
            or conn.sync_connection is None
            or (scope is not None and _unit_timer_armed(scope))
        ):
            await _CONNECTION_CLOSE(conn)  # unbounded, or bounded by the unit's timer
            return
        conn._arm_timer(limit)
        try:
            await _CONNECTION_CLOSE(conn)
        except BaseException as exc:
            if not conn._settle_timer(exc):
                raise
            _release_timed_out(conn, self._unit._timeouts.expired(limit, False, 1))
            with suppress(Exception):
                await _CONNECTION_CLOSE(conn)  # on the invalidated connection: no I/O
        else:
            conn._settle_timer(None)

    async def _cleanup_call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(*args)`` — a rollback, a release — within the engine's timeout: on a
        frozen server the ROLLBACK in flight is aborted at the driver (SQLAlchemy then
        invalidates the connection) instead of hanging until TCP gives up. Inside a
        unit of work, the unit's timer bounds it."""
        policy = self._cleanup
        scope = _get_scope()
        if policy is None or (scope is not None and _unit_timer_armed(scope)):
            return await fn(*args)
        own = CallScope(policy.clock, None, True)
        token = _set_scope(own)
        try:
            return await policy._attempt(  # type: ignore[no-any-return]
                own, None, None, fn, args, _NO_KWARGS
            )
        finally:
            _reset_scope(token)
            own.end()

    async def _guard(
        self,
        owner: GuardedConnection | GuardedSession,
        statement: Any,
        read_only: bool | None,
        options: Mapping[str, Any] | None,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timed: GuardedConnection | None = None,
    ) -> T:
        """Run a statement (or a session's operation) of ``owner`` under the policy.
        ``timed``: the connection it runs on, when the caller knows it (a
        connection's own statements): a statement that opens its transaction is
        then timed by its connection (see :meth:`Policy._invoke`)."""
        if owner._busy:
            # No guarded operation calls another on the same owner (SQLAlchemy's
            # `scalars` and `stream_scalars` call `execute` and `stream` after
            # nothing of ours): busy means a second task is in. A flag, not the task:
            # `asyncio.current_task()` is a Python function before 3.12, and this
            # runs for every statement.
            raise _concurrent_use(owner)
        owner._busy = True
        try:
            label = fn
            if (
                owner._server_timeouts_pending is not None
                and not _sets_transaction(statement)
                and _take_pending(owner)
            ):
                # The transaction's first statement: the server-side deadline goes
                # first, under the statement's guard (a frozen server, or a pool with
                # no idle connection for a session, holds it like the statement).
                fn = functools.partial(_after_server_timeouts, self, owner, fn)
            scope = _get_scope()
            if scope is not None and scope.in_call:
                # Inside a unit of work: the unit's attempt timer bounds the statement
                # and the unit retries as a whole.
                return await fn(*args, **kwargs)
            if owner._in_transaction():
                return await self._once._invoke(  # type: ignore[no-any-return]
                    fn, args, kwargs, label, self._target, statement
                )
            # The statement opens a transaction of its own.
            if owner._statement_timeout_sent:
                owner._statement_timeout_sent = False
            if self.pool_bulkhead and owner._is_session:
                self._check_pool_capacity()  # this statement will check a connection out
            if read_only is None:
                read_only = _may_retry_alone(statement, options)
            if read_only:
                # Only a statement that opens its transaction may be retried alone.
                return await self._read._invoke(  # type: ignore[no-any-return]
                    fn, args, kwargs, label, self._target, statement, _retry_alone, timed
                )
            return await self._once._invoke(  # type: ignore[no-any-return]
                fn, args, kwargs, label, self._target, statement, None, timed
            )
        except BaseException as exc:
            translated = self._translate(exc, owner)
            if translated is not exc:
                raise translated from exc
            raise
        finally:
            owner._busy = False

    def _translate(
        self, exc: BaseException, owner: GuardedConnection | GuardedSession
    ) -> BaseException:
        """A 57014 caused by the statement_timeout *we* sent is our timeout error.

        Only when we sent one in the owner's current transaction: the server's own
        ``statement_timeout`` (a role or database setting) stays the server's error,
        however little time the call has left when it arrives."""
        if _is_exit(exc) or not owner._statement_timeout_sent:
            return exc
        verdict = resolve(self._unit.classifier, exc)
        if verdict.sqlstate != "57014" or "statement timeout" not in str(exc):
            return exc
        limit = self._current_limit()
        if limit is None:
            return exc
        scope = _get_scope()
        by_deadline = (
            scope is not None
            and scope.deadline_at is not None
            and (scope.attempt.deadline_at or 0.0) >= scope.deadline_at - 1e-3
        )
        timeouts = self._unit._timeouts
        configured = timeouts.deadline if by_deadline else timeouts.timeout
        error = timeouts.expired(
            configured or limit, by_deadline, scope.attempt_number if scope else 1
        )
        error.add_note("resilient_db: PostgreSQL ended the statement (57014) at the deadline")
        return error

    def _check_pool_capacity(self) -> None:
        if not self.pool_bulkhead:
            return
        pool = self.engine_for_loop().sync_engine.pool
        size = getattr(pool, "size", None)
        if not callable(size):
            return
        capacity = int(size()) + max(0, int(getattr(pool, "_max_overflow", 0)))
        checked_out = pool.checkedout()  # type: ignore[attr-defined]
        if checked_out >= capacity:
            raise BulkheadFull(
                f"pool of {_engine_name(self._engine.url)}",
                capacity,
                0,
                f"all {capacity} connections are checked out",
            )

    def _current_limit(self) -> float | None:
        """Seconds the current statement or transaction may still run, if bounded."""
        scope = _get_scope()
        if scope is not None:
            attempt_deadline = scope.attempt.deadline_at
            if attempt_deadline is not None:
                return max(0.0, attempt_deadline - scope.clock())
            remaining = scope.remaining()
            if remaining is not None:
                return max(0.0, remaining)
        return self._once.timeout

    async def _server_default_ms(self, conn: AsyncConnection) -> int:
        if self._server_statement_timeout_ms is None:
            result = await _own_sql(
                conn, "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
            )
            self._server_statement_timeout_ms = int(result.scalar_one())
        return self._server_statement_timeout_ms

    async def _apply_server_timeouts(self, owner: GuardedConnection | GuardedSession) -> None:
        """Send the remaining time (and the correlation ID) to PostgreSQL, for the
        owner's current transaction only, in one statement."""
        if not self._per_transaction:
            return
        conn = await _connection_of(owner)
        settings: list[tuple[str, str]] = []
        if self.server_timeouts:
            limit = self._current_limit()
            if limit is not None:
                margin = min(self.server_timeout_margin, limit / 2)
                ms = max(1, int((limit - margin) * 1000))
                default = await self._server_default_ms(conn)
                if default == 0 or ms < default:
                    settings.append(("statement_timeout", f"{ms}ms"))
            if self.lock_timeout is not None:
                settings.append(("lock_timeout", f"{max(1, int(self.lock_timeout * 1000))}ms"))
        if self.correlation_in_application_name:
            correlation_id = current_correlation_id()
            settings.append(
                ("application_name", application_name(self.application_name_prefix, correlation_id))
            )
        if not settings:
            return
        calls = ", ".join(
            f"set_config('{name}', ${i + 1}, true)" for i, (name, _) in enumerate(settings)
        )
        await _own_sql(conn, f"SELECT {calls}", tuple(value for _, value in settings))
        owner._statement_timeout_sent = any(name == "statement_timeout" for name, _ in settings)

    def _pool_usage(self) -> list[tuple[str, object, int, int, int | None]]:
        """``(pool name, pool, used, idle, max)`` for each loop's pool (for the metrics)."""
        rows: list[tuple[str, object, int, int, int | None]] = []
        name = _engine_name(self._engine.url)
        engines = [state.engine for state in list(self._loops.values())] or [self._engine]
        for engine in engines:
            pool = engine.sync_engine.pool
            checkedout = getattr(pool, "checkedout", None)
            checkedin = getattr(pool, "checkedin", None)
            size = getattr(pool, "size", None)
            if not (callable(checkedout) and callable(checkedin) and callable(size)):
                continue  # NullPool, StaticPool: nothing to count
            overflow = int(getattr(pool, "_max_overflow", 0))
            limit = None if overflow < 0 else int(size()) + overflow
            rows.append((name, pool, int(checkedout()), int(checkedin()), limit))
        return rows

    async def _commit(self, owner: Any, raw_commit: Callable[[], Awaitable[None]]) -> None:
        """COMMIT with its outcome tracked, verified when asked, never silently lost;
        refused, before anything is sent, while another task uses the owner."""
        if owner._busy:
            raise _concurrent_use(owner)
        owner._busy = True
        try:
            await self._tracked_commit(owner, raw_commit)
        finally:
            owner._busy = False

    async def _tracked_commit(self, owner: Any, raw_commit: Callable[[], Awaitable[None]]) -> None:
        scope = _get_scope()
        token = None
        op: _Operation | None = None
        if scope is None or not scope.in_call:
            # A commit outside any unit of work: track it in a scope of its own, and
            # report it as an operation of its own.
            clock = self._unit.clock
            scope = CallScope(clock, None, True)
            token = _set_scope(scope)
            if _STATE.active:
                op = _instrument.begin(scope, clock, clock(), None, self._target, "COMMIT")
                op.attempt_started(scope, None, None)
        attempt = scope.attempt
        before = len(attempt.commits) if attempt.commits else 0
        task = _current_task()
        # A session's transaction, to count at the end the COMMITs it had to send
        # (one per database bound, the flush's included).
        transaction = owner.sync_session.get_transaction() if owner._is_session else None

        async def commit() -> None:
            # What goes before the COMMIT is bounded with it: on a frozen server the
            # settings hang like the COMMIT would. A connection with no guarded
            # statement yet (pending) sends only its COMMIT: nothing to bound. A
            # session's flush inside COMMIT sends its transaction's first statements.
            pending = owner._server_timeouts_pending is not None and _take_pending(owner)
            if pending and owner._is_session and _has_changes(owner):
                await self._apply_server_timeouts(owner)
            if not (self.verify_commits and self._is_pg):
                await raw_commit()
                return
            # The transaction id is read on the COMMIT's own connection just before
            # the COMMIT is sent (see _sqla.XID_READER): after every flush, those of
            # the session's `before_commit` hooks included. Read any earlier, it is
            # NULL ("nothing written") for the ORM writes those flushes send, and a
            # lost COMMIT would be retried into a duplicate.
            reader = XID_READER.set(_read_xid)
            try:
                await raw_commit()
            finally:
                XID_READER.reset(reader)

        try:
            if token is not None:
                await self._once.call(commit)
            else:
                await commit()
        except BaseException as exc:
            # This task's COMMITs: tasks the unit started share its attempt.
            records = [r for r in (attempt.commits or [])[before:] if r.task is task]
            try:
                await self._settle_commit(
                    owner, exc, records, _commits_due(transaction), standalone=token is not None
                )
            except BaseException as final:
                if token is not None:
                    if isinstance(final, CommitOutcomeUnknown):
                        _instrument.commit_outcome_unknown(scope, "COMMIT", final, exc)
                    elif _is_exit(final) and any(
                        r.status is not CommitStatus.REJECTED for r in records
                    ):
                        # Cancelled after COMMIT was sent: the outcome stays unknown,
                        # and the cancellation propagates; say so, as a unit would.
                        _instrument.commit_outcome_unknown(
                            scope, "COMMIT", None, None, cancelled=True
                        )
                    if op is not None:
                        op.attempt_ended(scope, op.start, final)
                        op.ended(scope, final)
                    if final is exc:
                        # The flush at COMMIT ended by the statement_timeout we sent:
                        # our timeout error, as for any other guarded statement.
                        translated = self._translate(exc, owner)
                        if translated is not exc:
                            raise translated from exc
                raise
        finally:
            if token is not None:
                _reset_scope(token)
                scope.end()
        if op is not None:
            op.attempt_ended(scope, op.start, None)
            op.ended(scope, None)

    async def _settle_commit(
        self,
        owner: Any,
        exc: BaseException,
        records: list[CommitRecord],
        due: int,
        *,
        standalone: bool,
    ) -> None:
        unsafe = [r for r in records if r.status is not CommitStatus.REJECTED]
        if not unsafe or _is_exit(exc):
            raise exc
        if self.verify_commits and self._is_pg:
            lost = [r for r in unsafe if r.status is not CommitStatus.RETURNED]
            if not lost:
                # Every COMMIT sent was answered: the error came from elsewhere (a
                # COMMIT rejected, one never sent, a hook after it). Nothing to verify.
                if len(records) < due:
                    raise CommitOutcomeUnknown(
                        f"of this transaction's {due} COMMITs (one per database bound), "
                        f"{len(records)} were sent before {type(exc).__name__}; not retried",
                    ) from exc
                raise exc  # the unit sees a COMMIT that took effect: it does not retry
            # Each COMMIT whose answer was lost is settled by its own transaction id
            # (a session bound to several engines sends one COMMIT per engine).
            unresolved: list[tuple[CommitRecord, str]] = []
            for record in lost:
                if record.xid_read and record.xid is None:
                    # It wrote nothing: nothing to lose or to duplicate.
                    record.status = CommitStatus.REJECTED
                    continue
                status = "unknown" if record.xid is None else await self._verify(record.xid)
                if status == "committed":
                    record.status = CommitStatus.RETURNED
                elif status == "aborted":
                    record.status = CommitStatus.REJECTED
                else:
                    unresolved.append((record, status))
            if unresolved:
                record, status = unresolved[0]
                raise CommitOutcomeUnknown(
                    f"COMMIT of transaction {record.xid} failed ({type(exc).__name__}: {exc}) "
                    f"and the server reports it as {status!r}: it may still commit; not "
                    "retried",
                    xid=record.xid,
                    status=status,
                ) from exc
            if all(r.status is CommitStatus.REJECTED for r in records):
                raise exc  # nothing committed: retried like any transient failure
            if len(records) < due or any(r.status is CommitStatus.REJECTED for r in records):
                raise CommitOutcomeUnknown(
                    f"of this transaction's {len(records)} COMMITs (one per database "
                    "bound), some committed and some did not; not retried",
                ) from exc
            xids = [r.xid for r in records if r.xid is not None]
            logger.warning(
                "COMMIT of transaction %s failed (%s) but the server says it committed: "
                "treated as a success",
                ", ".join(str(x) for x in xids),
                type(exc).__name__,
                extra={"resilient_db_event": "commit_verified", "xid": xids[0] if xids else None},
            )
            await _reset_after_verified_commit(owner)
            return
        if standalone:
            raise CommitOutcomeUnknown(
                f"the COMMIT was interrupted ({type(exc).__name__}: {exc}); its work may be "
                "durable. Verify it (ResilientEngine(verify_commits=True)) or make the unit "
                "idempotent",
            ) from exc
        raise exc

    async def _verify(self, xid: int) -> str:
        """Ask ``pg_xact_status`` on a fresh connection, while it says ``in progress``,
        with the attempt's timers paused: the verification has a budget of its own."""
        scope = _get_scope()
        if scope is None:
            return await self._ask_status(xid)
        loop = asyncio.get_running_loop()
        scope.attempt.disarm()
        paused_at = loop.time()
        try:
            return await self._ask_status(xid)
        finally:
            scope.attempt.rearm(loop.time() - paused_at)

    async def _ask_status(self, xid: int) -> str:
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.verify_timeout
        status = "unknown"
        delay = 0.05
        query = text("SELECT pg_xact_status(CAST(:xid AS xid8))")
        while True:
            try:
                async with asyncio.timeout(max(0.05, min(1.0, ends - loop.time()))):
                    async with self.engine_for_loop().connect() as conn:
                        value = (await conn.execute(query, {"xid": xid})).scalar()
                status = str(value) if value is not None else "unknown"
            except (OSError, TimeoutError) as error:
                logger.debug("verifying transaction %d: %r", xid, error)
                status = "unknown"
            except Exception as error:
                if resolve(None, error).category.value not in ("connection", "timeout"):
                    raise
                status = "unknown"
            if status in ("committed", "aborted") or loop.time() + delay >= ends:
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def _reset_after_verified_commit(owner: Any) -> None:
    """The COMMIT went through although the driver failed: clear the broken
    transaction so the session/connection can go on (its objects are detached)."""
    if isinstance(owner, AsyncSession):
        owner.expunge_all()
        with warnings.catch_warnings():
            # A session bound to several databases: the COMMITs that returned left
            # their transactions behind, which the rollback then finds closed.
            warnings.filterwarnings(
                "ignore", "transaction already deassociated", category=sa_exc.SAWarning
            )
            await AsyncSession.rollback(owner)
    elif isinstance(owner, AsyncConnection) and owner.get_transaction() is not None:
        # Invalidated with its (inactive) transaction attached: without the
        # rollback, the next statement raises PendingRollbackError.
        await AsyncConnection.rollback(owner)


def _unit_timer_armed(scope: CallScope) -> bool:
    """Whether a unit of work's attempt timer watches what runs now, in ``scope``
    (then it bounds cleanup too: the dialect's ROLLBACK registers with it). A unit
    without a timeout leaves cleanup to the engine's own bound. Callers look for a
    scope first: outside any (every release of ``db.connect()``) there is no call."""
    if not scope.in_call:
        return False
    timers = scope.attempt.timers
    return timers is not None and any(timer.live for timer in timers)


def _commits_due(transaction: Any) -> int:
    """How many COMMITs a session's transaction had to send: one per connection
    it held (SQLAlchemy keys each by its engine and by itself); 1 for a connection."""
    connections = getattr(transaction, "_connections", None)
    if not connections:
        return 1
    return len({id(entry[0]) for entry in connections.values()})


def _release_timed_out(owner: object, exc: BaseException) -> None:
    logger.warning(
        "releasing a %s timed out (%s): its connection was discarded",
        type(owner).__name__,
        exc,
        extra={"resilient_db_event": "release_timed_out"},
    )


def _concurrent_use(owner: object) -> ConcurrentSessionUse:
    return ConcurrentSessionUse(
        f"this {type(owner).__name__} is already running an operation in another task; a "
        "connection runs one statement at a time: share the engine (or the sessionmaker), "
        "not the session"
    )


async def _after_server_timeouts(
    db: ResilientEngine, owner: Any, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` once the owner's transaction has its server-side
    deadline (see ``ResilientEngine._apply_server_timeouts``)."""
    await db._apply_server_timeouts(owner)
    return await fn(*args, **kwargs)


class _RetryAlone:
    """The later attempts of a statement retried on its own (it opened its
    transaction), unless it turns out to write after all (see ``_Again``)."""

    __slots__ = ()

    def refuses(self, statement: Any, kwargs: Mapping[str, Any]) -> str | None:
        return _writes_where_unseen(statement, kwargs.get("execution_options"))

    def __call__(
        self, fn: Callable[..., Awaitable[T]], owner: Any, *args: Any, **kwargs: Any
    ) -> Awaitable[T]:
        return _again_alone(fn, owner, *args, **kwargs)


_retry_alone: Final = _RetryAlone()


async def _again_alone(fn: Callable[..., Awaitable[T]], owner: Any, *args: Any, **kwargs: Any) -> T:
    """A later attempt of a statement retried on its own: roll back what the failed
    attempt left first — its (single-statement) transaction aborted, or its
    connection invalidated."""
    if owner._in_transaction():
        if isinstance(owner, AsyncSession):
            await AsyncSession.rollback(owner)
        else:
            await AsyncConnection.rollback(owner)
    if not isinstance(owner, AsyncSession):
        # A connection's own isolation level (`conn.execution_options(isolation_level=
        # "AUTOCOMMIT")`) is not set again on the DBAPI connection that replaces an
        # invalidated one: without this, an idempotent write retried in AUTOCOMMIT
        # would run in a transaction nobody commits.
        sync = owner.sync_connection
        level = None if sync is None else sync.get_execution_options().get("isolation_level")
        if level is not None:
            await AsyncConnection.execution_options(owner, isolation_level=level)
    return await fn(owner, *args, **kwargs)


_SET_TRANSACTION = re.compile(r"^\s*set\s+transaction\b", re.IGNORECASE)


def _sets_transaction(statement: Any) -> bool:
    if isinstance(statement, TextClause):
        return bool(_SET_TRANSACTION.match(statement.text))
    return isinstance(statement, str) and bool(_SET_TRANSACTION.match(statement))


async def _own_sql(conn: AsyncConnection, sql: str, parameters: Any = None) -> Any:
    """Send one of resilient-db's own statements (the server-side deadline, the
    ``pg_settings`` read).

    The operation it runs in learns its query text from its first statement (see
    ``_sqla``); ours are not the caller's, so they leave that to the next one."""
    scope = _get_scope()
    op = None if scope is None else (scope.root or scope).telemetry
    learner = op if op is not None and op.query_text is None else None
    try:
        return await AsyncConnection.exec_driver_sql(conn, sql, parameters)
    finally:
        if learner is not None:
            learner.query_text = None
            learner.wants_statement = learner.wants_statement or learner.db_operation is not None


async def _connection_of(owner: Any) -> AsyncConnection:
    if isinstance(owner, AsyncSession):
        return await AsyncSession.connection(owner)
    return owner  # type: ignore[no-any-return]


def _is_exit(exc: BaseException | None) -> bool:
    return isinstance(exc, _EXIT_EXCEPTIONS)


async def _drain_cancel_requests() -> None:
    pending = [t for t in pending_cancel_requests() if t.get_loop() is asyncio.get_running_loop()]
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


APPLICATION_NAME_BYTES = 63
"""PostgreSQL keeps the first NAMEDATALEN - 1 bytes of ``application_name``."""


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"application_name_prefix must be a str; got {prefix!r}")
    if not prefix.isprintable() or not prefix.isascii() or len(prefix) > 32:
        raise ValueError(
            "application_name_prefix must be at most 32 printable ASCII characters "
            f"(PostgreSQL keeps 63 bytes of application_name in all); got {prefix!r}"
        )
    return prefix


def application_name(prefix: str, correlation_id: str) -> str:
    """``prefix + correlation_id``, cut to 63 bytes of UTF-8 without splitting a
    character (PostgreSQL would cut mid-character and mangle the end)."""
    value = prefix + correlation_id
    encoded = value.encode("utf-8")
    if len(encoded) <= APPLICATION_NAME_BYTES:
        return value
    return encoded[:APPLICATION_NAME_BYTES].decode("utf-8", errors="ignore")


def sqlcommenter(fields: Mapping[str, str]) -> str:
    """A sqlcommenter comment: keys sorted, values URL-encoded and quoted."""
    body = ",".join(
        f"{quote(key, safe='')}='{quote(value, safe='')}'" for key, value in sorted(fields.items())
    )
    return f"/*{body}*/"


def _add_sql_comment(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    if "*/" in statement:
        return statement, parameters  # sqlcommenter: never touch a commented statement
    fields = {"correlation_id": current_correlation_id()}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        fields["traceparent"] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags):02x}"
        )
    return f"{statement} {sqlcommenter(fields)}", parameters


_NO_KWARGS: Final[dict[str, Any]] = {}
"""The keyword arguments of a statement given none (shared: never modified)."""


# SQLAlchemy's methods that guarded ones call, looked up once: on Python 3.11 an
# attribute of a class is a generic lookup at every use.
_CONNECTION_INIT: Final = AsyncConnection.__init__
_CONNECTION_START: Final = AsyncConnection.start
_CONNECTION_EXECUTE: Final = AsyncConnection.execute
_CONNECTION_STREAM: Final = AsyncConnection.stream
_CONNECTION_EXEC_DRIVER_SQL: Final = AsyncConnection.exec_driver_sql
_CONNECTION_ROLLBACK: Final = AsyncConnection.rollback
_CONNECTION_CLOSE: Final = AsyncConnection.close


class GuardedConnection(AsyncConnection, ConnectionTimer):
    """An ``AsyncConnection`` whose statements run under the engine's policy."""

    # Instance slots, not class-level defaults: on Python 3.11 an attribute that
    # also exists on the class is a generic lookup at every read, and every
    # statement reads these. The `ConnectionTimer` slots (`_timer_*`, `due`) time
    # the connection's own statements outside a transaction and its release.
    __slots__ = (
        "_busy",
        "_db",
        "_server_timeouts_pending",
        "_session",
        "_statement_timeout_sent",
        *_TIMER_SLOTS,
    )

    # Hashed by identity, as SQLAlchemy's proxies are, but without a Python-level
    # `__hash__`: the watchdog adds and removes it at every timed statement and
    # every release.
    __hash__ = object.__hash__

    _db: ResilientEngine
    _is_session: ClassVar[bool] = False
    _session: GuardedSession | None
    """The session this is the connection of (``session.connection()``): its
    statements then share the session's state — one task at a time, the
    transaction's server-side settings, their timeout errors."""
    _busy: bool
    _server_timeouts_pending: object | None
    """The transaction waiting for its server-side settings (see ``_take_pending``)."""
    _statement_timeout_sent: bool
    """Whether this transaction got a ``statement_timeout`` from us (see ``_translate``)."""

    def __init__(
        self, async_engine: AsyncEngine, sync_connection: Connection | None, db: ResilientEngine
    ):
        _CONNECTION_INIT(self, async_engine, sync_connection)
        self._db = db
        self._session = None
        self._busy = False
        self._server_timeouts_pending = None
        self._statement_timeout_sent = False

    def _in_transaction(self) -> bool:
        sync = self.sync_connection
        return sync is not None and sync.in_transaction()

    def _current_transaction(self) -> object | None:
        sync = self.sync_connection
        return None if sync is None else sync.get_transaction()

    def _timed_connection(self) -> Connection | None:
        return self.sync_connection

    def _owner(self) -> GuardedConnection | GuardedSession:
        """Whose state its operations use: its session's, if it is one's connection."""
        session = self._session
        return self if session is None else session

    if not TYPE_CHECKING:

        def start(self, is_ctxmanager: bool = False) -> Awaitable[AsyncConnection]:
            # A plain function returning the coroutine to await: one coroutine layer
            # less for every checkout (`_check_pool_capacity` raises at the call
            # instead of at the await, inside the same `await conn.start()`).
            db = self._db
            scope = _get_scope()
            if scope is not None and scope.in_call:
                return _CONNECTION_START(self, is_ctxmanager)
            if db.pool_bulkhead:
                db._check_pool_capacity()
            # Guarded only if it has to wait: a warm pool answers from memory.
            return db._checkout._invoke_if_waiting(
                _CONNECTION_START,
                (self, is_ctxmanager),
                "connect",
                db._target,
                db._pool_checkout,
            )

        def begin(self) -> AsyncTransaction:
            assert self._proxied
            return _GuardedTransaction(self)

        def begin_nested(self) -> AsyncTransaction:
            assert self._proxied
            return _GuardedTransaction(self, nested=True)

        def execute(self, statement, parameters=None, *, execution_options=None):
            # A plain function returning the guard's coroutine: one coroutine layer
            # less for every statement (awaiting it is the same). `_owner()` written
            # out: this runs for every statement.
            session = self._session
            return self._db._guard(
                self if session is None else session,
                statement,
                None,
                execution_options,
                _CONNECTION_EXECUTE,
                (self, statement, parameters),
                _NO_KWARGS
                if execution_options is None
                else {"execution_options": execution_options},
                self if session is None else None,  # then it times the statement
            )

        async def exec_driver_sql(self, statement, parameters=None, execution_options=None):
            return await self._db._guard(
                self._owner(),
                statement,
                None,
                execution_options,
                _CONNECTION_EXEC_DRIVER_SQL,
                (self, statement, parameters, execution_options),
                _NO_KWARGS,
                self if self._session is None else None,
            )

        @asyncstartablecontext
        async def stream(self, statement, parameters=None, *, execution_options=None):
            # Awaited (`await conn.stream(...)`) or entered (`async with
            # conn.stream(...) as result`), as SQLAlchemy's own; `stream_scalars`
            # enters it.
            result = await self._db._guard(
                self._owner(),
                statement,
                None,
                execution_options,
                _CONNECTION_STREAM,
                (self, statement, parameters),
                _NO_KWARGS
                if execution_options is None
                else {"execution_options": execution_options},
                self if self._session is None else None,
            )
            try:
                yield result
            except GeneratorExit:
                pass  # awaited, not entered: the result is the caller's to close
            else:
                await result.close()

        async def commit(self) -> None:
            await self._db._commit(self, lambda: AsyncConnection.commit(self))

        async def rollback(self) -> None:
            await self._db._cleanup_call(_CONNECTION_ROLLBACK, self)

        async def run_sync(self, fn, *arg, **kw):
            # One guarded operation: the engine's timeout bounds the whole function.
            return await self._db._guard(
                self._owner(), None, False, None, AsyncConnection.run_sync, (self, fn, *arg), kw
            )

        def close(self) -> Awaitable[None]:
            # A plain function returning the release's coroutine: one coroutine
            # layer less for every release.
            return self._db._release_connection(self)


class _GuardedBlock:
    """What ``conn.begin()`` and ``session.begin()`` on a guarded owner share with
    ``db.begin()``: the server-side deadline when the transaction starts, its COMMIT
    through the engine's tracking, and a block exit that commits that way.

    A nested one (``begin_nested()``) sends SAVEPOINT and RELEASE SAVEPOINT as
    statements of the transaction: under the owner's guard, like its statements.

    Mixed into a subclass of the SQLAlchemy class named by ``_sqlalchemy``, whose
    own methods run everything else (rollbacks, unguarded owners)."""

    __slots__ = ()

    if not TYPE_CHECKING:
        _sqlalchemy: ClassVar[type]

        def _guarded_owner(self) -> GuardedConnection | GuardedSession | None:
            raise NotImplementedError

        async def start(self, is_ctxmanager: bool = False) -> Any:
            owner = self._guarded_owner()
            sqlalchemy_start = self._sqlalchemy.start
            if owner is None:
                await sqlalchemy_start(self, is_ctxmanager)
            elif self.nested:
                await owner._db._guard(
                    owner, None, False, None, sqlalchemy_start, (self, is_ctxmanager), _NO_KWARGS
                )
            else:
                await sqlalchemy_start(self, is_ctxmanager)
                _transaction_begun(owner)
            return self

        async def commit(self) -> None:
            owner = self._guarded_owner()
            sqlalchemy_commit = self._sqlalchemy.commit
            if owner is None:
                await sqlalchemy_commit(self)
            elif self.nested:
                await owner._db._guard(
                    owner, None, False, None, sqlalchemy_commit, (self,), _NO_KWARGS
                )
            else:
                await owner._db._commit(owner, lambda: sqlalchemy_commit(self))

        async def __aexit__(self, type_, value, traceback) -> None:
            await _exit_guarded(self, self._sqlalchemy.__aexit__, type_, value, traceback)


class _GuardedTransaction(_GuardedBlock, AsyncTransaction):
    """``conn.begin()`` on a guarded connection, as ``db.begin()``."""

    __slots__ = ()
    _sqlalchemy = AsyncTransaction

    def _guarded_owner(self) -> GuardedConnection | GuardedSession | None:
        conn = self.connection
        return conn._owner() if isinstance(conn, GuardedConnection) else None


class _GuardedSessionTransaction(_GuardedBlock, AsyncSessionTransaction):
    """``session.begin()`` on a guarded session."""

    _sqlalchemy = AsyncSessionTransaction

    def _guarded_owner(self) -> GuardedSession | None:
        session = self.session
        return session if isinstance(session, GuardedSession) else None


def _transaction_begun(owner: GuardedConnection | GuardedSession) -> None:
    """An explicit transaction started on ``owner``: the server-side settings are sent
    just before its first statement that is not SET TRANSACTION (which PostgreSQL
    only accepts before any query); none of ours was sent yet.

    Pending for *that* transaction only (see :func:`_take_pending`): one rolled back
    before any statement must not hand its settings to the next, implicit one."""
    if owner._db._per_transaction:
        owner._server_timeouts_pending = owner._current_transaction()
    owner._statement_timeout_sent = False


def _take_pending(owner: GuardedConnection | GuardedSession) -> bool:
    """Whether the owner's current transaction still waits for its server-side
    settings (clearing the mark: the caller sends them)."""
    pending = owner._server_timeouts_pending
    owner._server_timeouts_pending = None
    return pending is not None and pending is owner._current_transaction()


def _has_changes(session: AsyncSession) -> bool:
    """Whether the session's flush would send anything."""
    return bool(session.new) or bool(session.deleted) or session.identity_map.check_modified()


def _read_xid(dbapi_connection: Any, record: CommitRecord) -> None:
    """Note on ``record`` the id of the transaction about to be committed on
    ``dbapi_connection`` (``NULL``: it wrote nothing), if that is PostgreSQL. Run by
    the COMMIT tracking, in SQLAlchemy's sync layer, on the COMMIT's connection."""
    driver = _driver_of(dbapi_connection)
    if driver is None or not type(driver).__module__.startswith(("asyncpg", "psycopg")):
        return  # another database bound to the same session: not ours to read
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT pg_current_xact_id_if_assigned()::text")
        row = cursor.fetchone()
    finally:
        cursor.close()
    record.xid = None if row is None or row[0] is None else int(row[0])
    record.xid_read = True


async def _exit_guarded(
    transaction: Any, sqlalchemy_exit: Callable[..., Awaitable[None]], *exc_info: Any
) -> None:
    """``__aexit__`` of a guarded transaction block: on success, COMMIT (or RELEASE
    SAVEPOINT) through the transaction's own (guarded) ``commit``; then SQLAlchemy's
    exit, which after that only restores its transaction bookkeeping (without it the
    session or connection refuses every later statement), and otherwise rolls back."""
    if exc_info[0] is None and transaction.is_active:
        try:
            await transaction.commit()
        except BaseException as exc:
            # Roll back (or close) what is left and restore the bookkeeping; the
            # COMMIT's own error is the news.
            with suppress(Exception):
                await _cleanup_exit(transaction, sqlalchemy_exit, type(exc), exc, exc.__traceback__)
            raise
    if exc_info[0] is None:
        await sqlalchemy_exit(transaction, *exc_info)  # bookkeeping only, after our COMMIT
    else:
        await _cleanup_exit(transaction, sqlalchemy_exit, *exc_info)


async def _cleanup_exit(
    transaction: Any, sqlalchemy_exit: Callable[..., Awaitable[None]], *exc_info: Any
) -> None:
    """SQLAlchemy's exit of a block that failed: its ROLLBACK, bounded as cleanup."""
    owner = transaction._guarded_owner()
    if owner is None:
        await sqlalchemy_exit(transaction, *exc_info)
    else:
        await owner._db._rollback_after_failure(sqlalchemy_exit, transaction, *exc_info)


def _session_statement(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """``AsyncSession.execute``, ``scalar`` or ``stream``, run under the engine's policy."""

    @functools.wraps(method)
    async def guarded(
        self: GuardedSession,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> T:
        options = execution_options or {}
        return await self._db._guard(
            self,
            statement,
            None,
            options,
            method,
            (self, statement, params),
            {"execution_options": options, **kw},
        )

    return guarded


class GuardedSession(AsyncSession):
    """An ``AsyncSession`` whose statements and COMMITs run under the engine's policy."""

    _db: ClassVar[ResilientEngine]
    _is_session: ClassVar[bool] = True
    # Set on the instance, no class-level defaults (see GuardedConnection).
    _busy: bool
    _server_timeouts_pending: object | None
    """The transaction waiting for its server-side settings (see ``_take_pending``)."""
    _statement_timeout_sent: bool
    """Whether this transaction got a ``statement_timeout`` from us (see ``_translate``)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._busy = False
        self._server_timeouts_pending = None
        self._statement_timeout_sent = False

    def _in_transaction(self) -> bool:
        return self.sync_session.in_transaction()

    def _current_transaction(self) -> object | None:
        return self.sync_session.get_transaction()

    if not TYPE_CHECKING:

        def begin(self) -> AsyncSessionTransaction:
            return _GuardedSessionTransaction(self)

        def begin_nested(self) -> AsyncSessionTransaction:
            return _GuardedSessionTransaction(self, nested=True)

        execute = _session_statement(AsyncSession.execute)
        scalar = _session_statement(AsyncSession.scalar)
        stream = _session_statement(AsyncSession.stream)

        async def get(self, *args, **kw):
            return await self._db._guard(
                self, None, True, None, AsyncSession.get, (self, *args), kw
            )

        async def connection(self, bind_arguments=None, execution_options=None, **kw):
            # Checking out (and beginning, with the caller's options) under the
            # guard, like a statement, but without the transaction's server-side
            # settings: they wait for its first statement, through the session or
            # the connection, which may still be SET TRANSACTION.
            pending = self._server_timeouts_pending
            self._server_timeouts_pending = None
            try:
                conn = await self._db._guard(
                    self,
                    None,
                    False,
                    None,
                    AsyncSession.connection,
                    (self, bind_arguments, execution_options),
                    kw,
                )
            finally:
                if self._server_timeouts_pending is None:
                    self._server_timeouts_pending = pending
            if isinstance(conn, GuardedConnection):
                return conn  # this one made before, or the one the session is bound to
            # Registered as the sync connection's proxy, so later calls (and
            # SQLAlchemy's own lookups) find this one.
            guarded = GuardedConnection(conn.engine, conn.sync_connection, self._db)
            guarded._session = self
            return guarded

        async def get_one(self, *args, **kw):
            return await self._db._guard(
                self, None, True, None, AsyncSession.get_one, (self, *args), kw
            )

        async def refresh(self, *args, **kw):
            return await self._db._guard(
                self, None, True, None, AsyncSession.refresh, (self, *args), kw
            )

        async def flush(self, *args, **kw):
            return await self._db._guard(
                self, None, False, None, AsyncSession.flush, (self, *args), kw
            )

        async def merge(self, *args, **kw):
            return await self._db._guard(
                self, None, False, None, AsyncSession.merge, (self, *args), kw
            )

        async def delete(self, *args, **kw):
            return await self._db._guard(
                self, None, False, None, AsyncSession.delete, (self, *args), kw
            )

        async def commit(self) -> None:
            if not self.in_transaction():
                return
            await self._db._commit(self, lambda: AsyncSession.commit(self))

        async def rollback(self) -> None:
            await self._db._cleanup_call(AsyncSession.rollback, self)

        async def run_sync(self, fn, *arg, **kw):
            return await self._db._guard(
                self, None, False, None, AsyncSession.run_sync, (self, fn, *arg), kw
            )

        async def close(self) -> None:
            await self._db._release(AsyncSession.close, self)

        if hasattr(AsyncSession, "reset"):  # SQLAlchemy 2.0.22+

            async def reset(self) -> None:
                await self._db._release(AsyncSession.reset, self)


class ResilientSessionmaker(async_sessionmaker[GuardedSession]):
    """An ``async_sessionmaker`` making guarded sessions bound to the running loop's engine."""

    def __init__(self, db: ResilientEngine, **kw: Any) -> None:
        self._db = db
        super().__init__(None, class_=db._session_class, **kw)

    def __call__(self, **local_kw: Any) -> GuardedSession:
        local_kw.setdefault("bind", self._db.engine_for_loop())
        return super().__call__(**local_kw)


def resilient_engine(
    engine: AsyncEngine, policy: Policy | None = None, **kwargs: Any
) -> ResilientEngine:
    """``ResilientEngine(engine, policy=policy, **kwargs)``, for symmetry with ``@policy``."""
    return ResilientEngine(engine, policy=policy, **kwargs)
