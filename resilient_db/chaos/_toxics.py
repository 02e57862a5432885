"""Toxics: what the chaos proxy does to the bytes (and messages) it forwards.

Each toxic is a small frozen dataclass — its configuration, validated when built —
plus a runtime *stage* that the proxy creates for every connection the toxic
applies to. The stream toxics match Toxiproxy's (same names, same behaviour;
durations here are seconds and rates bytes per second, where Toxiproxy's HTTP
API speaks milliseconds and KB/s):

==============  ===========================================================
``Latency``     delay each chunk by ``latency`` ± ``jitter``, counted from the
                chunk's arrival (queued chunks do not add up)
``Bandwidth``   pass at most ``rate`` bytes per second
``SlowClose``   delay the close that follows the peer's close by ``delay``
``Timeout``     drop everything; close the connection after ``timeout``
                (``0``: never — a black hole)
``ResetPeer``   on the first data, drop it and reset the connection (TCP RST)
                after ``timeout``
``Slicer``      cut chunks into pieces of ``average_size`` ± ``size_variation``
                bytes, ``delay`` apart
``LimitData``   close the connection once ``bytes`` have passed
==============  ===========================================================

and two that read the PostgreSQL protocol, which Toxiproxy cannot do:

==================  =======================================================
``FailFirstN``      answer the first ``n`` queries with a real ErrorResponse
                    (``sqlstate``), without sending them to the server
``DropCommitAck``   let a ``COMMIT`` reach the server, drop its answer, then
                    reset the connection: the commit is durable and the client
                    cannot know
==================  =======================================================

Every toxic has a ``name`` (default ``"<type>_<stream>"``, as in Toxiproxy), a
``stream`` (``"upstream"``: client → server, ``"downstream"``: server → client)
and a ``toxicity``: the probability that it applies to a given connection, drawn
once per connection from the proxy's seed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, TypeAlias

from .. import _validate as v

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "CLOSE",
    "TOXIC_TYPES",
    "Bandwidth",
    "DropCommitAck",
    "FailFirstN",
    "LimitData",
    "Latency",
    "PgToxic",
    "ResetPeer",
    "Segment",
    "SlowClose",
    "Slicer",
    "Stage",
    "StageHost",
    "Stream",
    "StreamToxic",
    "Timeout",
    "Toxic",
]

Stream: TypeAlias = Literal["upstream", "downstream"]
_STREAMS: Final = ("upstream", "downstream")


class _Close:
    """Marker in a stage's output: close the connection once the data before it is out."""

    def __repr__(self) -> str:
        return "CLOSE"


CLOSE: Final = _Close()

Segment: TypeAlias = tuple[float, "bytes | _Close"]
"""``(loop time at which it may leave, data or CLOSE)``."""


# -- validation ------------------------------------------------------------------------


def _number(name: str, value: object, *, minimum: float = 0.0, unit: str = "seconds") -> float:
    accepted = f"a number of {unit} >= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    result = float(value)
    if math.isnan(result) or math.isinf(result) or result < minimum:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return result


class DuplicateToxicError(ValueError):
    """A proxy already has a toxic of that name (the HTTP API answers 409)."""


# -- the configuration -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Toxic:
    """Base of all toxics: ``name``, ``stream`` and ``toxicity``.

    Attributes:
        name: unique within a proxy; default ``"<type>_<stream>"``.
        stream: ``"upstream"`` (client → server) or ``"downstream"``.
        toxicity: probability in [0, 1] that the toxic applies to a connection,
            decided once per connection from the proxy's seed.
    """

    type: ClassVar[str] = ""

    name: str = ""
    stream: Stream = "downstream"
    toxicity: float = 1.0

    def __post_init__(self) -> None:
        if self.stream not in _STREAMS:
            raise ValueError(f"stream must be 'upstream' or 'downstream'; got {self.stream!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string; got {type(self.name).__name__}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.type}_{self.stream}")
        object.__setattr__(self, "toxicity", v.fraction("toxicity", self.toxicity))
        self._check()

    def _check(self) -> None:
        """Validate and normalise the toxic's own fields (subclasses)."""

    def attributes(self) -> dict[str, Any]:
        """The toxic's own settings (Python units), without name/stream/toxicity."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("name", "stream", "toxicity")
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamToxic(Toxic):
    """A toxic that works on the byte stream of one direction."""

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        """Runtime state of this toxic on one connection."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency(StreamToxic):
    """Delay each chunk by ``latency`` ± ``jitter`` seconds.

    The delay is counted from the chunk's arrival at the proxy, so a burst of
    chunks is delayed by ``latency`` each, not by the sum. Order is kept.

    Attributes:
        latency: mean delay in seconds (>= 0).
        jitter: the delay stays within ``latency ± jitter`` (and >= 0).
        distribution: ``"uniform"`` over that interval, or ``"normal"``: a normal
            law of standard deviation ``jitter / 2``, truncated to the interval.
    """

    type: ClassVar[str] = "latency"
    latency: float
    jitter: float = 0.0
    distribution: Literal["uniform", "normal"] = "uniform"

    def _check(self) -> None:
        object.__setattr__(self, "latency", _number("latency", self.latency))
        object.__setattr__(self, "jitter", _number("jitter", self.jitter))
        if self.distribution not in ("uniform", "normal"):
            raise ValueError(
                f"distribution must be 'uniform' or 'normal'; got {self.distribution!r}"
            )

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _LatencyStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bandwidth(StreamToxic):
    """Pass at most ``rate`` bytes per second (data is cut in 100 ms pieces)."""

    type: ClassVar[str] = "bandwidth"
    rate: float

    def _check(self) -> None:
        rate = _number("rate", self.rate, minimum=1.0, unit="bytes per second")
        object.__setattr__(self, "rate", rate)

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _BandwidthStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowClose(StreamToxic):
    """When the sending side closes, wait ``delay`` seconds before closing the other."""

    type: ClassVar[str] = "slow_close"
    delay: float

    def _check(self) -> None:
        object.__setattr__(self, "delay", _number("delay", self.delay))

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _SlowCloseStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeout(StreamToxic):
    """Drop all data; close the connection ``timeout`` seconds after the toxic applies.

    ``timeout=0`` never closes: a black hole, until the toxic is removed. As in
    Toxiproxy, removing the toxic closes the connections it held (their stream has
    lost data and cannot be trusted any more).
    """

    type: ClassVar[str] = "timeout"
    timeout: float

    def _check(self) -> None:
        object.__setattr__(self, "timeout", _number("timeout", self.timeout))

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _TimeoutStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetPeer(StreamToxic):
    """On the first data after the toxic applies: drop it, reset after ``timeout`` s.

    The reset is a real TCP RST (``SO_LINGER`` 0) towards both peers, as a crashed
    middlebox or a killed server host produces.
    """

    type: ClassVar[str] = "reset_peer"
    timeout: float = 0.0

    def _check(self) -> None:
        object.__setattr__(self, "timeout", _number("timeout", self.timeout))

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _ResetPeerStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class Slicer(StreamToxic):
    """Cut data into pieces of ``average_size`` ± ``size_variation`` bytes.

    Attributes:
        average_size: mean piece size in bytes (>= 1).
        size_variation: pieces vary by up to this many bytes (< ``average_size``).
        delay: seconds between two pieces.
    """

    type: ClassVar[str] = "slicer"
    average_size: int
    size_variation: int = 0
    delay: float = 0.0

    def _check(self) -> None:
        v.integer("average_size", self.average_size, minimum=1)
        v.integer("size_variation", self.size_variation, minimum=0)
        if self.size_variation >= self.average_size:
            raise ValueError(
                "size_variation must be an integer >= 0 and < average_size "
                f"({self.average_size}); got {self.size_variation!r}"
            )
        object.__setattr__(self, "delay", _number("delay", self.delay))

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _SlicerStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitData(StreamToxic):
    """Close the connection once ``bytes`` bytes have passed in this stream."""

    type: ClassVar[str] = "limit_data"
    bytes: int

    def _check(self) -> None:
        v.integer("bytes", self.bytes, minimum=0)

    def stage(self, host: StageHost, rng: random.Random) -> Stage:
        return _LimitDataStage(self, host, rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class PgToxic(Toxic):
    """A toxic that reads the PostgreSQL protocol (the proxy's ``postgres=True``).

    It watches the client's messages, so its stream is always ``"upstream"``.
    ``count`` is shared by all connections: the toxic fires that many times in
    all, then stays inert until it is removed or re-added (``None``: no limit).
    """

    stream: Stream = "upstream"

    def _check_stream(self) -> None:
        if self.stream != "upstream":
            raise ValueError(
                f"stream must be 'upstream' for {type(self).__name__} (it watches the "
                f"client's messages); got {self.stream!r}"
            )

    @property
    def budget(self) -> int | None:
        """How many times the toxic may fire, over all connections."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class FailFirstN(PgToxic):
    """Answer the first ``n`` queries with a real ``ErrorResponse`` of ``sqlstate``.

    The failed queries never reach the server; the client receives an
    ``ErrorResponse`` (severity ERROR, the given SQLSTATE) then ``ReadyForQuery``,
    exactly as if the server had rejected them — asyncpg raises the matching
    exception class (``SerializationError`` for ``40001``...).

    What counts as a query: a simple ``Query`` message, or an extended-protocol
    cycle (Parse/Bind/Execute... up to Sync) that executes a statement, whose SQL
    reads or writes data — transaction control, ``SET``/``SHOW`` and the drivers'
    own introspection are not counted (see ``_pgwire.counts_as_query``). With
    ``match``, only statements whose SQL matches that regular expression count.

    Attributes:
        n: how many queries fail, over all connections (>= 1).
        sqlstate: five characters, e.g. ``"40001"`` (serialization failure).
        message: the error's message.
        match: optional regular expression (searched, case-insensitive) the SQL
            must match to count.
    """

    type: ClassVar[str] = "fail_first_n"
    n: int
    sqlstate: str = "40001"
    message: str = "injected by resilient_db.chaos"
    match: str | None = None

    def _check(self) -> None:
        self._check_stream()
        v.integer("n", self.n, minimum=1)
        if (
            not isinstance(self.sqlstate, str)
            or len(self.sqlstate) != 5
            or not self.sqlstate.isascii()
            or not self.sqlstate.isalnum()
        ):
            raise ValueError(f"sqlstate must be 5 ASCII letters or digits; got {self.sqlstate!r}")
        object.__setattr__(self, "sqlstate", self.sqlstate.upper())
        if not isinstance(self.message, str):
            raise TypeError(f"message must be a string; got {type(self.message).__name__}")
        if self.match is not None:
            try:
                re.compile(self.match)
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"match must be a regular expression or None; got {self.match!r} ({exc})"
                ) from exc

    @property
    def budget(self) -> int | None:
        return self.n


@dataclass(frozen=True, slots=True, kw_only=True)
class DropCommitAck(PgToxic):
    """Let ``COMMIT`` through, drop the server's answer, then reset the connection.

    The proxy waits for the server's ``ReadyForQuery`` after the COMMIT (so the
    transaction *is* durable) before resetting the client's connection: the
    client sees a lost connection during COMMIT — the ambiguous commit, on purpose.

    Attributes:
        count: how many COMMITs to hit, over all connections (``None``: all).
    """

    type: ClassVar[str] = "drop_commit_ack"
    count: int | None = 1

    def _check(self) -> None:
        self._check_stream()
        if self.count is not None:
            v.integer("count", self.count, minimum=1)

    @property
    def budget(self) -> int | None:
        return self.count


TOXIC_TYPES: Final[dict[str, type[Toxic]]] = {
    cls.type: cls
    for cls in (
        Latency,
        Bandwidth,
        SlowClose,
        Timeout,
        ResetPeer,
        Slicer,
        LimitData,
        FailFirstN,
        DropCommitAck,
    )
}
"""Toxic classes by their Toxiproxy type name."""


# -- the runtime -----------------------------------------------------------------------


class StageHost(Protocol):
    """What a stage may do to its connection (implemented by the proxy)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The proxy's event loop."""
        ...

    def record(self, toxic: str, action: str, value: float | None = None) -> None:
        """Log a fault decision and count it as fired."""
        ...

    def close_link(self, reason: str) -> None:
        """Close both sides of the connection (FIN)."""
        ...

    def reset_link(self, reason: str) -> None:
        """Reset both sides of the connection (RST)."""
        ...


class Stage:
    """A toxic's runtime on one direction of one connection."""

    __slots__ = ("host", "rng", "toxic")

    def __init__(self, toxic: StreamToxic, host: StageHost, rng: random.Random) -> None:
        self.toxic = toxic
        self.host = host
        self.rng = rng

    def start(self) -> None:
        """The toxic now applies to the connection (at its opening, or when added)."""

    def stop(self) -> None:
        """The connection is closing: cancel timers."""

    def removed(self) -> None:
        """The toxic was removed (or replaced) while the connection is open."""
        self.stop()

    def process(self, segments: list[Segment]) -> list[Segment]:
        """Transform the segments of one incoming chunk."""
        return segments

    def on_close(self, ready: float) -> float:
        """When the close that follows the sender's close may leave."""
        return ready


class _LatencyStage(Stage):
    __slots__ = ()

    def _delay(self) -> float:
        toxic = self.toxic
        assert isinstance(toxic, Latency)
        base, jitter = toxic.latency, toxic.jitter
        if jitter <= 0:
            return base
        if toxic.distribution == "uniform":
            delay = base + self.rng.uniform(-jitter, jitter)
        else:
            delay = self.rng.gauss(base, jitter / 2)
            while not base - jitter <= delay <= base + jitter:
                delay = self.rng.gauss(base, jitter / 2)
        return max(0.0, delay)

    def process(self, segments: list[Segment]) -> list[Segment]:
        name = self.toxic.name
        record = self.host.record
        result: list[Segment] = []
        for ready, data in segments:
            delay = self._delay()
            record(name, "delay", delay)
            result.append((ready + delay, data))
        return result


class _BandwidthStage(Stage):
    __slots__ = ("free_at",)

    def __init__(self, toxic: StreamToxic, host: StageHost, rng: random.Random) -> None:
        Stage.__init__(self, toxic, host, rng)
        self.free_at = 0.0

    def process(self, segments: list[Segment]) -> list[Segment]:
        toxic = self.toxic
        assert isinstance(toxic, Bandwidth)
        rate = toxic.rate
        piece_size = max(1, int(rate / 10))  # 100 ms worth of data
        result: list[Segment] = []
        for ready, data in segments:
            if isinstance(data, _Close):
                result.append((max(ready, self.free_at), data))
                continue
            start_ready = ready
            for offset in range(0, len(data), piece_size):
                piece = data[offset : offset + piece_size]
                done = max(ready, self.free_at) + len(piece) / rate
                self.free_at = done
                result.append((done, piece))
                ready = done
            self.host.record(toxic.name, "throttle", ready - start_ready)
        return result


class _SlowCloseStage(Stage):
    __slots__ = ()

    def on_close(self, ready: float) -> float:
        toxic = self.toxic
        assert isinstance(toxic, SlowClose)
        self.host.record(toxic.name, "slow_close", toxic.delay)
        return ready + toxic.delay


class _TimeoutStage(Stage):
    __slots__ = ("timer",)

    def __init__(self, toxic: StreamToxic, host: StageHost, rng: random.Random) -> None:
        Stage.__init__(self, toxic, host, rng)
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        toxic = self.toxic
        assert isinstance(toxic, Timeout)
        if toxic.timeout > 0:
            self.timer = self.host.loop.call_later(toxic.timeout, self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.host.record(self.toxic.name, "close", None)
        self.host.close_link(f"{self.toxic.name}: timeout")

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def removed(self) -> None:
        self.stop()
        self.host.close_link(f"{self.toxic.name}: removed (data was lost)")

    def process(self, segments: list[Segment]) -> list[Segment]:
        kept: list[Segment] = []
        for segment in segments:
            data = segment[1]
            if isinstance(data, _Close):
                kept.append(segment)
            else:
                self.host.record(self.toxic.name, "drop", len(data))
        return kept


class _ResetPeerStage(Stage):
    __slots__ = ("timer", "triggered")

    def __init__(self, toxic: StreamToxic, host: StageHost, rng: random.Random) -> None:
        Stage.__init__(self, toxic, host, rng)
        self.triggered = False
        self.timer: asyncio.TimerHandle | None = None

    def process(self, segments: list[Segment]) -> list[Segment]:
        toxic = self.toxic
        assert isinstance(toxic, ResetPeer)
        if not self.triggered:
            if all(isinstance(d, _Close) for _, d in segments):
                return segments
            self.triggered = True
            self.timer = self.host.loop.call_later(toxic.timeout, self._reset)
        return []

    def _reset(self) -> None:
        self.timer = None
        self.host.record(self.toxic.name, "reset", None)
        self.host.reset_link(f"{self.toxic.name}: reset_peer")

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _SlicerStage(Stage):
    __slots__ = ()

    def process(self, segments: list[Segment]) -> list[Segment]:
        toxic = self.toxic
        assert isinstance(toxic, Slicer)
        low = toxic.average_size - toxic.size_variation
        high = toxic.average_size + toxic.size_variation
        result: list[Segment] = []
        for ready, data in segments:
            if isinstance(data, _Close):
                result.append((ready, data))
                continue
            offset = 0
            pieces = 0
            while offset < len(data):
                size = self.rng.randint(low, high)
                result.append((ready + pieces * toxic.delay, data[offset : offset + size]))
                offset += size
                pieces += 1
            self.host.record(toxic.name, "slice", pieces)
        return result


class _LimitDataStage(Stage):
    __slots__ = ("exhausted", "passed")

    def __init__(self, toxic: StreamToxic, host: StageHost, rng: random.Random) -> None:
        Stage.__init__(self, toxic, host, rng)
        self.passed = 0
        self.exhausted = False

    def process(self, segments: list[Segment]) -> list[Segment]:
        toxic = self.toxic
        assert isinstance(toxic, LimitData)
        result: list[Segment] = []
        for ready, data in segments:
            if self.exhausted:
                break  # the close is already on its way
            if isinstance(data, _Close):
                result.append((ready, data))
                continue
            piece = data[: toxic.bytes - self.passed]
            if piece:
                self.passed += len(piece)
                result.append((ready, piece))
            if self.passed >= toxic.bytes:
                self.exhausted = True
                self.host.record(toxic.name, "limit", toxic.bytes)
                result.append((ready, CLOSE))
        return result
