"""``Policy`` and ``@resilient``: the policies composed around one unit of work.

The order in which policies wrap a call is defined here, and only here::

    deadline            the whole call, retries and backoff included (contextvar)
     └─ retry           whole-unit retries, with backoff and the retry budget
         └─ breaker     fail fast while the database is down; counts outcomes
             └─ bulkhead    at most N attempts at once
                 └─ timeout     per attempt, never beyond the remaining deadline
                     └─ call        your function: the unit of work

Why this order: the breaker sits inside the retry so that every attempt is
admitted (or rejected, cheaply) on its own and counted once; the bulkhead sits
inside the breaker so that a rejected call never takes a slot; the timeout sits
innermost so that it bounds the work and not the queueing, and the breaker sees
the timeout as the attempt's failure.

Only the outermost guarded call retries: a guarded function called from another
guarded function runs its attempt under the shared deadline, through breakers and
bulkheads not already applied further out, and lets errors travel to the outer
unit of work, which retries as a whole.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import (
    Any,
    Final,
    Literal,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from . import _instrument
from . import _validate as v
from ._classify import _EXIT_EXCEPTIONS, Classification, Classifier, ErrorCategory, resolve
from ._errors import CircuitOpenError, CommitOutcomeUnknown
from ._instrument import _NO_STATEMENT, _STATE, DatabaseTarget, _Operation, describe
from ._scope import AttemptState, CallScope, CommitStatus, _get_scope, _reset_scope, _set_scope
from ._sqla import install_commit_tracking
from .policies.breaker import (
    _CLOSED,
    BreakerOutcome,
    BreakerProtocol,
    BreakerState,
    CircuitBreaker,
    get_breaker,
)
from .policies.budget import RetryBudget
from .policies.bulkhead import Bulkhead
from .policies.retry import Backoff, RetryPolicy
from .policies.timeout import AttemptTimer, ConnectionTimer, TimeoutPolicy

__all__ = ["Policy", "resilient"]

logger = logging.getLogger("resilient_db")

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C")


class _Default:
    """Sentinel: "not given, use the default" (``None``/``False`` mean "disabled")."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __bool__(self) -> bool:
        return False


DEFAULT: Final = _Default()


_monotonic = time.monotonic


def breaker_outcome(verdict: Classification) -> BreakerOutcome:
    """How a classified failure counts for the breaker."""
    if verdict.counts_for_breaker:
        return BreakerOutcome.FAILURE
    if verdict.category in (ErrorCategory.CANCELLED, ErrorCategory.OVERLOAD):
        return BreakerOutcome.IGNORED
    # The database answered (a constraint, a conflict) or the code failed on its own
    # account: either way nothing says the database is unhealthy.
    return BreakerOutcome.SUCCESS


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an async __call__ counts too
    return call is not None and inspect.iscoroutinefunction(call)


class Policy:
    """A reusable set of policies for units of work against one database.

    Build it once, then use it as a decorator (``@policy``) or call through it
    (``await policy.call(fn, *args)``). Everything is validated and normalised
    here, so a bad value fails at import time, never at call time.

    Args:
        timeout: per-attempt limit in seconds (number or ``timedelta``); ``None``:
            attempts are bounded only by the deadline.
        deadline: overall limit for the call, retries and backoff included.
        retries: additional attempts after the first, for errors that are safe
            to retry (0 disables retries).
        backoff: a :class:`Backoff`, or a mapping with its fields
            (``initial``, ``max``, ``multiplier``, ``jitter``).
        breaker: a :class:`CircuitBreaker` (or an adapter such as
            :class:`AiobreakerAdapter`), the name of a shared breaker, or ``False``
            for none. Default: the shared breaker named ``"default"``.
        bulkhead: a :class:`Bulkhead`, an int (max concurrent attempts), or
            ``None`` for none.
        classifier: decides what is retryable and what the breaker counts; return
            ``None`` from it to defer to :func:`classify`.
        idempotent: the unit of work is safe to run twice (e.g. it writes an
            idempotency key in the same transaction). Only then is an attempt that
            sent a COMMIT retried after failing; otherwise such an attempt raises
            :class:`CommitOutcomeUnknown`.
        retry_budget: a shared :class:`RetryBudget`, ``None`` for no budget. Default:
            a budget of this policy's own (retries add at most 20 %).
        clock: monotonic clock in seconds, for deadlines and durations.
        sleep: coroutine used for backoff waits.
        name: for logs and telemetry (default: the decorated function's qualified name).
    """

    __slots__ = (
        "_breaker",
        "_bulkhead",
        "_classifier",
        "_clock",
        "_deposits",
        "_guards",
        "_name",
        "_retry",
        "_success",
        "_timeouts",
        "_unguarded_start",
        "idempotent",
    )

    def __init__(
        self,
        *,
        timeout: v.Seconds | None = None,
        deadline: v.Seconds | None = None,
        retries: int = 3,
        backoff: Backoff | Mapping[str, Any] | None = None,
        breaker: BreakerProtocol | str | Literal[False] | _Default = DEFAULT,
        bulkhead: Bulkhead | int | None = None,
        classifier: Classifier | None = None,
        idempotent: bool = False,
        retry_budget: RetryBudget | _Default | None = DEFAULT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        name: str | None = None,
    ) -> None:
        self._timeouts = TimeoutPolicy.build(timeout, deadline)
        if backoff is None:
            backoff = Backoff()
        elif isinstance(backoff, Mapping):
            unknown = set(backoff) - {"initial", "max", "multiplier", "jitter"}
            if unknown:
                raise ValueError(
                    f"backoff got unknown key(s) {sorted(unknown)}; "
                    "accepted: initial, max, multiplier, jitter"
                )
            backoff = Backoff(**backoff)
        elif not isinstance(backoff, Backoff):
            raise TypeError(
                f"backoff must be a Backoff, a mapping of its fields, or None; got {backoff!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds; got {clock!r}")
        if not callable(sleep):
            raise TypeError(f"sleep must be a coroutine function taking seconds; got {sleep!r}")
        if isinstance(retry_budget, _Default):
            budget: RetryBudget | None = RetryBudget(clock=clock)
        elif retry_budget is None or isinstance(retry_budget, RetryBudget):
            budget = retry_budget
        else:
            raise TypeError(f"retry_budget must be a RetryBudget or None; got {retry_budget!r}")
        self._retry = RetryPolicy(
            retries=retries, backoff=backoff, budget=budget, clock=clock, sleep=sleep
        )
        self._breaker = _resolve_breaker(breaker)
        _instrument.track_breaker(self._breaker)
        self._bulkhead = _resolve_bulkhead(bulkhead)
        self._guards: tuple[object, ...] = ()
        if self._breaker is not None or self._bulkhead is not None:
            self._guards = (self._breaker, self._bulkhead)
        if classifier is not None and not callable(classifier):
            raise TypeError(f"classifier must be callable or None; got {classifier!r}")
        self._classifier = classifier
        self.idempotent = v.boolean("idempotent", idempotent)
        self._clock = clock
        self._name = None if name is None else v.name_string("name", name)
        self._success = BreakerOutcome.SUCCESS
        """How a successful attempt counts for the breaker (see :meth:`_derive`)."""
        self._deposits: RetryBudget | None = budget
        """The budget each call deposits into (``None``: calls deposit nothing)."""
        self._unguarded_start = False
        """Whether :meth:`_invoke_if_waiting` may start a call outside the policy."""
        install_commit_tracking()

    # -- building from configuration ------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **overrides: Any) -> Policy:
        """Build from a dict; see ``docs/configuration.md`` for the keys."""
        from ._config import policy_from_mapping

        return policy_from_mapping(mapping, **overrides)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        prefix: str = "RESILIENT_DB_",
        **overrides: Any,
    ) -> Policy:
        """Build from ``RESILIENT_DB_*`` environment variables."""
        from ._config import policy_from_env

        return policy_from_env(environ, prefix=prefix, **overrides)

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, table: str = "resilient_db", **overrides: Any
    ) -> Policy:
        """Build from a TOML table (``table="tool.resilient_db"`` for pyproject.toml)."""
        from ._config import policy_from_toml

        return policy_from_toml(path, table=table, **overrides)

    def _derive(
        self,
        *,
        retries: int | None = None,
        idempotent: bool | None = None,
        traffic: bool | None = None,
    ) -> Policy:
        """A copy sharing breaker, bulkhead, budget and clocks, with other retry settings.

        ``traffic=False``: a call that is no database traffic by itself (a pool
        checkout, usually served from memory). Its success is no evidence of the
        database's health: the breaker is told it was ignored, so it neither resets
        the count of consecutive failures nor dilutes the failure rate (failures
        count as usual). And it deposits nothing into the retry budget, which caps
        retries to a share of real traffic (its own retries still withdraw)."""
        clone = object.__new__(Policy)
        for slot in Policy.__slots__:
            object.__setattr__(clone, slot, getattr(self, slot))
        if retries is not None:
            clone._retry = RetryPolicy(
                retries=retries,
                backoff=self._retry.backoff,
                budget=self._retry.budget,
                clock=self._retry.clock,
                sleep=self._retry.sleep,
            )
        if idempotent is not None:
            clone.idempotent = idempotent
        if traffic is not None:
            clone._success = BreakerOutcome.SUCCESS if traffic else BreakerOutcome.IGNORED
            clone._deposits = clone._retry.budget if traffic else None
            clone._unguarded_start = (
                not traffic
                and clone._bulkhead is None
                and (clone._breaker is None or type(clone._breaker) is CircuitBreaker)
            )
        return clone

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock this policy measures time with."""
        return self._clock

    @property
    def classifier(self) -> Classifier | None:
        """The user classifier, if any."""
        return self._classifier

    # -- introspection -------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """Per-attempt timeout in seconds."""
        return self._timeouts.timeout

    @property
    def deadline(self) -> float | None:
        """Overall deadline in seconds."""
        return self._timeouts.deadline

    @property
    def retries(self) -> int:
        """Additional attempts after the first."""
        return self._retry.retries

    @property
    def backoff(self) -> Backoff:
        """The backoff between attempts."""
        return self._retry.backoff

    @property
    def breaker(self) -> BreakerProtocol | None:
        """The breaker guarding calls, if any."""
        return self._breaker

    @property
    def bulkhead(self) -> Bulkhead | None:
        """The bulkhead limiting concurrent attempts, if any."""
        return self._bulkhead

    @property
    def retry_budget(self) -> RetryBudget | None:
        """The retry budget, if any."""
        return self._retry.budget

    @property
    def name(self) -> str | None:
        """The name given to the policy, if any."""
        return self._name

    def __repr__(self) -> str:
        breaker = self._breaker.name if self._breaker is not None else None
        return (
            f"Policy(timeout={self.timeout}, deadline={self.deadline}, retries={self.retries}, "
            f"breaker={breaker!r}, bulkhead={self._bulkhead!r}, idempotent={self.idempotent})"
        )

    # -- using it ------------------------------------------------------------------------

    @overload
    def __call__(
        self, fn: staticmethod[P, Coroutine[Any, Any, T]]
    ) -> staticmethod[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(
        self, fn: classmethod[C, P, Coroutine[Any, Any, T]]
    ) -> classmethod[C, P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __call__(self, fn: Any) -> Any:
        """Decorate an ``async def`` function or method (sync callables: ``TypeError``)."""
        if isinstance(fn, staticmethod):
            return staticmethod(self(fn.__func__))
        if isinstance(fn, classmethod):
            return classmethod(self(fn.__func__))
        if inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@resilient cannot guard async generator {fn!r}: a stream cannot be "
                "retried as a unit; guard the function that consumes it, or use "
                "ResilientEngine.stream()"
            )
        if not _is_async_callable(fn):
            raise TypeError(
                f"@resilient needs an async function (async def); got {fn!r}, which is synchronous"
            )
        invoke = self._invoke
        label = self._name or _instrument._qualified_name(fn)  # named once, for telemetry

        @functools.wraps(fn)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            return await invoke(fn, args, kwargs, label)

        guarded.__resilient_policy__ = self  # type: ignore[attr-defined]
        return guarded

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under this policy."""
        return cast("T", await self._invoke(fn, args, kwargs))

    # -- the machinery -------------------------------------------------------------------

    async def _invoke_if_waiting(
        self,
        start: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        label: Any,
        target: DatabaseTarget | None,
        statement: Any,
    ) -> Any:
        """Run ``start(*args)`` under the policy only if it has to wait.

        For calls whose success says nothing about the database (``traffic=False``:
        the engine's pool checkouts). ``start`` first runs outside the policy up to
        its first wait. A warm pool answers a checkout from memory, without any
        I/O: nothing could hang, a success would be ignored by the breaker and
        deposit nothing, so a guard would only cost time — that result is returned
        as it is. If it waits (connecting, a pre-ping, a pool with no idle
        connection), the rest of it is the first attempt of an ordinary guarded
        call: timed, counted by the breaker, retried afresh. A failure before any
        wait is that first attempt's failure, counted and retried the same way.

        Taken only when nothing would tell the difference: no instrumentation
        hooks active (they see every checkout as an operation), no bulkhead (an
        attempt takes a slot), the breaker closed (open, it must reject; half-open,
        a checkout takes a probe slot), and no deadline around the call (an expired
        one must fail before anything starts).
        """
        if _STATE.recheck_at <= _monotonic():
            _instrument.refresh_instrumentation()
        scope = _get_scope()
        breaker = self._breaker
        if (
            self._unguarded_start
            and not _STATE.active
            and (scope is None or (not scope.in_call and scope.deadline_at is None))
            and (breaker is None or breaker._state is _CLOSED)  # type: ignore[attr-defined]
        ):
            stepped = _stepped(start(*args))
            try:
                waiting = stepped.send(None)
            except Exception as exc:
                rest = _Continuation(start, _failed(exc))
            else:
                if waiting is _FINISHED:
                    # Done without waiting: resuming it hands the result over.
                    return await stepped
                rest = _Continuation(start, _Resumed(stepped, waiting))
            try:
                return await self._invoke(rest, args, {}, label, target, statement)
            finally:
                rest.close()
        return await self._invoke(start, args, {}, label, target, statement)

    async def _invoke(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        label: Any = None,
        target: DatabaseTarget | None = None,
        statement: Any = _NO_STATEMENT,
        again: _Again | None = None,
        timed: ConnectionTimer | None = None,
    ) -> Any:
        """Run ``fn`` under the policy. ``label``, ``target`` and ``statement`` only
        describe the operation to instrumentation (the engine wrapper passes them).
        ``again``: what the attempts after the first call instead, as
        ``again(fn, *args, **kwargs)`` (the engine's statements retried alone roll
        back what the failed attempt left first); it may still refuse a retry once
        the first attempt failed (see :class:`_Again`). ``timed``: the connection
        every attempt runs on, when it is known — a single statement's: it is then
        the attempts' timer (:class:`ConnectionTimer`), with no timer object for the
        attempt and nothing for the dialect to register (nothing may nest in such
        an attempt)."""
        outer = _get_scope()
        if outer is not None and outer.in_call:
            return await self._invoke_nested(outer, fn, args, kwargs)
        clock = self._clock
        start = clock()
        deadline_at = None
        if self._timeouts.deadline is not None:
            deadline_at = start + self._timeouts.deadline
        if outer is not None and outer.deadline_at is not None:
            # Inside a bare `deadline()` block: share what is left of it.
            remaining = outer.deadline_at - outer.clock()
            if deadline_at is None or start + remaining < deadline_at:
                deadline_at = start + remaining
        scope = CallScope(clock, deadline_at, True, AttemptState(), 1, self._guards)
        token = _set_scope(scope)
        if _STATE.recheck_at <= _monotonic():
            _instrument.refresh_instrumentation()
        if label is None:
            label = self._name or fn
        op: _Operation | None = None
        try:
            if _STATE.active:
                op = _instrument.begin(scope, clock, start, label, target, statement)
            budget = self._deposits
            if budget is not None:
                budget.deposit()
            try:
                if op is None:
                    result = await self._attempt(
                        scope, self._breaker, self._bulkhead, fn, args, kwargs, timed
                    )
                else:
                    result = await self._observed_attempt(
                        op, scope, self._breaker, self._bulkhead, fn, args, kwargs, timed
                    )
            except BaseException as exc:
                # The failure path only: name the operation as its spans are named.
                name = op.name if op is not None else describe(label, target, statement)[0]
                if isinstance(exc, _EXIT_EXCEPTIONS):
                    self._warn_cancelled_commit(scope, name)
                    raise
                retry, reason = self._should_retry(scope, exc)
                if retry and again is not None:
                    refusal = again.refuses(statement, kwargs)
                    if refusal is not None:
                        exc.add_note(f"resilient_db: not retried: {refusal}")
                        retry = False
                if not retry:
                    self._raise_final(scope, exc, name)
                failure = exc
            else:
                if op is not None:
                    op.ended(scope, None)
                return result
            if again is not None:
                fn = functools.partial(again, fn)
            result = await self._retry_after(
                scope, failure, reason, fn, args, kwargs, start, name, timed
            )
            if op is not None:
                op.ended(scope, None)
            return result
        except BaseException as exc:
            if op is not None:
                op.ended(scope, exc)
            raise
        finally:
            _reset_scope(token)
            scope.end()

    async def _observed_attempt(
        self,
        op: _Operation,
        scope: CallScope,
        breaker: BreakerProtocol | None,
        bulkhead: Bulkhead | None,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timed: ConnectionTimer | None = None,
    ) -> Any:
        """:meth:`_attempt`, reported to the instrumentation hooks."""
        op.attempt_started(scope, breaker, self._retry.budget)
        started = self._clock()
        try:
            result = await self._attempt(scope, breaker, bulkhead, fn, args, kwargs, timed)
        except BaseException as exc:
            op.attempt_ended(scope, started, exc)
            raise
        op.attempt_ended(scope, started, None)
        return result

    async def _attempt(
        self,
        scope: CallScope,
        breaker: BreakerProtocol | None,
        bulkhead: Bulkhead | None,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timed: ConnectionTimer | None = None,
    ) -> Any:
        """One attempt: breaker → bulkhead → timeout → call (``timed``: see
        :meth:`_invoke`)."""
        timeouts = self._timeouts
        if scope.deadline_at is None:
            limit, by_deadline = timeouts.timeout, False
        else:
            limit, by_deadline = timeouts.attempt_limit(scope, scope.attempt_number)
        permit = 0
        if breaker is not None:
            try:
                permit = breaker.acquire()
            except CircuitOpenError as exc:
                _instrument.breaker_rejected(scope, exc)
                raise
        clock = self._clock
        if bulkhead is not None and not bulkhead.try_acquire():
            acquired = False
            try:
                await bulkhead.acquire(scope.remaining())
                acquired = True
                if scope.deadline_at is not None:
                    # Queueing used part of the budget: recompute the attempt's share
                    # (raises DeadlineExceeded when the slot came too late).
                    limit, by_deadline = timeouts.attempt_limit(scope, scope.attempt_number)
            except BaseException:
                if acquired:
                    bulkhead.release()
                if breaker is not None:
                    breaker.record(permit, BreakerOutcome.IGNORED, 0.0)
                raise
        start = clock()
        try:
            if limit is None:
                result = await fn(*args, **kwargs)
            else:
                # The attempt timer: when the limit is reached, first abort the driver
                # I/O in flight (so the driver fails fast instead of SQLAlchemy waiting
                # on a graceful close), and cancel the task only if nothing was in
                # flight or the driver did not give up within ABORT_GRACE.
                timer = (
                    AttemptTimer(scope.attempt, limit, start)
                    if timed is None
                    else timed._arm_timer(limit)
                )
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    if timer._settle_timer(exc):
                        raise timeouts.expired(limit, by_deadline, scope.attempt_number) from exc
                    raise
                timer._settle_timer(None)
        except BaseException as exc:
            if breaker is not None:
                outcome = BreakerOutcome.IGNORED  # should the classifier itself fail
                try:
                    outcome = breaker_outcome(resolve(self._classifier, exc))
                    if outcome is BreakerOutcome.SUCCESS:
                        outcome = self._success  # no sign of ill health: as a success
                finally:
                    # Always give the permit back: a half-open probe slot never
                    # returned would keep the breaker half-open, rejecting, for good.
                    breaker.record(permit, outcome, clock() - start)
            raise
        else:
            if breaker is not None:
                breaker.record(permit, self._success, clock() - start)
            return result
        finally:
            if bulkhead is not None:
                bulkhead.release()

    async def _invoke_nested(
        self,
        outer: CallScope,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """A guarded call inside another: one attempt, errors go to the outer unit."""
        breaker = self._breaker if self._breaker not in outer.guards else None
        bulkhead = self._bulkhead if self._bulkhead not in outer.guards else None
        deadline_at = outer.deadline_at
        if self._timeouts.deadline is not None:
            own = self._clock() + self._timeouts.deadline
            if deadline_at is None or own < deadline_at:
                deadline_at = own
        if breaker is None and bulkhead is None and deadline_at == outer.deadline_at:
            return await self._attempt(outer, None, None, fn, args, kwargs)
        scope = CallScope(
            outer.clock if deadline_at == outer.deadline_at else self._clock,
            deadline_at,
            True,
            outer.attempt,
            outer.attempt_number,
            (*outer.guards, breaker, bulkhead),
            outer.top(),
        )
        token = _set_scope(scope)
        try:
            return await self._attempt(scope, breaker, bulkhead, fn, args, kwargs)
        finally:
            _reset_scope(token)
            scope.end()

    def _should_retry(self, scope: CallScope, exc: BaseException) -> tuple[bool, str]:
        """Decide on a failed attempt. May stash a replacement error on the scope."""
        verdict = resolve(self._classifier, exc)
        reason = f"{type(exc).__name__} ({verdict.reason})"
        unsafe = scope.attempt.unsafe_commits()
        if (
            unsafe
            and not self.idempotent
            and (
                verdict.retryable
                or verdict.category
                in (ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT, ErrorCategory.CANCELLED)
            )
        ):
            scope.attempt.replacement = _commit_unknown(scope, unsafe, exc)
            return False, reason + "; a COMMIT was sent during the attempt: not retried"
        breaker = self._breaker
        if (
            verdict.retryable
            and isinstance(breaker, CircuitBreaker)
            and breaker.state is BreakerState.OPEN
        ):
            # This failure tripped the breaker (or it opened meanwhile): a retry would
            # only be rejected. The caller gets its own error, not CircuitOpenError.
            return False, reason + "; the breaker is open: not retried"
        return verdict.retryable, reason

    async def _retry_after(
        self,
        scope: CallScope,
        failure: BaseException,
        first_reason: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        start: float,
        name: str,
        timed: ConnectionTimer | None = None,
    ) -> Any:
        breaker, bulkhead = self._breaker, self._bulkhead
        op = _instrument._current_operation(scope)

        async def attempt() -> Any:
            scope.attempt = AttemptState()
            if op is None:
                return await self._attempt(scope, breaker, bulkhead, fn, args, kwargs, timed)
            return await self._observed_attempt(
                op, scope, breaker, bulkhead, fn, args, kwargs, timed
            )

        def should_retry(exc: BaseException, attempt_number: int) -> tuple[bool, str]:
            if attempt_number == 1:
                return True, first_reason  # decided already, before building tenacity
            return self._should_retry(scope, exc)

        def on_retry(attempt: int, delay: float, exc: BaseException, reason: str) -> None:
            _instrument.retry_scheduled(
                scope, name, attempt, delay, exc, reason, self._retry.budget
            )

        try:
            return await self._retry.run(
                scope, failure, attempt, should_retry, started=start, on_retry=on_retry
            )
        except BaseException as exc:
            if isinstance(exc, _EXIT_EXCEPTIONS):
                self._warn_cancelled_commit(scope, name)
                raise
            self._raise_final(scope, exc, name)

    def _raise_final(self, scope: CallScope, exc: BaseException, name: str = "call") -> NoReturn:
        """Raise the error the caller gets: the original, or CommitOutcomeUnknown."""
        replacement = scope.attempt.replacement
        scope.attempt.replacement = None
        if replacement is None:
            if isinstance(exc, CommitOutcomeUnknown):
                _instrument.commit_outcome_unknown(
                    scope, name, exc, exc.__cause__ or exc.__context__
                )
            raise exc
        _instrument.commit_outcome_unknown(scope, name, replacement, exc)
        raise replacement from exc

    def _warn_cancelled_commit(self, scope: CallScope, name: str = "call") -> None:
        if scope.attempt.unsafe_commits():
            _instrument.commit_outcome_unknown(scope, name, None, None, cancelled=True)


class _Again(Protocol):
    """What runs a call's attempts after the first (see :meth:`Policy._invoke`)."""

    def __call__(
        self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
    ) -> Awaitable[Any]: ...

    def refuses(self, statement: Any, kwargs: Mapping[str, Any]) -> str | None:
        """Why the call must not run again after all, judged once its first attempt
        failed with a retryable error (a check too costly for every call); ``None``
        to retry."""
        ...


class _Continuation:
    """The attempts of a call started outside the policy (see
    :meth:`Policy._invoke_if_waiting`): the first is ``first`` — the rest of the
    coroutine that had to wait, or the error it failed with before waiting; later
    attempts start afresh."""

    __slots__ = ("_first", "_start")

    def __init__(
        self,
        start: Callable[..., Coroutine[Any, Any, Any]],
        first: Coroutine[Any, Any, Any] | _Resumed,
    ) -> None:
        self._start = start
        self._first: Coroutine[Any, Any, Any] | _Resumed | None = first

    def close(self) -> None:
        """Should the policy fail before the first attempt, close what waits."""
        if self._first is not None:
            self._first.close()
            self._first = None

    def __call__(self, *args: Any) -> Awaitable[Any]:
        first = self._first
        if first is None:
            return self._start(*args)
        self._first = None
        return first


async def _failed(error: Exception) -> NoReturn:
    raise error


_FINISHED: Final = object()
"""What :func:`_stepped` yields once the coroutine it runs has returned."""


@types.coroutine
def _stepped(coro: Coroutine[Any, Any, T]) -> Generator[Any, Any, T]:
    """Run ``coro``, then yield :data:`_FINISHED` before returning its result.

    Sending ``None`` into it tells, without an exception, whether ``coro`` finished
    before its first wait (the send returns ``_FINISHED``; awaiting the generator
    then returns the result at once) or waited (the send returns what it waits on).
    Taking a coroutine's first step with ``coro.send(None)`` directly raises
    ``StopIteration`` when it finishes: an exception, a traceback and a frame
    object for every checkout a warm pool answers. Only awaited inside our own
    coroutines (on 3.12+ a task will not run a generator, and it has no
    ``__await__``)."""
    result: T = yield from coro  # allowed: a types.coroutine may delegate to a coroutine
    yield _FINISHED
    return result  # (not `cast(...)`: a function call at every checkout)


class _Resumed:
    """Awaiting it continues a :func:`_stepped` coroutine that was sent ``None``
    once and yielded ``waiting``: the same as having awaited the coroutine inside
    from the start (what the task sends or throws in goes to it; closing closes
    it)."""

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._waiting
        self._waiting = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, or what the task throws in
                try:
                    value = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value
            if value is _FINISHED:
                try:
                    coro.send(None)
                except StopIteration as done:
                    return done.value


def _commit_unknown(
    scope: CallScope, unsafe: list[Any], exc: BaseException
) -> CommitOutcomeUnknown:
    ambiguous = [r for r in unsafe if r.status is CommitStatus.AMBIGUOUS]
    xid = next((r.xid for r in unsafe if r.xid is not None), None)
    if ambiguous:
        what = "the COMMIT was interrupted"
    else:
        what = "a COMMIT was sent during the attempt and the attempt then failed"
    return CommitOutcomeUnknown(
        f"{what} ({type(exc).__name__}: {exc}); its work may be durable, so the unit was "
        "not retried — make it idempotent (idempotent=True with an idempotency key) or "
        "verify the outcome (ResilientEngine(verify_commits=True))",
        xid=xid,
    )


def _resolve_breaker(
    breaker: BreakerProtocol | str | Literal[False] | _Default,
) -> BreakerProtocol | None:
    if isinstance(breaker, _Default):
        return get_breaker("default")
    if breaker is False:
        return None
    if isinstance(breaker, str):
        return get_breaker(breaker)
    if isinstance(breaker, CircuitBreaker):
        return breaker
    if callable(getattr(breaker, "acquire", None)) and callable(getattr(breaker, "record", None)):
        return breaker
    raise TypeError(
        "breaker must be a CircuitBreaker (or adapter), the name of a shared breaker, "
        f"or False; got {breaker!r}"
    )


def _resolve_bulkhead(bulkhead: Bulkhead | int | None) -> Bulkhead | None:
    if bulkhead is None or isinstance(bulkhead, Bulkhead):
        return bulkhead
    if isinstance(bulkhead, int) and not isinstance(bulkhead, bool):
        return Bulkhead(v.integer("bulkhead", bulkhead, minimum=1))
    raise TypeError(
        f"bulkhead must be a Bulkhead, an int (max concurrent calls), or None; got {bulkhead!r}"
    )


def resilient(
    *,
    timeout: v.Seconds | None = None,
    deadline: v.Seconds | None = None,
    retries: int = 3,
    backoff: Backoff | Mapping[str, Any] | None = None,
    breaker: BreakerProtocol | str | Literal[False] | _Default = DEFAULT,
    bulkhead: Bulkhead | int | None = None,
    classifier: Classifier | None = None,
    idempotent: bool = False,
    retry_budget: RetryBudget | _Default | None = DEFAULT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    name: str | None = None,
) -> Policy:
    """Guard an async repository method with timeouts, retries and a circuit breaker.

    Always called with parentheses and keyword arguments; everything is validated
    here, at decoration time. See :class:`Policy` for the arguments.

    Example::

        class OrderRepo:
            @resilient(timeout=2, retries=3)
            async def place(self, order_id: str, amount: int) -> None:
                async with self.sessionmaker.begin() as s:
                    await s.execute(insert(orders).values(id=order_id, amount=amount))

    Each attempt gets 2 s; errors that are safe to retry are retried up to 3 times
    with jittered exponential backoff; the shared ``"default"`` breaker guards the
    database; anything else reaches the caller as the original database error.
    """
    return Policy(
        timeout=timeout,
        deadline=deadline,
        retries=retries,
        backoff=backoff,
        breaker=breaker,
        bulkhead=bulkhead,
        classifier=classifier,
        idempotent=idempotent,
        retry_budget=retry_budget,
        clock=clock,
        sleep=sleep,
        name=name,
    )
