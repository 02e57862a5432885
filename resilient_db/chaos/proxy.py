"""A fault-injecting TCP proxy, Toxiproxy's toxics in pure asyncio, aware of PostgreSQL.

Put it between the code under test and the database, then break the network on
purpose::

    from resilient_db.chaos.proxy import ChaosProxy, Latency, FailFirstN

    with ChaosProxy("127.0.0.1:5432", seed=7) as proxy:
        engine = create_async_engine(proxy.proxied_url(database_url))
        proxy.add_toxic(Latency(latency=0.1, jitter=0.02, stream="downstream"))
        proxy.add_toxic(FailFirstN(n=3, sqlstate="40001"))
        proxy.kill("in_transaction", mode="rst")
        proxy.disable()                      # an outage: listener and connections closed
        ...

The proxy runs **its own event loop in a daemon thread**, so the delays it
injects are not distorted by the code under test (which may block its own loop);
every public method is thread-safe and may be called from sync or async code.
Methods that change the proxy return once the change is applied: they wait only
for the proxy's own loop, never for the network.

What it can do, beyond forwarding bytes:

* stream toxics (see :mod:`resilient_db.chaos._toxics`), per direction, with a
  toxicity decided per connection; added, updated and removed while connections
  are open, and applying to them at once;
* proxy-level faults: :meth:`ChaosProxy.disable` / :meth:`~ChaosProxy.enable`
  (an outage), :meth:`~ChaosProxy.refuse` (new connections refused, open ones
  kept), :meth:`~ChaosProxy.set_connect_delay`, :meth:`~ChaosProxy.half_open`
  (nothing forwarded either way, sockets kept open: a partition), and
  :meth:`~ChaosProxy.kill` of chosen live connections with FIN or RST;
* PostgreSQL awareness (``postgres=True``, the default; plain TCP is detected
  and forwarded blind): each connection's transaction state is read from the
  server's ``ReadyForQuery``, so :meth:`~ChaosProxy.kill` can pick the
  connections inside a transaction, and the toxics :class:`FailFirstN` and
  :class:`DropCommitAck` answer or swallow protocol messages. A session that
  negotiates TLS cannot be read: it is forwarded blind.

Reproducible: every random decision comes from a ``random.Random`` seeded with
``(seed, connection ordinal, toxic name)``, so a run replays the same decisions
given the same seed and the same order of connections. Each decision is kept in
:meth:`~ChaosProxy.fault_log`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeAlias, TypeVar

from .. import _validate as v
from ._http_api import ToxiproxyServer
from ._pgwire import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    SINGLE_BYTE,
    SSL_REQUEST,
    STARTUP,
    Frame,
    FrameScanner,
    counts_as_query,
    error_response,
    is_commit,
    parse_bind,
    parse_execute,
    parse_parse,
    parse_query,
    ready_for_query,
    startup_code,
)
from ._toxics import (
    CLOSE,
    TOXIC_TYPES,
    Bandwidth,
    DropCommitAck,
    DuplicateToxicError,
    FailFirstN,
    Latency,
    LimitData,
    PgToxic,
    ResetPeer,
    Segment,
    Slicer,
    SlowClose,
    Stage,
    Stream,
    StreamToxic,
    Timeout,
    Toxic,
    _number,
)

__all__ = [
    "TOXIC_TYPES",
    "Bandwidth",
    "ChaosProxy",
    "ConnectionInfo",
    "DropCommitAck",
    "FailFirstN",
    "FaultRecord",
    "Latency",
    "LimitData",
    "PgToxic",
    "ProxyStats",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stream",
    "StreamToxic",
    "Timeout",
    "Toxic",
    "ToxiproxyServer",
]

T = TypeVar("T")

KillMode: TypeAlias = Literal["fin", "rst"]
_CloseHow: TypeAlias = Literal["fin", "rst", "abort"]
Which: TypeAlias = (
    "Literal['all', 'in_transaction', 'idle'] | Callable[[ConnectionInfo], bool] | Iterable[int]"
)

_CONTROL_TIMEOUT: Final = 10.0
"""Seconds a control call waits for the proxy's loop before giving up."""
_HIGH_WATER: Final = 1 << 20
_LOW_WATER: Final = 1 << 18
_SLACK: Final = 1e-4
_STATEMENT_MEMORY: Final = 10_000


# -- what the proxy reports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One fault decision, as kept in :meth:`ChaosProxy.fault_log`.

    Attributes:
        at: seconds since the proxy started (monotonic clock).
        connection: the connection's ordinal (1 for the first accepted), 0 for
            proxy-wide actions.
        toxic: the toxic's name, or the proxy action (``"disable"``, ``"kill"``...).
        action: what was decided: ``"applies"``/``"spared"`` (toxicity),
            ``"delay"``, ``"drop"``, ``"reset"``, ``"close"``, ``"error"``...
        value: the number that goes with it (a delay in seconds, a byte count...).
    """

    at: float
    connection: int
    toxic: str
    action: str
    value: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A live connection through the proxy.

    Attributes:
        ordinal: 1 for the first connection the proxy accepted, then 2...
        client: the client's address.
        bytes_upstream: bytes received from the client.
        bytes_downstream: bytes received from the server.
        transaction_status: PostgreSQL's ``I`` (idle), ``T`` (in a transaction) or
            ``E`` (in a failed transaction), from the last ``ReadyForQuery``;
            ``None`` before the first one, or when the stream is not readable.
    """

    ordinal: int
    client: tuple[str, int]
    bytes_upstream: int
    bytes_downstream: int
    transaction_status: str | None

    @property
    def in_transaction(self) -> bool:
        """Inside a transaction block (``T`` or ``E``)."""
        return self.transaction_status in ("T", "E")


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters of one proxy since it was built.

    Attributes:
        connections_accepted: connections accepted from clients.
        connections_open: connections open now.
        bytes_upstream: bytes received from clients.
        bytes_downstream: bytes received from the upstream server.
        faults: how many times each toxic or proxy action fired, by name.
    """

    connections_accepted: int
    connections_open: int
    bytes_upstream: int
    bytes_downstream: int
    faults: Mapping[str, int]


# -- the loop thread -------------------------------------------------------------------


class _LoopThread:
    """An event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the loop and return its result (or raise its error)."""
        if self.in_loop():
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, in its thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(_CONTROL_TIMEOUT)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.in_loop():
            coro.close()
            raise RuntimeError("this ChaosProxy method cannot be called from the proxy's own loop")
        return self.submit(coro).result(_CONTROL_TIMEOUT)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # already stopped and closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop():
            self._thread.join(_CONTROL_TIMEOUT)


# -- one direction of one connection ---------------------------------------------------


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Pipe:
    """Bytes of one direction: stream toxics, then a queue released at each item's time."""

    __slots__ = (
        "close_reset",
        "closing",
        "dst",
        "last_ready",
        "link",
        "name",
        "queue",
        "queued",
        "src_paused",
        "stages",
        "timer",
    )

    def __init__(self, link: _Link, name: Stream, dst: asyncio.Transport | None) -> None:
        self.link = link
        self.name = name
        self.dst = dst
        self.stages: list[Stage] = []
        self.queue: deque[Segment] = deque()
        self.queued = 0
        self.last_ready = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.close_reset = False
        self.src_paused = False

    def _write(self, data: bytes) -> None:
        dst = self.dst
        if dst is not None and not dst.is_closing():
            dst.write(data)

    def push(self, data: bytes) -> None:
        """Bytes from the sending side (after the PostgreSQL layer)."""
        link = self.link
        if self.closing or link.closed or not data:
            return
        if (
            not self.stages
            and not self.queue
            and self.dst is not None
            and not link.proxy._half_open
        ):
            self._write(data)
            return
        segments: list[Segment] = [(link.loop.time(), data)]
        for stage in self.stages:
            segments = stage.process(segments)
            if not segments or link.closed:
                return
        self._enqueue(segments)

    def push_close(self, *, reset: bool) -> None:
        """The sending side closed (``reset``: with an error): close after the data."""
        link = self.link
        if self.closing or link.closed:
            return
        self.closing = True
        self.close_reset = reset
        ready = link.loop.time()
        for stage in self.stages:
            ready = stage.on_close(ready)
        self._enqueue([(ready, CLOSE)])

    def _enqueue(self, segments: list[Segment]) -> None:
        queue = self.queue
        last = self.last_ready
        for ready, data in segments:
            if ready < last:
                ready = last  # order is kept: nothing overtakes what came before it
            last = ready
            queue.append((ready, data))
            if isinstance(data, bytes):
                self.queued += len(data)
        self.last_ready = last
        if self.queued > _HIGH_WATER and not self.src_paused:
            self.src_paused = True
            self.link.pause_source(self)
        self.schedule()

    def schedule(self) -> None:
        """Arrange for the head of the queue to leave at its time."""
        link = self.link
        if self.timer is not None or not self.queue or link.closed or link.proxy._half_open:
            return
        ready, data = self.queue[0]
        if self.dst is None and isinstance(data, bytes):
            return  # the upstream connection is not open yet
        if ready <= link.loop.time() + _SLACK:
            self._flush()
        else:
            self.timer = link.loop.call_at(ready, self._flush)

    def _flush(self) -> None:
        self.timer = None
        link = self.link
        if link.closed or link.proxy._half_open:
            return
        queue = self.queue
        now = link.loop.time() + _SLACK
        while queue and queue[0][0] <= now:
            data = queue[0][1]
            if isinstance(data, bytes):
                if self.dst is None:
                    break
                queue.popleft()
                self.queued -= len(data)
                self._write(data)
            else:
                queue.popleft()
                link.close(f"{self.name} side closed", "rst" if self.close_reset else "fin")
                return
        if self.src_paused and self.queued < _LOW_WATER:
            self.src_paused = False
            link.resume_source(self)
        self.schedule()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


# -- the PostgreSQL layer ---------------------------------------------------------------

_Q, _P, _B, _D, _E, _C, _H, _S, _F, _Z = (ord(c) for c in "QPBDECHSFZ")
_EXTENDED: Final = frozenset({_P, _B, _D, _E, _C})
_SYNC: Final = b"S\x00\x00\x00\x04"

_SERVER, _INJECT, _REPLACE_Z, _DROP_RESET = "server", "inject", "replace_z", "drop_reset"


class _PgSession:
    """Reads one connection's PostgreSQL messages; answers and swallows some of them.

    Every reply cycle the client starts (startup, ``Query``, ``Sync``,
    ``FunctionCall``) ends with one ``ReadyForQuery`` from the server. The queue
    ``replies`` says, cycle by cycle, what to do with the server's answers:
    forward them (``server``), replace the final ``ReadyForQuery`` by an error
    (``replace_z``), drop them and reset (``drop_reset``), or send an answer of
    our own (``inject``) once the cycles before it are answered — so injected
    errors keep their place even for a client that pipelines.

    While a protocol toxic is armed, the extended-protocol messages of a cycle are
    held until its ``Sync``, to decide on the whole cycle at once. The rest of the
    time messages are only scanned, and bytes forwarded as they come.
    """

    __slots__ = (
        "carry",
        "client",
        "cycle_forwarded",
        "down_carry",
        "down_partial",
        "held",
        "link",
        "out",
        "portals",
        "raw",
        "replies",
        "server",
        "special",
        "started",
        "statements",
        "status",
        "up_partial",
    )

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.client = FrameScanner(startup=True, capture=frozenset({STARTUP, _Q, _P, _B, _E}))
        self.server = FrameScanner(startup=False, capture=frozenset({_Z, SINGLE_BYTE}))
        self.raw = False
        self.started = False
        self.status: str | None = None
        self.statements: dict[str, str] = {}
        self.portals: dict[str, str] = {}
        self.replies: deque[list[Any]] = deque()
        self.special = 0
        self.held: list[tuple[Frame, bytes]] = []
        self.carry = b""
        self.out = bytearray()
        self.cycle_forwarded = False
        self.up_partial = False
        self.down_carry = b""
        self.down_partial = False

    # -- bookkeeping --

    def _go_raw(self, reason: str) -> None:
        if self.raw:
            return
        self.raw = True
        self.status = None
        pending = b"".join(chunk for _, chunk in self.held) + self.carry
        self.held = []
        self.carry = b""
        if pending:
            self.link.up.push(pending)
        if self.down_carry:
            pending, self.down_carry = self.down_carry, b""
            self.link.down.push(pending)
        self.link.proxy._record(self.link.ordinal, "postgres", reason, fired=False)

    def _expect_server(self) -> None:
        replies = self.replies
        if replies and replies[-1][0] == _SERVER:
            replies[-1][1] += 1
        else:
            replies.append([_SERVER, 1])

    def _expect_special(self, kind: str, payload: bytes | str) -> None:
        self.replies.append([kind, payload])
        self.special += 1

    def _inject(self, data: bytes) -> None:
        if self.replies:
            self._expect_special(_INJECT, data)
        else:
            self.link.down.push(data)

    def _note_client(self, frame: Frame) -> None:
        kind = frame.type
        body = frame.body
        if kind in (_Q, _S, _F):
            self._expect_server()
        elif kind == _P and body is not None:
            name, sql = parse_parse(body)
            statements = self.statements
            if len(statements) >= _STATEMENT_MEMORY:
                del statements[next(iter(statements))]
            statements[name] = sql
        elif kind == _B and body is not None:
            portal, statement = parse_bind(body)
            self.portals[portal] = statement
        elif kind == STARTUP and body is not None:
            self.started = True
            code = startup_code(body)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                self.server.expect_single_byte()
            elif code >> 16 == 3:
                self._expect_server()
            elif code != CANCEL_REQUEST:
                self._go_raw("not postgres")

    def _intercepting(self) -> bool:
        budgets = self.link.proxy._budgets
        return any(budgets.get(toxic.name, 0) != 0 for toxic in self.link.pg_toxics)

    def _pick(self, statements: list[str]) -> PgToxic | None:
        """The first armed protocol toxic that wants this cycle; spends its budget."""
        proxy = self.link.proxy
        link = self.link
        for toxic in self.link.pg_toxics:
            left = proxy._budgets.get(toxic.name, 0)
            if left == 0:
                continue
            if isinstance(toxic, FailFirstN):
                wanted = any(
                    counts_as_query(sql)
                    and (toxic.match is None or re.search(toxic.match, sql, re.IGNORECASE))
                    for sql in statements
                )
            else:
                wanted = any(is_commit(sql) for sql in statements)
            if wanted:
                if left is not None:
                    proxy._budgets[toxic.name] = left - 1
                action = "error" if isinstance(toxic, FailFirstN) else "drop_ack"
                link.record(toxic.name, action, proxy._fired[toxic.name] + 1)
                return toxic
        return None

    @staticmethod
    def _status_after_error(status: str | None) -> str:
        return "E" if status in ("T", "E") else "I"

    # -- client → server --

    def from_client(self, data: bytes) -> None:
        up = self.link.up
        if self.raw:
            up.push(data)
            return
        frames = self.client.feed(data)
        if self.client.broken:
            self._go_raw("not postgres")
            up.push(data)
            return
        if not self.held and not self.carry and not self._intercepting():
            note = self._note_client
            for frame in frames:
                kind = frame.type
                if kind in _EXTENDED or kind == _H:
                    self.cycle_forwarded = True
                elif kind == _S:
                    self.cycle_forwarded = False
                note(frame)
            self.up_partial = self.client.mid_message
            up.push(data)
            return
        pos = 0
        for frame in frames:
            chunk = data[pos : frame.end]
            pos = frame.end
            if self.carry:
                chunk = self.carry + chunk
                self.carry = b""
            if self.up_partial:  # its beginning already went out: it cannot be held
                self.up_partial = False
                self._note_client(frame)
                self.out += chunk
                continue
            self._client_message(frame, chunk)
        rest = data[pos:]
        if rest:
            if self.up_partial:
                self.out += rest
            else:
                self.carry += rest
        if self.out:
            out = bytes(self.out)
            self.out.clear()
            up.push(out)

    def _forward_held(self) -> None:
        for _, chunk in self.held:
            self.out += chunk
        self.held = []

    def _client_message(self, frame: Frame, chunk: bytes) -> None:
        kind = frame.type
        if kind in _EXTENDED:
            self._note_client(frame)
            self.held.append((frame, chunk))
        elif kind == _H:
            # A Flush asks for answers before the Sync: what is held must go now.
            self._forward_held()
            self.out += chunk
            self.cycle_forwarded = True
        elif kind == _S:
            self._end_cycle(frame, chunk)
        elif kind == _Q:
            self._forward_held()
            self._simple_query(frame, chunk)
        else:
            self._forward_held()
            self._note_client(frame)
            self.out += chunk

    def _simple_query(self, frame: Frame, chunk: bytes) -> None:
        sql = parse_query(frame.body or b"")
        toxic = self._pick([sql])
        if isinstance(toxic, FailFirstN):
            error = error_response(toxic.sqlstate, toxic.message)
            self._inject(error + ready_for_query(self._status_after_error(self.status)))
            return
        self.out += chunk
        if isinstance(toxic, DropCommitAck):
            self._expect_special(_DROP_RESET, toxic.name)
        else:
            self._expect_server()

    def _end_cycle(self, sync: Frame, sync_chunk: bytes) -> None:
        held, self.held = self.held, []
        bound: dict[str, str] = {}
        executed: list[str] = []
        for frame, _ in held:
            if frame.type == _B and frame.body is not None:
                portal, statement = parse_bind(frame.body)
                bound[portal] = statement
            elif frame.type == _E and frame.body is not None:
                target = parse_execute(frame.body)
                named = bound.get(target, self.portals.get(target))
                sql = self.statements.get(named) if named is not None else None
                if sql is not None:
                    executed.append(sql)
        toxic = self._pick(executed) if executed else None
        if isinstance(toxic, FailFirstN):
            first_bind = next((i for i, (f, _) in enumerate(held) if f.type == _B), len(held))
            error = error_response(toxic.sqlstate, toxic.message)
            if first_bind or self.cycle_forwarded:
                # Parse/Describe before the first Bind still reach the server (the
                # client's statements must exist as it believes), and a Sync closes
                # the server's cycle; its ReadyForQuery is replaced by the error.
                for _, chunk in held[:first_bind]:
                    self.out += chunk
                self.out += _SYNC
                self._expect_special(_REPLACE_Z, error)
            else:
                self._inject(error + ready_for_query(self._status_after_error(self.status)))
        else:
            for _, chunk in held:
                self.out += chunk
            self.out += sync_chunk
            if isinstance(toxic, DropCommitAck):
                self._expect_special(_DROP_RESET, toxic.name)
            else:
                self._expect_server()
        self.cycle_forwarded = False

    # -- server → client --

    def _server_ready(self, frame: Frame) -> None:
        body = frame.body
        if body:
            self.status = chr(body[0])
        replies = self.replies
        if replies and replies[0][0] == _SERVER:
            replies[0][1] -= 1
            if replies[0][1] == 0:
                replies.popleft()

    def _single_byte(self, frame: Frame) -> None:
        if frame.body in (b"S", b"G"):
            self._go_raw("encrypted")

    def from_server(self, data: bytes) -> None:
        down = self.link.down
        if self.raw:
            down.push(data)
            return
        if not self.started:
            self._go_raw("server spoke first")
            down.push(data)
            return
        frames = self.server.feed(data)
        if self.server.broken:
            self._go_raw("not postgres")
            down.push(data)
            return
        if not self.special and not self.down_carry:
            for frame in frames:
                if frame.type == _Z:
                    self._server_ready(frame)
                elif frame.type == SINGLE_BYTE:
                    self._single_byte(frame)
            self.down_partial = self.server.mid_message
            down.push(data)
            return
        self._slow_server(data, frames)

    def _slow_server(self, data: bytes, frames: list[Frame]) -> None:
        out = bytearray()
        replies = self.replies
        reset: str | None = None
        pos = 0
        for frame in frames:
            chunk = data[pos : frame.end]
            pos = frame.end
            if self.down_carry:
                chunk = self.down_carry + chunk
                self.down_carry = b""
            partial, self.down_partial = self.down_partial, False
            head = replies[0] if replies else None
            kind = head[0] if head is not None else _SERVER
            if frame.type == SINGLE_BYTE:
                self._single_byte(frame)
                out += chunk
                continue
            if frame.type != _Z:
                if kind != _DROP_RESET or partial:
                    out += chunk
                continue
            if kind == _SERVER or head is None:
                out += chunk
                self._server_ready(frame)
            else:
                if frame.body:
                    self.status = chr(frame.body[0])
                replies.popleft()
                self.special -= 1
                if kind == _REPLACE_Z:
                    out += head[1] + ready_for_query(self._status_after_error(self.status))
                else:
                    reset = head[1]
            while replies and replies[0][0] == _INJECT:
                out += replies.popleft()[1]
                self.special -= 1
            if reset is not None:
                break
        rest = data[pos:]
        if rest and reset is None:
            if self.down_partial:
                out += rest
            else:
                self.down_carry += rest
        link = self.link
        if out:
            link.down.push(bytes(out))
        if reset is not None:
            # The COMMIT is durable now; the client hears nothing but a reset.
            link.proxy._record(link.ordinal, reset, "reset", fired=False)
            link.down.push_close(reset=True)


# -- one connection ----------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    toxic: Toxic
    rng: random.Random
    active: bool
    stage: Stage | None


class _Link:
    """One client connection and its upstream connection."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "closed",
        "down",
        "loop",
        "ordinal",
        "paused",
        "peer",
        "pg",
        "pg_toxics",
        "proxy",
        "server",
        "slots",
        "up",
    )

    def __init__(self, proxy: ChaosProxy, ordinal: int, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.loop = proxy._loop()
        self.ordinal = ordinal
        self.client = client
        self.server: asyncio.Transport | None = None
        peer = client.get_extra_info("peername")
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.up = _Pipe(self, "upstream", None)
        self.down = _Pipe(self, "downstream", client)
        self.slots: dict[str, _Slot] = {}
        self.pg_toxics: list[PgToxic] = []
        self.pg = _PgSession(self) if proxy.postgres else None
        self.closed = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.paused: dict[str, set[str]] = {"client": set(), "server": set()}

    # StageHost
    def record(self, toxic: str, action: str, value: float | None = None) -> None:
        self.proxy._record(self.ordinal, toxic, action, value)

    def close_link(self, reason: str) -> None:
        self.close(reason, "fin")

    def reset_link(self, reason: str) -> None:
        self.close(reason, "rst")

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(
            ordinal=self.ordinal,
            client=self.peer,
            bytes_upstream=self.bytes_up,
            bytes_downstream=self.bytes_down,
            transaction_status=self.pg.status if self.pg is not None else None,
        )

    # -- toxics --

    def sync_toxics(self) -> None:
        """Bring this connection's toxic runtimes in line with the proxy's toxics."""
        proxy = self.proxy
        toxics = proxy._toxics
        names = {toxic.name for toxic in toxics}
        dropped = [old for name, old in self.slots.items() if name not in names]
        for old in dropped:
            del self.slots[old.toxic.name]
        replaced: list[Stage] = []
        started: list[Stage] = []
        for toxic in toxics:
            slot = self.slots.get(toxic.name)
            if slot is not None and slot.toxic is toxic:
                continue
            if slot is not None and slot.stage is not None:
                replaced.append(slot.stage)
            rng = slot.rng if slot is not None else proxy._rng(self.ordinal, toxic.name)
            active = rng.random() < toxic.toxicity
            if 0.0 < toxic.toxicity < 1.0:
                proxy._record(
                    self.ordinal, toxic.name, "applies" if active else "spared", fired=False
                )
            stage = toxic.stage(self, rng) if active and isinstance(toxic, StreamToxic) else None
            self.slots[toxic.name] = _Slot(toxic, rng, active, stage)
            if stage is not None:
                started.append(stage)
        self.up.stages = self._stages("upstream")
        self.down.stages = self._stages("downstream")
        self.pg_toxics = [
            toxic
            for toxic in toxics
            if isinstance(toxic, PgToxic) and self.slots[toxic.name].active
        ]
        for stage in replaced:
            stage.stop()
        for stage in started:
            stage.start()
        for old in dropped:
            if old.stage is not None:
                old.stage.removed()
        if not self.closed:
            self.up.schedule()
            self.down.schedule()

    def _stages(self, stream: Stream) -> list[Stage]:
        stages: list[Stage] = []
        for toxic in self.proxy._toxics:
            if toxic.stream == stream:
                stage = self.slots[toxic.name].stage
                if stage is not None:
                    stages.append(stage)
        return stages

    # -- data --

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.proxy._bytes_up += len(data)
        if self.pg is not None:
            self.pg.from_client(data)
        else:
            self.up.push(data)

    def from_server(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.proxy._bytes_down += len(data)
        if self.pg is not None:
            self.pg.from_server(data)
        else:
            self.down.push(data)

    def server_connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.abort()
            return
        self.server = transport
        self.up.dst = transport
        self.up.schedule()

    def _transport(self, side: str) -> asyncio.Transport | None:
        return self.client if side == "client" else self.server

    def _pause(self, side: str, reason: str) -> None:
        reasons = self.paused[side]
        transport = self._transport(side)
        if not reasons and transport is not None and not transport.is_closing():
            transport.pause_reading()
        reasons.add(reason)

    def _resume(self, side: str, reason: str) -> None:
        reasons = self.paused[side]
        reasons.discard(reason)
        transport = self._transport(side)
        if not reasons and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def pause_source(self, pipe: _Pipe) -> None:
        self._pause("client" if pipe is self.up else "server", "queue")

    def resume_source(self, pipe: _Pipe) -> None:
        self._resume("client" if pipe is self.up else "server", "queue")

    def writing_paused(self, side: str, paused: bool) -> None:
        """``side``'s write buffer is full (or drained): pause the other side's reading."""
        other = "server" if side == "client" else "client"
        if paused:
            self._pause(other, "buffer")
        else:
            self._resume(other, "buffer")

    # -- ending --

    def close(self, reason: str, how: _CloseHow = "fin") -> None:
        """Close both sides: ``fin`` (orderly), ``rst`` (reset) or ``abort`` (at once)."""
        if self.closed:
            return
        self.closed = True
        for slot in self.slots.values():
            if slot.stage is not None:
                slot.stage.stop()
        self.up.stop()
        self.down.stop()
        for transport in (self.client, self.server):
            if transport is None:
                continue
            if how == "fin":
                transport.close()
            else:
                if how == "rst":
                    _set_linger_zero(transport)
                transport.abort()
        self.proxy._forget(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: ChaosProxy) -> None:
        self.proxy = proxy
        self.link: _Link | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy._transports.add(transport)
        self.link = self.proxy._accept(transport)

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.from_client(data)

    def eof_received(self) -> bool:
        if self.link is not None:
            self.link.up.push_close(reset=False)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._transports.discard(self.transport)
        if self.link is not None:
            self.link.up.push_close(reset=exc is not None)

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link.writing_paused("client", True)

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link.writing_paused("client", False)


class _ServerSide(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.proxy._transports.add(transport)
        self.link.server_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.link.from_server(data)

    def eof_received(self) -> bool:
        self.link.down.push_close(reset=False)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.proxy._transports.discard(self.transport)
        self.link.down.push_close(reset=exc is not None)

    def pause_writing(self) -> None:
        self.link.writing_paused("server", True)

    def resume_writing(self) -> None:
        self.link.writing_paused("server", False)


# -- the proxy ---------------------------------------------------------------------------


def _parse_address(name: str, value: object, *, default_host: str | None) -> tuple[str, int]:
    accepted = '"host:port" or a (host, port) tuple, port in [0, 65535]'
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{name} must be {accepted}; got {value!r}")
        host = host.strip("[]") or (default_host or "")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{name} must be {accepted}; got {value!r}") from None
    else:
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"{name} must be {accepted} with a host; got {value!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return host, port


def _parse_upstream(value: object) -> tuple[str, int]:
    address = _parse_address("upstream", value, default_host=None)
    if address[1] == 0:
        raise ValueError(f"upstream must name a port in [1, 65535]; got {value!r}")
    return address


def _selector(which: Which) -> Callable[[ConnectionInfo], bool]:
    if isinstance(which, str):
        if which == "all":
            return lambda info: True
        if which == "in_transaction":
            return lambda info: info.in_transaction
        if which == "idle":
            return lambda info: info.transaction_status == "I"
    elif callable(which):
        return which
    elif isinstance(which, Iterable):
        wanted = set(which)
        if all(isinstance(o, int) and not isinstance(o, bool) for o in wanted):
            return lambda info: info.ordinal in wanted
    raise ValueError(
        "which must be 'all', 'in_transaction', 'idle', a predicate on ConnectionInfo, "
        f"or connection ordinals; got {which!r}"
    )


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ChaosProxy:
    """A TCP proxy that injects faults, between a client and an upstream server.

    Args:
        upstream: where to forward, ``"host:port"`` or ``(host, port)``.
        listen: where to listen, ``"host:port"``; port 0 (the default) picks a free
            port, readable from :attr:`port` once started.
        name: for logs, thread names and the Toxiproxy-compatible API.
        seed: every random decision derives from it (see :meth:`fault_log`).
        toxics: toxics to start with.
        postgres: read the PostgreSQL protocol (transaction state, protocol toxics).
            Streams that are not PostgreSQL, or are encrypted, are forwarded blind.
        connect_delay: seconds to wait before opening each upstream connection.
        fault_log_size: how many fault records to keep (the oldest go first).

    Use it as a context manager, sync or async (or call :meth:`start` /
    :meth:`stop`)::

        async with ChaosProxy("127.0.0.1:5432") as proxy:
            engine = create_async_engine(proxy.proxied_url(url))
    """

    def __init__(
        self,
        upstream: str | tuple[str, int],
        *,
        listen: str | tuple[str, int] = "127.0.0.1:0",
        name: str = "proxy",
        seed: int = 0,
        toxics: Iterable[Toxic] = (),
        postgres: bool = True,
        connect_delay: float = 0.0,
        fault_log_size: int = 100_000,
    ) -> None:
        self._upstream = _parse_upstream(upstream)
        self._listen = _parse_address("listen", listen, default_host="127.0.0.1")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        self.name = name
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self.postgres = v.boolean("postgres", postgres)
        self._connect_delay = _number("connect_delay", connect_delay)
        v.integer("fault_log_size", fault_log_size, minimum=1)

        self._lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._toxics: tuple[Toxic, ...] = ()
        self._budgets: dict[str, int | None] = {}
        self._links: dict[int, _Link] = {}
        self._connecting: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()
        self._ordinal = 0
        self._enabled = True
        self._refusing = False
        self._half_open = False
        self._heal: asyncio.Event | None = None
        self._t0 = time.monotonic()
        self._log: deque[FaultRecord] = deque(maxlen=fault_log_size)
        self._fired: Counter[str] = Counter()
        self._bytes_up = 0
        self._bytes_down = 0
        for toxic in toxics:
            self.add_toxic(toxic)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ChaosProxy {self.name!r} {self.listen} -> {self.upstream} ({state})>"

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host the proxy listens on."""
        return self._listen[0]

    @property
    def port(self) -> int:
        """The port the proxy listens on (the real one once started, when 0 was asked)."""
        return self._listen[1]

    @property
    def listen(self) -> str:
        """``"host:port"`` the proxy listens on."""
        return _format_address(*self._listen)

    @property
    def upstream(self) -> str:
        """``"host:port"`` the proxy forwards to."""
        return _format_address(*self._upstream)

    def set_upstream(self, upstream: str | tuple[str, int]) -> None:
        """Forward new connections to ``upstream`` (open ones stay where they are)."""
        address = _parse_upstream(upstream)

        def run() -> None:
            self._upstream = address

        self._call(run)

    def set_listen(self, listen: str | tuple[str, int]) -> None:
        """Listen on another address from now on (open connections are kept)."""
        address = _parse_address("listen", listen, default_host="127.0.0.1")
        runner = self._runner
        if runner is None:
            self._listen = address
            return

        async def run() -> None:
            self._close_listener()
            self._listen = address
            if self._enabled and not self._refusing:
                await self._open_listener()

        runner.run(run())

    def proxied_url(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL or libpq-style DSN) with host and port of the proxy."""
        from sqlalchemy.engine import make_url

        if self.port == 0:
            raise RuntimeError("start the proxy first: its port is chosen when it starts")
        return (
            make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False)
        )

    # -- life cycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """The proxy's thread and loop are running."""
        return self._runner is not None

    def _loop(self) -> asyncio.AbstractEventLoop:
        runner = self._runner
        if runner is None:
            raise RuntimeError(f"proxy {self.name!r} is not running")
        return runner.loop

    def _begin_start(self) -> tuple[_LoopThread, concurrent.futures.Future[None]]:
        with self._lock:
            if self._runner is not None:
                raise RuntimeError(f"proxy {self.name!r} is already running")
            runner = self._runner = _LoopThread(f"chaos-proxy-{self.name}")
        return runner, runner.submit(self._astart())

    def _abandon(self, runner: _LoopThread) -> None:
        runner.stop()
        with self._lock:
            if self._runner is runner:
                self._runner = None

    def start(self) -> ChaosProxy:
        """Start listening (in the proxy's own thread); returns the proxy."""
        runner, future = self._begin_start()
        try:
            future.result(_CONTROL_TIMEOUT)
        except BaseException:
            self._abandon(runner)
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the proxy's thread."""
        runner = self._runner
        if runner is None:
            return
        try:
            runner.run(self._astop())
        finally:
            self._abandon(runner)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> ChaosProxy:
        runner, future = self._begin_start()
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            self._abandon(runner)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner = self._runner
        if runner is None:
            return
        try:
            await asyncio.wrap_future(runner.submit(self._astop()))
        finally:
            self._abandon(runner)  # the thread is finishing already: a short join

    async def _astart(self) -> None:
        self._heal = asyncio.Event()
        if not self._half_open:
            self._heal.set()
        if self._enabled and not self._refusing:
            await self._open_listener()

    async def _astop(self) -> None:
        self._close_listener()
        for link in list(self._links.values()):
            link.close("proxy stopped", "abort")
        tasks = list(self._connecting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in list(self._transports):  # still flushing an orderly close
            transport.abort()
        # Let the transports' connection_lost callbacks run before the loop ends.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _open_listener(self) -> None:
        if self._server is not None:
            return
        host, port = self._listen
        server = await self._loop().create_server(
            lambda: _ClientSide(self), host, port, reuse_address=True
        )
        self._server = server
        self._listen = (host, server.sockets[0].getsockname()[1])

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` where the proxy's state lives: its loop, or here when stopped."""
        runner = self._runner
        if runner is None:
            with self._lock:
                return fn()
        return runner.call(fn)

    # -- bookkeeping (on the proxy's loop) --------------------------------------------

    def _rng(self, ordinal: int, toxic: str) -> random.Random:
        return random.Random(f"{self.seed}/{ordinal}/{toxic}")

    def _record(
        self,
        connection: int,
        toxic: str,
        action: str,
        value: float | None = None,
        *,
        fired: bool = True,
    ) -> None:
        self._log.append(
            FaultRecord(round(time.monotonic() - self._t0, 6), connection, toxic, action, value)
        )
        if fired:
            self._fired[toxic] += 1

    def _accept(self, transport: asyncio.Transport) -> _Link | None:
        if not self._enabled or self._refusing:
            _set_linger_zero(transport)
            transport.abort()
            return None
        self._ordinal += 1
        link = _Link(self, self._ordinal, transport)
        self._links[link.ordinal] = link
        link.sync_toxics()
        task = self._loop().create_task(self._connect_upstream(link))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return link

    async def _connect_upstream(self, link: _Link) -> None:
        delay = self._connect_delay
        if delay > 0:
            self._record(link.ordinal, "connect_delay", "delay", delay)
            await asyncio.sleep(delay)
        heal = self._heal
        if heal is not None and not heal.is_set():
            await heal.wait()
        if link.closed:
            return
        host, port = self._upstream
        try:
            await link.loop.create_connection(lambda: _ServerSide(link), host, port)
        except OSError as exc:
            self._record(link.ordinal, "upstream", "unreachable", float(exc.errno or 0))
            link.close(f"upstream unreachable: {exc}")

    def _forget(self, link: _Link) -> None:
        self._links.pop(link.ordinal, None)

    def _sync_links(self) -> None:
        for link in list(self._links.values()):
            link.sync_toxics()

    # -- toxics ------------------------------------------------------------------------

    @property
    def toxics(self) -> tuple[Toxic, ...]:
        """The toxics in force, in the order they apply."""
        return self._toxics

    def get_toxic(self, name: str) -> Toxic:
        """The toxic called ``name`` (``KeyError`` if there is none)."""
        for toxic in self._toxics:
            if toxic.name == name:
                return toxic
        raise KeyError(f"proxy {self.name!r} has no toxic named {name!r}")

    def _install(self, toxic: Toxic, *, replace: str | None = None) -> None:
        if isinstance(toxic, PgToxic) and not self.postgres:
            raise ValueError(
                f"{type(toxic).__name__} reads the PostgreSQL protocol: "
                f"build the proxy with postgres=True"
            )
        names = [t.name for t in self._toxics]
        if toxic.name in names and toxic.name != replace:
            raise DuplicateToxicError(
                f"proxy {self.name!r} already has a toxic named {toxic.name!r}"
            )
        if replace is None:
            self._toxics = (*self._toxics, toxic)
        else:
            self._toxics = tuple(toxic if t.name == replace else t for t in self._toxics)
            self._budgets.pop(replace, None)
        if isinstance(toxic, PgToxic):
            self._budgets[toxic.name] = toxic.budget
        self._sync_links()

    def add_toxic(self, toxic: Toxic) -> Toxic:
        """Add ``toxic`` (after the others of its stream); it applies to open connections too.

        Raises ``ValueError`` when a toxic of that name exists.
        """
        if not isinstance(toxic, Toxic):
            raise TypeError(f"toxic must be a Toxic (Latency, Timeout...); got {toxic!r}")
        self._call(lambda: self._install(toxic))
        return toxic

    def update_toxic(self, name: str, **changes: Any) -> Toxic:
        """Change fields of the toxic called ``name``; returns the new toxic.

        Example: ``proxy.update_toxic("latency_downstream", latency=0.5)``.
        A protocol toxic's count starts again.
        """

        def run() -> Toxic:
            new = dataclasses.replace(self.get_toxic(name), **changes)
            self._install(new, replace=name)
            return new

        return self._call(run)

    def remove_toxic(self, name: str) -> None:
        """Remove the toxic called ``name`` (``KeyError`` if there is none)."""

        def run() -> None:
            self.get_toxic(name)
            self._toxics = tuple(t for t in self._toxics if t.name != name)
            self._budgets.pop(name, None)
            self._sync_links()

        self._call(run)

    @contextlib.contextmanager
    def toxic(self, toxic: Toxic) -> Iterator[Toxic]:
        """Add ``toxic`` for the duration of a ``with`` block."""
        self.add_toxic(toxic)
        try:
            yield toxic
        finally:
            with contextlib.suppress(KeyError):
                self.remove_toxic(toxic.name)

    # -- proxy-level faults -----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Not disabled (it may still be refusing new connections)."""
        return self._enabled

    def disable(self) -> None:
        """An outage: close the listener (connections refused) and every open connection."""

        def run() -> None:
            self._enabled = False
            self._close_listener()
            links = list(self._links.values())
            for link in links:
                link.close("proxy disabled", "fin")
            self._record(0, "disable", "close_all", float(len(links)))

        self._call(run)

    def enable(self) -> None:
        """End an outage: listen again, on the same port."""
        runner = self._runner
        if runner is None:
            self._enabled = True
            return

        async def run() -> None:
            self._enabled = True
            if not self._refusing:
                await self._open_listener()
            self._record(0, "enable", "listen", fired=False)

        runner.run(run())

    def refuse(self, on: bool = True) -> None:
        """Refuse new connections (``ECONNREFUSED``) but keep the open ones; ``False``: stop."""
        v.boolean("on", on)
        runner = self._runner
        if runner is None:
            self._refusing = on
            return

        async def run() -> None:
            self._refusing = on
            if on:
                self._close_listener()
                self._record(0, "refuse", "on")
            else:
                if self._enabled:
                    await self._open_listener()
                self._record(0, "refuse", "off", fired=False)

        runner.run(run())

    def set_connect_delay(self, delay: float) -> None:
        """Wait ``delay`` seconds before opening each new upstream connection (0: none)."""
        self._connect_delay = _number("connect_delay", delay)

    @property
    def connect_delay(self) -> float:
        """Seconds waited before opening each upstream connection."""
        return self._connect_delay

    @property
    def is_half_open(self) -> bool:
        """Nothing is forwarded in either direction (see :meth:`half_open`)."""
        return self._half_open

    def half_open(self, on: bool = True) -> None:
        """A network partition: forward nothing either way, keep every socket open.

        Data and closes received meanwhile are held (reading pauses past 1 MiB) and
        delivered when the partition heals (``half_open(False)``), as TCP would
        retransmit them. New connections are accepted but not forwarded.
        """
        v.boolean("on", on)

        def run() -> None:
            if on == self._half_open:
                return
            self._half_open = on
            heal = self._heal
            if on:
                if heal is not None:
                    heal.clear()
                self._record(0, "half_open", "on")
                for link in self._links.values():
                    for pipe in (link.up, link.down):
                        if pipe.timer is not None:
                            pipe.timer.cancel()
                            pipe.timer = None
            else:
                if heal is not None:
                    heal.set()
                self._record(0, "half_open", "off", fired=False)
                for link in list(self._links.values()):
                    link.up.schedule()
                    link.down.schedule()

        self._call(run)

    def kill(self, which: Which = "all", *, mode: KillMode = "rst") -> list[int]:
        """Close chosen live connections, both sides; returns their ordinals.

        Args:
            which: ``"all"``; ``"in_transaction"`` (PostgreSQL ``T``/``E`` state);
                ``"idle"`` (PostgreSQL ``I`` state); a predicate on
                :class:`ConnectionInfo`; or connection ordinals.
            mode: ``"rst"`` — a reset, as from a crashed host (``ECONNRESET``);
                ``"fin"`` — an orderly close, as from a stopped server.
        """
        if mode not in ("fin", "rst"):
            raise ValueError(f"mode must be 'fin' or 'rst'; got {mode!r}")
        select = _selector(which)

        def run() -> list[int]:
            chosen = [link for link in self._links.values() if select(link.info())]
            for link in chosen:
                self._record(link.ordinal, "kill", mode)
                link.close(f"killed ({mode})", mode)
            return [link.ordinal for link in chosen]

        return self._call(run)

    def reset(self) -> None:
        """Back to a healthy proxy: no toxics, enabled, accepting, no partition, no delay."""

        def run() -> None:
            self._toxics = ()
            self._budgets.clear()
            self._sync_links()

        self._call(run)
        self.half_open(False)
        self._connect_delay = 0.0
        self.refuse(False)
        self.enable()

    # -- observing ----------------------------------------------------------------------

    def connections(self) -> list[ConnectionInfo]:
        """The live connections, oldest first."""
        return self._call(lambda: [link.info() for link in self._links.values()])

    def stats(self) -> ProxyStats:
        """Counters since the proxy was built."""
        return self._call(
            lambda: ProxyStats(
                connections_accepted=self._ordinal,
                connections_open=len(self._links),
                bytes_upstream=self._bytes_up,
                bytes_downstream=self._bytes_down,
                faults=MappingProxyType(dict(self._fired)),
            )
        )

    def fault_log(self, connection: int | None = None) -> list[FaultRecord]:
        """Fault decisions so far (of one connection, when given), oldest first.

        Two runs with the same seed and the same order of connections give the same
        records, times aside.
        """
        records = self._call(lambda: list(self._log))
        if connection is None:
            return records
        return [r for r in records if r.connection == connection]
