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

Scenario runs that gate CI (part 2), built on both:

* :func:`load_scenario` reads a TOML scenario (a workload, timed phases of faults,
  steady-state checks); :func:`run_scenario` runs it through resilient-db's
  policies, checks Jepsen-style invariants (no acknowledged write lost, none
  written twice, counters within bounds, no leaked connection, session or task,
  every fault fired) and the steady state, and writes the reports (JSON lines,
  JSON, JUnit XML, HTML). The verdict is an :class:`ExitCode`.
* ``resilient-db chaos run|list|proxy`` is the command line (:mod:`.cli`).

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
from .invariants import CheckResult, ExitCode, OperationRecord
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
from .report import junit_xml, render_html, render_summary, report_json
from .runner import HarnessError, RunResult, run_scenario
from .scenario import Scenario, ScenarioError, builtin_scenarios, load_scenario

__all__ = [
    "Bandwidth",
    "ChaosProxy",
    "CheckResult",
    "ConnectionInfo",
    "DropCommitAck",
    "ExitCode",
    "FailFirstN",
    "FaultInjector",
    "FaultRecord",
    "HarnessError",
    "Injection",
    "Kind",
    "Latency",
    "LimitData",
    "Operation",
    "OperationRecord",
    "PgToxic",
    "ProxyStats",
    "ResetPeer",
    "RunResult",
    "Scenario",
    "ScenarioError",
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
    "builtin_scenarios",
    "connect_failure",
    "disconnect",
    "hang",
    "junit_xml",
    "latency",
    "load_scenario",
    "render_html",
    "render_summary",
    "report_json",
    "run_scenario",
    "sqlite_busy",
    "sqlstate_error",
]
