"""The errors resilient-db raises, in one tree.

Database errors themselves (``sqlalchemy.exc.DBAPIError`` and friends) are never
wrapped: when a call is not retried, or its retries run out, the caller gets the
original database error, with a note (``add_note``) saying what was tried. The
classes below are raised only for what resilient-db itself decided::

    Exception
    └── ResilienceError                  base of everything resilient-db raises itself
        ├── CircuitOpenError             the breaker rejected the call; nothing reached the database
        ├── BulkheadFull                 too many concurrent calls, and no room (or time) to queue
        ├── CommitOutcomeUnknown         a COMMIT was sent and its outcome could not be established
        ├── ConcurrentSessionUse         one session used by two tasks at once (also RuntimeError)
        └── TimeoutExceeded              a time limit of ours ran out (also builtin TimeoutError)
            ├── AttemptTimeout           one attempt ran past ``timeout``; retryable
            └── DeadlineExceeded         the overall ``deadline`` ran out; never retried

Because ``TimeoutExceeded`` subclasses the builtin ``TimeoutError``, code that
already catches ``TimeoutError`` (or ``asyncio.TimeoutError``, the same class)
keeps working.
"""

from __future__ import annotations

__all__ = [
    "AttemptTimeout",
    "BulkheadFull",
    "CircuitOpenError",
    "CommitOutcomeUnknown",
    "ConcurrentSessionUse",
    "DeadlineExceeded",
    "ResilienceError",
    "TimeoutExceeded",
]


class ResilienceError(Exception):
    """Base class of every error resilient-db raises on its own behalf."""


class CircuitOpenError(ResilienceError):
    """The circuit breaker is open (or half-open with all probes taken).

    The call was rejected before anything was sent to the database.

    Attributes:
        breaker: name of the breaker that rejected the call.
        retry_after: seconds until the breaker admits a probe call, or ``None``
            when that cannot be known (half-open with its probes in flight, or
            forced open by an operator).
    """

    def __init__(self, breaker: str, retry_after: float | None) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        detail = "no probe slot free" if retry_after is None else f"retry after {retry_after:.3f}s"
        super().__init__(f"circuit breaker {breaker!r} is open ({detail})")

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float | None]]:
        return (type(self), (self.breaker, self.retry_after))


class BulkheadFull(ResilienceError):
    """The bulkhead had no free slot and its queue was full or the wait timed out.

    Attributes:
        name: name of the bulkhead.
        max_concurrent: how many calls it lets run at once.
        max_queue: how many calls may wait for a slot.
    """

    def __init__(self, name: str, max_concurrent: int, max_queue: int, reason: str) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.reason = reason
        super().__init__(
            f"bulkhead {name!r} is full ({reason}; "
            f"max_concurrent={max_concurrent}, max_queue={max_queue})"
        )

    def __reduce__(self) -> tuple[type[BulkheadFull], tuple[str, int, int, str]]:
        return (type(self), (self.name, self.max_concurrent, self.max_queue, self.reason))


class CommitOutcomeUnknown(ResilienceError):
    """A COMMIT was sent and then the attempt failed, so the work may be durable.

    Retrying would risk doing the work twice (a duplicated payment), so the call
    is not retried. Either make the unit idempotent (an idempotency key written
    in the same transaction, see ``IdempotencyKey``) and pass ``idempotent=True``,
    or let the engine wrapper verify the outcome (``verify_commits=True``).

    The error that interrupted the commit is ``__cause__``.

    Attributes:
        xid: the PostgreSQL transaction id (``pg_current_xact_id()``) of the
            transaction whose COMMIT was interrupted, when it was captured.
        status: what verification said (``"in progress"``, ``None`` when the
            outcome was not verified).
    """

    def __init__(self, message: str, *, xid: int | None = None, status: str | None = None) -> None:
        self.xid = xid
        self.status = status
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_commit_outcome_unknown, (str(self), self.xid, self.status))


def _rebuild_commit_outcome_unknown(
    message: str, xid: int | None, status: str | None
) -> CommitOutcomeUnknown:
    return CommitOutcomeUnknown(message, xid=xid, status=status)


class ConcurrentSessionUse(ResilienceError, RuntimeError):
    """One session or connection was used by two tasks at the same time.

    A database connection runs one statement at a time; share the engine, not the
    session. Raised before anything is sent, instead of the driver's
    "another operation is in progress".
    """


class TimeoutExceeded(ResilienceError, TimeoutError):
    """A time limit set through resilient-db ran out.

    Attributes:
        timeout: the limit that applied, in seconds.
    """

    def __init__(self, message: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(message)

    def __reduce__(self) -> tuple[type[TimeoutExceeded], tuple[str, float]]:
        return (type(self), (str(self), self.timeout))


class AttemptTimeout(TimeoutExceeded):
    """One attempt ran longer than the per-attempt ``timeout``; it may be retried."""


class DeadlineExceeded(TimeoutExceeded):
    """The overall ``deadline`` of a call ran out; it is never retried.

    Also raised before an attempt that has no time left to run, so that no work
    is started that could not finish in time.
    """
