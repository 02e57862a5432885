"""Just enough of the PostgreSQL wire protocol (v3) for a fault-injecting proxy.

The proxy never decodes rows: it finds message *boundaries* in each byte stream,
and reads the bodies of the few messages it acts on. Framing, in both directions:

* the client's first packet has no type byte: ``int32 length`` (itself included),
  then ``int32 code`` — protocol 3.0 (``196608``), ``SSLRequest``,
  ``GSSENCRequest`` or ``CancelRequest``. The server answers an ``SSLRequest`` or
  ``GSSENCRequest`` with a *single byte*, ``S``/``G`` (encryption follows: the
  proxy can no longer read the stream) or ``N`` (the client goes on in clear);
* every later message is ``byte type`` + ``int32 length`` (itself included, the
  type byte not) + body.

Client messages read here: ``Q`` Query (simple protocol, one reply cycle ending
in ``Z``), and the extended protocol ``P`` Parse, ``B`` Bind, ``D`` Describe,
``E`` Execute, ``C`` Close, ``H`` Flush, ``S`` Sync (each ``S`` gets one ``Z``).
Server messages read here: ``Z`` ReadyForQuery, whose status byte is the
transaction state (``I`` idle, ``T`` in a transaction, ``E`` in a failed one).
"""

from __future__ import annotations

import re
import struct
from typing import Final, NamedTuple

__all__ = [
    "CANCEL_REQUEST",
    "GSSENC_REQUEST",
    "SINGLE_BYTE",
    "SSL_REQUEST",
    "STARTUP",
    "Frame",
    "FrameScanner",
    "counts_as_query",
    "error_response",
    "is_commit",
    "parse_bind",
    "parse_execute",
    "parse_parse",
    "parse_query",
    "ready_for_query",
    "startup_code",
]

SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102

STARTUP: Final = 0
"""Pseudo type of the untyped first packets (startup, SSLRequest, CancelRequest)."""
SINGLE_BYTE: Final = -1
"""Pseudo type of the server's one-byte answer to an SSLRequest/GSSENCRequest."""

_MAX_STARTUP: Final = 10_000
_MAX_MESSAGE: Final = 1 << 30
_CAPTURE_LIMIT: Final = 64 * 1024
"""Bodies kept for inspection are cut here (a huge INSERT's text is not needed whole)."""


class Frame(NamedTuple):
    """One complete message found in a chunk."""

    type: int
    """The type byte (``ord("Q")``...), :data:`STARTUP` or :data:`SINGLE_BYTE`."""
    end: int
    """Offset just past the message's last byte, in the chunk that completed it."""
    body: bytes | None
    """The body (after the length), when its type was asked for; may be cut."""


class FrameScanner:
    """Incremental message splitter for one direction of one connection.

    ``feed`` takes each chunk as it arrives and returns the messages it completes;
    bodies are copied only for the types in ``capture``. When the bytes cannot be
    PostgreSQL (an impossible length), ``broken`` turns true and the owner stops
    looking.
    """

    __slots__ = (
        "_body",
        "_capture",
        "_header",
        "_remaining",
        "_single",
        "_startup",
        "_type",
        "broken",
    )

    def __init__(self, *, startup: bool, capture: frozenset[int]) -> None:
        self._startup = startup
        self._capture = capture
        self._header = b""
        self._remaining = -1  # -1: reading a header; else body bytes still to come
        self._type = 0
        self._body: bytearray | None = None
        self._single = False
        self.broken = False

    @property
    def mid_message(self) -> bool:
        """Part of a message has been seen and its end has not."""
        return self._remaining >= 0 or bool(self._header)

    def expect_single_byte(self) -> None:
        """The next byte is a bare answer to an SSLRequest/GSSENCRequest."""
        self._single = True

    def feed(self, data: bytes) -> list[Frame]:
        """Scan one chunk; return the messages it completes, in order."""
        frames: list[Frame] = []
        if self.broken:
            return frames
        pos = 0
        size = len(data)
        while pos < size:
            if self._remaining < 0:
                if self._single and not self._header:
                    self._single = False
                    pos += 1
                    frames.append(Frame(SINGLE_BYTE, pos, data[pos - 1 : pos]))
                    continue
                header_size = 4 if self._startup else 5
                need = header_size - len(self._header)
                piece = data[pos : pos + need]
                pos += len(piece)
                header = self._header + piece
                if len(header) < header_size:
                    self._header = header
                    break
                self._header = b""
                if self._startup:
                    kind = STARTUP
                    length = int.from_bytes(header, "big")
                    if not 8 <= length <= _MAX_STARTUP:
                        self.broken = True
                        return frames
                else:
                    kind = header[0]
                    length = int.from_bytes(header[1:5], "big")
                    if not 4 <= length <= _MAX_MESSAGE:
                        self.broken = True
                        return frames
                self._type = kind
                self._remaining = length - 4
                self._body = bytearray() if kind in self._capture else None
                if self._remaining == 0:
                    self._remaining = -1
                    frames.append(Frame(kind, pos, b"" if self._body is not None else None))
                    self._body = None
                continue
            take = min(self._remaining, size - pos)
            body = self._body
            if body is not None and len(body) < _CAPTURE_LIMIT:
                body += data[pos : pos + min(take, _CAPTURE_LIMIT - len(body))]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                self._remaining = -1
                kind = self._type
                frames.append(Frame(kind, pos, bytes(body) if body is not None else None))
                self._body = None
                if kind == STARTUP and body is not None and startup_code(bytes(body)) >> 16 == 3:
                    self._startup = False
        return frames


# -- reading bodies --------------------------------------------------------------------


def _cstring(body: bytes, start: int) -> tuple[str, int]:
    end = body.find(b"\x00", start)
    if end < 0:  # cut by the capture limit
        return body[start:].decode("utf-8", "replace"), len(body)
    return body[start:end].decode("utf-8", "replace"), end + 1


def startup_code(body: bytes) -> int:
    """The protocol version or request code of an untyped first packet."""
    if len(body) < 4:
        return -1
    return int.from_bytes(body[:4], "big")


def parse_query(body: bytes) -> str:
    """SQL text of a ``Q`` message."""
    return _cstring(body, 0)[0]


def parse_parse(body: bytes) -> tuple[str, str]:
    """``(statement name, SQL text)`` of a ``P`` message."""
    name, pos = _cstring(body, 0)
    return name, _cstring(body, pos)[0]


def parse_bind(body: bytes) -> tuple[str, str]:
    """``(portal name, statement name)`` of a ``B`` message."""
    portal, pos = _cstring(body, 0)
    return portal, _cstring(body, pos)[0]


def parse_execute(body: bytes) -> str:
    """Portal name of an ``E`` message."""
    return _cstring(body, 0)[0]


# -- building server messages -----------------------------------------------------------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_response(sqlstate: str, message: str, *, severity: str = "ERROR") -> bytes:
    """An ``ErrorResponse`` carrying ``sqlstate``, as the server would send it."""
    fields = b"".join(
        code + value.encode("utf-8").replace(b"\x00", b"") + b"\x00"
        for code, value in (
            (b"S", severity),
            (b"V", severity),
            (b"C", sqlstate),
            (b"M", message),
        )
    )
    return _message(b"E", fields + b"\x00")


def ready_for_query(status: str) -> bytes:
    """A ``ReadyForQuery`` with transaction status ``I``, ``T`` or ``E``."""
    return _message(b"Z", status.encode("ascii"))


# -- what a statement is ----------------------------------------------------------------

_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z]+")

_NOT_QUERIES: Final = frozenset(
    {
        # transaction control
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE",
        # session chatter of drivers and pools
        "SET",
        "SHOW",
        "RESET",
        "DISCARD",
        "DEALLOCATE",
        "LISTEN",
        "UNLISTEN",
    }
)
_INTROSPECTION = re.compile(
    r"pg_catalog\.|^\s*select\s+(current_schema|version)\s*\(\s*\)\s*;?\s*$",
    re.IGNORECASE,
)


def first_keyword(sql: str) -> str:
    """The statement's first keyword, upper-cased (comments and parentheses skipped)."""
    match = _LEADING_NOISE.match(sql)
    start = match.end() if match else 0
    word = _WORD.match(sql, start)
    return word.group(0).upper() if word else ""


def is_commit(sql: str) -> bool:
    """``COMMIT``/``END`` (``COMMIT PREPARED`` too): the statement that ends a transaction."""
    return first_keyword(sql) in ("COMMIT", "END")


def counts_as_query(sql: str) -> bool:
    """A statement that reads or writes data, as opposed to driver chatter.

    Not queries: transaction control (``BEGIN``, ``COMMIT``, ``ROLLBACK``,
    ``SAVEPOINT``...), session settings (``SET``, ``SHOW``, ``RESET``,
    ``DISCARD``, ``DEALLOCATE``, ``LISTEN``), an empty statement, and the
    introspection drivers run on their own (any statement that names
    ``pg_catalog.``, ``select current_schema()``, ``select version()``).
    Everything else counts — ``SELECT 1`` included.
    """
    keyword = first_keyword(sql)
    if not keyword or keyword in _NOT_QUERIES:
        return False
    return _INTROSPECTION.search(sql) is None
