"""Correlation IDs: one thread from an HTTP request to the database attempts it caused.

The current ID lives in a contextvar, so it follows the request through every
``await`` and into the tasks it creates. Where an ID comes from, in order:

1. the one set with :func:`correlation_context` (or by :class:`CorrelationIdMiddleware`
   from the request's ``X-Request-ID`` / ``traceparent``);
2. inside a guarded call, the one the call generated for itself (stable for all
   its attempts, its log lines and its transactions);
3. the active trace's ID (32 hex digits) when a span context is active;
4. a new random 128-bit ID (32 hex digits).

Nothing is generated until something asks: a guarded call with tracing off and
nobody reading the ID pays nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

from opentelemetry import trace

from ._scope import _get_scope

__all__ = ["correlation_context", "current_correlation_id"]

_CORRELATION_ID: ContextVar[str | None] = ContextVar("resilient_db_correlation_id", default=None)

MAX_LENGTH: Final = 200
"""Longest correlation ID accepted from code (IDs from HTTP headers: see the middleware)."""


def new_correlation_id() -> str:
    """A new random 128-bit correlation ID, as 32 lowercase hex digits.

    ``random`` (re-seeded in forked children by Python itself) rather than
    ``secrets``: an ID has to be unique, not unguessable, and this is 3× cheaper.
    """
    return f"{random.getrandbits(128):032x}"


def _trace_id() -> str | None:
    """The active trace's ID, when there is a valid span context."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return f"{context.trace_id:032x}"
    return None


def _lookup(generate: bool) -> str | None:
    """The current correlation ID; ``generate=False``: ``None`` rather than a random one
    outside any call (for log filters, where a fresh ID per line would mislead)."""
    value = _CORRELATION_ID.get()
    if value is not None:
        return value
    scope = _get_scope()
    if scope is not None and scope.in_call:
        root = scope.top()
        value = root.correlation_id
        if value is None:
            value = root.correlation_id = _trace_id() or new_correlation_id()
        return value
    value = _trace_id()
    if value is None and generate:
        return new_correlation_id()
    return value


def current_correlation_id() -> str:
    """The correlation ID of the code running now.

    The ID set by :func:`correlation_context` (or the ASGI middleware); inside a
    guarded call with none set, the ID that call generated for itself (the same for
    all its attempts and log lines); otherwise the active trace's ID; otherwise a
    new random ID — not remembered: use :func:`correlation_context` to pin one.

    >>> with correlation_context("req-42"):
    ...     current_correlation_id()
    'req-42'
    """
    value = _lookup(True)
    assert value is not None
    return value


def _check(correlation_id: object) -> str:
    if not isinstance(correlation_id, str):
        raise TypeError(
            f"correlation_id must be a str or None; got {type(correlation_id).__name__} "
            f"{correlation_id!r}"
        )
    if not correlation_id or len(correlation_id) > MAX_LENGTH or not correlation_id.isprintable():
        raise ValueError(
            f"correlation_id must be 1 to {MAX_LENGTH} printable characters (it goes into "
            f"log lines and PostgreSQL's application_name); got {correlation_id!r}"
        )
    return correlation_id


@contextmanager
def correlation_context(correlation_id: str | None = None) -> Iterator[str]:
    """Set the correlation ID for everything inside the block (yields the ID).

    With no argument, a new ID is generated: the active trace's ID when a span
    context is active, else a random 128-bit hex string. A plain ``with`` works in
    async code too; tasks created inside inherit the ID.

    Example::

        with correlation_context(job.id):
            await repo.settle(job)   # spans, log lines, application_name carry job.id
    """
    value = (
        (_trace_id() or new_correlation_id()) if correlation_id is None else _check(correlation_id)
    )
    token = _CORRELATION_ID.set(value)
    try:
        yield value
    finally:
        _CORRELATION_ID.reset(token)
