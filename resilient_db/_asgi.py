"""An ASGI middleware that gives each HTTP request its correlation ID.

Plain ASGI 3: it works with FastAPI, Starlette, Quart or any ASGI app, and imports
none of them.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TypeAlias

from . import _validate as v
from ._correlation import correlation_context

__all__ = ["CorrelationIdMiddleware"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

_SAFE_ID: Final = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
"""What a client-supplied request ID may look like: it goes into log lines, span
attributes and PostgreSQL, so no spaces, quotes, control characters or megabytes."""
_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class CorrelationIdMiddleware:
    """Set the correlation ID for each HTTP (and WebSocket) request, and echo it back.

    The ID is, in order: the request's ``X-Request-ID`` header (when it looks like
    an ID: at most 128 characters of ``A-Z a-z 0-9 . _ : / + = @ -``; anything else
    is ignored, not trusted into logs), the trace ID of its W3C ``traceparent``
    header, the trace ID of the active span (a server instrumentation's), or a new
    random 128-bit ID. Every guarded call made while handling the request, every
    span and log record, and (opt-in) PostgreSQL's ``application_name`` carry it.

    Args:
        app: the ASGI application to wrap.
        header: the request and response header holding the ID.
        trust_incoming: use the client's header and ``traceparent`` (turn off at a
            public edge where clients must not choose IDs).
        echo: add the header, with the ID, to the response.

    Example (FastAPI or Starlette)::

        app = FastAPI()
        app.add_middleware(CorrelationIdMiddleware)
    """

    __slots__ = ("_header", "app", "echo", "header", "trust_incoming")

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = "X-Request-ID",
        trust_incoming: bool = True,
        echo: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application (a callable); got {app!r}")
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"header must be a valid HTTP header name; got {header!r}")
        self.app = app
        self.header = header
        self._header = header.lower().encode("latin-1")
        self.trust_incoming = v.boolean("trust_incoming", trust_incoming)
        self.echo = v.boolean("echo", echo)

    def _incoming(self, scope: Scope) -> str | None:
        request_id: bytes | None = None
        traceparent: bytes | None = None
        name: bytes
        value: bytes
        for name, value in scope.get("headers") or ():
            if name == self._header:
                request_id = value
            elif name == b"traceparent":
                traceparent = value
        if request_id is not None:
            text = request_id.decode("latin-1").strip()
            if _SAFE_ID.fullmatch(text):
                return text
        if traceparent is not None:
            match = _TRACEPARENT.fullmatch(traceparent.decode("latin-1").strip().lower())
            if match and match.group(1) != "0" * 32:
                return str(match.group(1))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with its correlation ID set."""
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = self._incoming(scope) if self.trust_incoming else None
        with correlation_context(incoming) as correlation_id:
            state = scope.get("state")
            if isinstance(state, MutableMapping):
                state["correlation_id"] = correlation_id  # request.state.correlation_id
            reply = send
            if self.echo:
                header = (self._header, correlation_id.encode("latin-1", errors="replace"))

                async def reply(message: Message) -> None:
                    if message.get("type") in ("http.response.start", "websocket.accept"):
                        headers = list(message.get("headers") or ())
                        if not any(name.lower() == self._header for name, _ in headers):
                            headers.append(header)
                        message["headers"] = headers
                    await send(message)

            await self.app(scope, receive, reply)
