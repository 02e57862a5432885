"""The chaos harness: inject real faults into real databases, in your own tests.

Two injectors, usable on their own:

* :class:`ChaosProxy` — a pure-asyncio TCP proxy that runs on its own thread and
  event loop. Toxiproxy's toxics (``Latency``, ``Bandwidth``, ``SlowClose``,
  ``Timeout``, ``ResetPeer``, ``Slicer``, ``LimitData``), outages (``disable``,
  ``refuse``, ``half_open``, ``kill``), and PostgreSQL-aware faults that read the
  wire protocol (``FailFirstN`` with a real ErrorResponse, ``DropCommitAck`` for
  the ambiguous commit, ``kill("in_transaction")``). Seeded: a run replays given
  the same seed and arrival order. :class:`ToxiproxyServer` serves Toxiproxy's HTTP
  API for existing clients.
* :class:`FaultInjector` — in-process faults for any SQLAlchemy async engine,
  SQLite included (Polly's chaos model): ``disconnect``, ``hang``,
  ``sqlstate_error``, ``sqlite_busy``, ``latency``, ``connect_failure``, each with a
  rate, an ``enabled`` switch and a seed. Faults look real to SQLAlchemy: a
  disconnect really closes the driver connection first.

The harness uses only the public API of resilient-db and is never imported by it.
See ``docs/chaos.md``.
"""

from .injector import (
    FaultInjector,
    Injection,
    Kind,
    Operation,
    Strategy,
    Target,
    connect_failure,
    disconnect,
    hang,
    latency,
    sqlite_busy,
    sqlstate_error,
)
from .proxy import (
    TOXIC_TYPES,
    Bandwidth,
    ChaosProxy,
    ConnectionInfo,
    DropCommitAck,
    FailFirstN,
    FaultRecord,
    Latency,
    LimitData,
    PgToxic,
    ProxyStats,
    ResetPeer,
    Slicer,
    SlowClose,
    Stream,
    StreamToxic,
    Timeout,
    Toxic,
    ToxiproxyServer,
)

__all__ = [
    "Bandwidth",
    "ChaosProxy",
    "ConnectionInfo",
    "DropCommitAck",
    "FailFirstN",
    "FaultInjector",
    "FaultRecord",
    "Injection",
    "Kind",
    "Latency",
    "LimitData",
    "Operation",
    "PgToxic",
    "ProxyStats",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Strategy",
    "Stream",
    "StreamToxic",
    "TOXIC_TYPES",
    "Target",
    "Timeout",
    "Toxic",
    "ToxiproxyServer",
    "connect_failure",
    "disconnect",
    "hang",
    "latency",
    "sqlite_busy",
    "sqlstate_error",
]
