"""Render a run's JSON as Markdown, for docs/performance.md.

    python -m bench.markdown bench/results/bench-<stamp>.json > /tmp/tables.md

Prints the run's date, machine and versions, the targets (met or missed), and every
figure's tables, exactly as measured: the numbers in the docs are copied from a
run, never typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench._harness import Table


def _value(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def render(report: dict[str, Any], *, figures: bool = True) -> str:
    machine = report["machine"]
    versions = report["versions"]
    lines = [
        f"Run of {report['date']} (`{report['command']}`, {report['seconds']:.0f} s): "
        f"{machine.get('cpus')} shared cores ({machine.get('cpu_model', machine['processor'])}), "
        f"{machine.get('memory_kib', 0) // 1024} MiB, {machine['platform']}.",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        "| figure | target | measured | goal | verdict |",
        "|---|---|---:|---:|---|",
    ]
    verdicts = {True: "met", False: "**missed**", None: "not measured"}
    for figure in report["figures"].values():
        short = figure["title"].split(" ", 1)[0].rstrip(".")
        for target in figure["targets"]:
            note = f" ({target['note']})" if target["note"] else ""
            lines.append(
                f"| {short} | {target['what']}{note} | {_value(target['measured'])} "
                f"{target['unit']} | ≤ {target['limit']:g} | {verdicts[target['met']]} |"
            )
    for figure in report["figures"].values() if figures else ():
        lines.extend(["", f"### {figure['title']}", ""])
        for table in figure["tables"]:
            lines.extend([Table(**table).markdown(), ""])
    if report.get("failed"):
        lines.extend(["", "Failed figures: " + ", ".join(report["failed"])])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("report", type=Path, help="a bench-<stamp>.json written by python -m bench")
    args = parser.parse_args(argv)
    print(render(json.loads(args.report.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
