"""Correlation IDs in log records, and resilient-db's own log lines.

Our log lines go to the ``resilient_db`` logger, one line each, with the details
as ``extra`` attributes of the record (``resilient_db_event``, ``correlation_id``,
``operation``, ...), so a JSON formatter gets them as fields:

=============================  =======  =============================================
event                          level    logged by
=============================  =======  =============================================
``retry_scheduled``            INFO     :class:`LoggingInstrumentation`
``commit_outcome_unknown``     ERROR    :class:`LoggingInstrumentation`
``breaker_rejected``           DEBUG    :class:`LoggingInstrumentation` (per call)
``breaker_transition``         WARNING  the breaker itself (INFO unless it opens)
=============================  =======  =============================================
"""

from __future__ import annotations

import logging
from typing import Any

from ._correlation import _lookup
from ._instrument import (
    AttemptEnded,
    AttemptStarted,
    BreakerRejected,
    InstrumentationEvent,
    OperationEnded,
    OperationStarted,
    RetryScheduled,
    UnknownCommitOutcome,
)

__all__ = ["CorrelationIdFilter", "LoggingInstrumentation"]

logger = logging.getLogger("resilient_db")


class CorrelationIdFilter(logging.Filter):
    """Give every log record a ``correlation_id`` attribute.

    The current correlation ID (see :func:`current_correlation_id`); outside any
    request, guarded call or trace, ``default``. Attach it to a handler, so that
    records from every logger get the attribute, then use it in the format::

        handler = logging.StreamHandler()
        handler.addFilter(CorrelationIdFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s [%(correlation_id)s] %(message)s"))

    Args:
        default: the value outside any correlation context (a fresh random ID per
            line would suggest a link where there is none).
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        if not isinstance(default, str):
            raise TypeError(f"default must be a str; got {default!r}")
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        """Set ``record.correlation_id``; never drops a record."""
        value = _lookup(False)
        record.correlation_id = self.default if value is None else value
        return True


class LoggingInstrumentation:
    """The log lines for retries, rejections and unknown COMMIT outcomes.

    Installed by default. It needs no per-operation callbacks (``enabled()`` is
    ``False``): the happy path logs nothing and costs nothing.
    """

    __slots__ = ()

    def enabled(self) -> bool:
        """Always ``False``: only the rare events are logged."""
        return False

    def operation_started(self, details: OperationStarted) -> Any:
        """Unused."""
        return None

    def attempt_started(self, operation: Any, details: AttemptStarted) -> Any:
        """Unused."""
        return None

    def attempt_ended(self, attempt: Any, details: AttemptEnded) -> None:
        """Unused."""

    def operation_ended(self, operation: Any, details: OperationEnded) -> None:
        """Unused."""

    def event(self, operation: Any, event: InstrumentationEvent) -> None:
        """Log one line for the event (breaker transitions are logged by the breaker)."""
        if isinstance(event, RetryScheduled):
            logger.info(
                "retrying %s in %.3fs after attempt %d failed: %s",
                event.operation,
                event.delay,
                event.attempt,
                event.reason,
                extra={
                    "resilient_db_event": "retry_scheduled",
                    "operation": event.operation,
                    "correlation_id": event.correlation_id,
                    "attempt": event.attempt,
                    "delay": event.delay,
                    "error_type": type(event.error).__name__,
                    "db_response_status_code": (
                        event.error_type if event.error_type[:1].isdigit() else None
                    ),
                    "retry_budget": event.retry_budget,
                },
            )
        elif isinstance(event, UnknownCommitOutcome):
            what = "was cancelled after sending a COMMIT" if event.cancelled else "failed"
            cause = "" if event.cause is None else f" ({event.cause}"
            if cause and event.status_code:
                cause += f" {event.status_code}"
            cause += ")" if cause else ""
            xid = "" if event.xid is None else f", transaction {event.xid}"
            status = "" if event.status is None else f" reported as {event.status!r}"
            logger.error(
                "%s %s%s: COMMIT outcome unknown%s%s; its work may be durable, not retried",
                event.operation,
                what,
                cause,
                xid,
                status,
                extra={
                    "resilient_db_event": "commit_outcome_unknown",
                    "operation": event.operation,
                    "correlation_id": event.correlation_id,
                    "error_type": event.cause,
                    "db_response_status_code": event.status_code,
                    "xid": event.xid,
                },
            )
        elif isinstance(event, BreakerRejected):
            logger.debug(
                "breaker %s rejected %s",
                event.breaker,
                event.operation or "a call",
                extra={
                    "resilient_db_event": "breaker_rejected",
                    "breaker": event.breaker,
                    "operation": event.operation,
                    "correlation_id": event.correlation_id,
                    "retry_after": event.retry_after,
                },
            )
