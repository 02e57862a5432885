"""The ``resilient-db`` command: run chaos scenarios, list them, run a standalone proxy.

::

    resilient-db chaos run [SCENARIO] [--url URL] [--seed N] [--duration S]
                           [--report-dir DIR] [--junit FILE] [--quiet]
    resilient-db chaos list
    resilient-db chaos proxy --upstream HOST:PORT [--listen HOST:PORT] [--api HOST:PORT]
                             [--no-api] [--seed N] [--fault SPEC]... [--duration S]

``python -m resilient_db.chaos run ...`` is the same as ``resilient-db chaos run ...``.

Exit codes of ``chaos run`` (see :class:`~resilient_db.chaos.ExitCode`): 0 pass,
1 a safety invariant was violated, 2 a steady-state check missed, 3 inconclusive
(a planned fault never fired), 4 harness error (bad scenario or options, no
database at the start), 130 interrupted (Ctrl-C or SIGTERM; partial reports are
written). A usage error is a harness error too: 4, never argparse's 2, which
would read as "steady state missed".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from resilient_db import __version__
from resilient_db.chaos.invariants import ExitCode
from resilient_db.chaos.proxy import ChaosProxy, ToxiproxyServer
from resilient_db.chaos.report import render_summary
from resilient_db.chaos.runner import replay_command, run_scenario
from resilient_db.chaos.scenario import (
    DEFAULT_SCENARIO,
    FaultSpec,
    ScenarioError,
    builtin_scenarios,
    load_scenario,
    parse_fault,
    parse_scenario,
)

__all__ = ["main"]

_PROG = "resilient-db"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 4 (harness error), not 2 (steady state missed)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.HARNESS_ERROR), f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="resilient-db: chaos runs that gate CI, and a fault-injecting proxy.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chaos = commands.add_parser("chaos", help="run chaos scenarios, or a chaos proxy")
    actions = chaos.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)

    run = actions.add_parser(
        "run",
        help="run a scenario and check its invariants",
        description=(
            "Run a chaos scenario: drive a workload through resilient-db's policies while "
            "the scenario's faults come and go, then check the invariants and the steady "
            "state. Exit codes: 0 pass, 1 safety invariant violated, 2 steady state "
            "missed, 3 inconclusive (a fault never fired), 4 harness error, 130 "
            "interrupted."
        ),
    )
    run.add_argument(
        "scenario",
        nargs="?",
        default=DEFAULT_SCENARIO,
        help=f"a scenario file (.toml) or a built-in scenario name (default: {DEFAULT_SCENARIO})",
    )
    run.add_argument("--url", help="database URL, replacing the scenario's target.url")
    run.add_argument("--seed", type=int, help="seed, replacing the scenario's (replays a run)")
    run.add_argument(
        "--duration",
        type=float,
        help="seconds, replacing the scenario's duration; phases are scaled to it",
    )
    run.add_argument(
        "--report-dir",
        default="reports/chaos",
        help="reports go to DIR/<scenario name>/ (default: reports/chaos)",
    )
    run.add_argument("--junit", help="also write the JUnit XML report to this file")
    run.add_argument(
        "--quiet", action="store_true", help="no progress line; only the final summary"
    )

    actions.add_parser("list", help="list the built-in scenarios")

    proxy = actions.add_parser(
        "proxy",
        help="run a standalone chaos proxy (with Toxiproxy's HTTP API)",
        description=(
            "Run a ChaosProxy in the foreground until Ctrl-C, SIGTERM or --duration. "
            "Faults can be given with --fault and changed at run time through the "
            "Toxiproxy-compatible HTTP API."
        ),
    )
    proxy.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    proxy.add_argument(
        "--listen", default="127.0.0.1:6432", help="HOST:PORT to listen on (port 0: any free one)"
    )
    proxy.add_argument(
        "--api",
        default="127.0.0.1:8474",
        help="HOST:PORT of the Toxiproxy-compatible HTTP API (default: 127.0.0.1:8474)",
    )
    proxy.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    proxy.add_argument("--name", default="pg", help="the proxy's name in the API (default: pg)")
    proxy.add_argument("--seed", type=int, default=0, help="seed of every fault decision")
    proxy.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            "a fault, as in a scenario's faults, e.g. --fault 'proxy = \"latency\", "
            "latency = 0.05' (repeatable)"
        ),
    )
    proxy.add_argument(
        "--no-postgres",
        action="store_true",
        help="forward blindly, without reading the PostgreSQL protocol",
    )
    proxy.add_argument("--duration", type=float, help="stop after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``resilient-db`` command line; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, or a usage error (exit 4)
        return exc.code if isinstance(exc.code, int) else int(ExitCode.HARNESS_ERROR)
    if args.command != "chaos" or args.action is None:
        parser.print_help(sys.stderr)
        print(f"\n{_PROG}: choose a command, e.g. `{_PROG} chaos run`", file=sys.stderr)
        return int(ExitCode.HARNESS_ERROR)
    if args.action == "run":
        return _run(args)
    if args.action == "list":
        return _list()
    return _proxy(args)


def _run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(
            args.scenario, url=args.url, seed=args.seed, duration=args.duration
        )
    except ScenarioError as exc:
        print(f"{_PROG} chaos run: {exc}", file=sys.stderr)
        return int(ExitCode.HARNESS_ERROR)
    print(
        f"{_PROG} chaos run: {scenario.name}, seed {scenario.seed} ({scenario.seed_origin}), "
        f"{scenario.duration:g} s; replay: {replay_command(scenario)}",
        flush=True,
    )
    # resilient-db logs every retry, breaker transition and unknown commit: a chaos run
    # makes hundreds. They go to a file next to the reports, not over the progress line.
    log_path = Path(args.report_dir) / scenario.name / "resilient-db.log"
    logger = logging.getLogger("resilient_db")
    handler: logging.Handler | None = None
    saved = (logger.level, logger.propagate)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    except OSError as exc:
        print(f"{_PROG} chaos run: cannot write {log_path}: {exc}", file=sys.stderr)
        return int(ExitCode.HARNESS_ERROR)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        result = asyncio.run(
            run_scenario(
                scenario,
                report_dir=args.report_dir,
                junit=args.junit,
                progress=not args.quiet,
                handle_signals=True,
            )
        )
    except KeyboardInterrupt:
        print(f"{_PROG} chaos run: interrupted twice: stopped without cleaning up", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    result.files["resilient-db.log"] = str(log_path)
    print(render_summary(result), flush=True)
    return int(result.exit_code)


def _list() -> int:
    rows = []
    for name, text in builtin_scenarios().items():
        try:
            scenario = parse_scenario(text, source=f"builtin:{name}", default_name=name, seed=0)
        except ScenarioError as exc:  # a broken built-in is a bug: show it, do not hide it
            rows.append((name, "-", "-", f"INVALID: {exc}"))
            continue
        target: str = "embedded SQLite" if scenario.target.url is None else scenario.target.dialect
        rows.append((name, f"{scenario.duration:g}s", target, scenario.description))
    width = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'name':<{width}}  {'time':>5}  {'target':<15}  description")
    for name, duration, target, description in rows:
        print(f"{name:<{width}}  {duration:>5}  {target:<15}  {description}")
    print(f"\nrun one with: {_PROG} chaos run NAME  (default: {DEFAULT_SCENARIO})")
    return 0


def _proxy(args: argparse.Namespace) -> int:
    faults: list[FaultSpec] = []
    try:
        for number, text in enumerate(args.fault, 1):
            fault = parse_fault(text, source=f"--fault #{number}", phase="proxy")
            if fault.via != "proxy":
                raise ScenarioError(
                    f"--fault #{number}", "fault", "the standalone proxy takes proxy faults only"
                )
            if fault.kind == "kill":
                raise ScenarioError(
                    f"--fault #{number}",
                    "fault.proxy",
                    "kill acts on open connections and there are none at start; use the "
                    "HTTP API, or a scenario",
                )
            faults.append(fault)
        proxy = ChaosProxy(
            args.upstream,
            listen=args.listen,
            name=args.name,
            seed=args.seed,
            postgres=not args.no_postgres,
        )
    except (ScenarioError, TypeError, ValueError) as exc:
        print(f"{_PROG} chaos proxy: {exc}", file=sys.stderr)
        return int(ExitCode.HARNESS_ERROR)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    api: ToxiproxyServer | None = None
    try:
        try:
            proxy.start()
            for fault in faults:
                _apply(proxy, fault)
            if not args.no_api:
                api = ToxiproxyServer(args.api, seed=args.seed, proxies=[proxy]).start()
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"{_PROG} chaos proxy: cannot start: {exc}", file=sys.stderr)
            return int(ExitCode.HARNESS_ERROR)
        print(
            f"chaos proxy {proxy.name!r} listening on {proxy.listen}, forwarding to "
            f"{proxy.upstream} (seed {proxy.seed})",
            flush=True,
        )
        for fault in faults:
            print(f"  fault {fault.name}: {fault.kind} {dict(fault.params)}", flush=True)
        if api is not None:
            print(f"Toxiproxy API on {api.url} (proxy name {proxy.name!r})", flush=True)
        print("Ctrl-C to stop", flush=True)
        stop.wait(args.duration)
        stats = proxy.stats()
        print(
            f"stopped: {stats.connections_accepted} connections, "
            f"{stats.bytes_upstream} bytes up, {stats.bytes_downstream} bytes down, "
            f"faults {dict(stats.faults)}",
            flush=True,
        )
        return 0
    finally:
        if api is not None:
            api.stop()
        proxy.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _apply(proxy: ChaosProxy, fault: FaultSpec) -> None:
    if not fault.is_action:
        proxy.add_toxic(fault.toxic())
    elif fault.kind == "disable":
        proxy.disable()
    elif fault.kind == "refuse":
        proxy.refuse(True)
    elif fault.kind == "half_open":
        proxy.half_open(True)
    elif fault.kind == "connect_delay":
        proxy.set_connect_delay(float(fault.param("delay")))
