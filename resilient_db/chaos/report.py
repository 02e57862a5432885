"""Reports of a chaos run: terminal summary, JSON, JUnit XML and a self-contained HTML page.

* :func:`render_summary` — the table printed at the end of a run: one row per
  phase (operations, success rate, p50/p95/p99 of acknowledged operations,
  retries, breaker rejections, unknown outcomes), then every check, the verdict
  and the command that replays the run.
* :func:`report_json` — everything, for tools: seed, scenario hash, versions, the
  replay command, per-phase stats, checks, faults, breaker transitions and a
  per-second timeline.
* :func:`junit_xml` — one test case per invariant and per steady-state check, so
  that CI systems show them like tests.
* :func:`render_html` — one file, no external script, style sheet, font or
  request: the timeline is an inline SVG drawn here (throughput, errors and p99
  per second, fault phases shaded, the breaker's state as a band).

:func:`write_reports` writes them all next to the ``operations.jsonl`` the runner
streams during the run.
"""

from __future__ import annotations

import html
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from resilient_db.chaos.invariants import (
    BreakerEvent,
    CheckResult,
    ExitCode,
    OperationRecord,
    percentile,
)

if TYPE_CHECKING:
    from resilient_db.chaos.runner import RunResult

__all__ = [
    "VERDICTS",
    "junit_xml",
    "render_html",
    "render_summary",
    "report_json",
    "timeline",
    "write_reports",
]

FORMAT: Final = "resilient-db-chaos-report/1"

VERDICTS: Final[dict[ExitCode, str]] = {
    ExitCode.PASS: "PASS",
    ExitCode.SAFETY: "SAFETY VIOLATION",
    ExitCode.STEADY_STATE: "STEADY STATE MISSED",
    ExitCode.INCONCLUSIVE: "INCONCLUSIVE",
    ExitCode.HARNESS_ERROR: "HARNESS ERROR",
    ExitCode.INTERRUPTED: "INTERRUPTED",
}

_STATUS_WORD: Final = {
    "pass": "PASS",
    "fail": "FAIL",
    "inconclusive": "INCONCLUSIVE",
    "skipped": "SKIP",
    "info": "INFO",
}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f}ms"
    return f"{seconds * 1000:.0f}ms" if seconds >= 1 else f"{seconds * 1000:.1f}ms"


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}"


# -- per-second timeline ---------------------------------------------------------------------


def timeline(records: Sequence[OperationRecord], end: float) -> list[dict[str, Any]]:
    """Per second (by completion time): acknowledged, failed and unknown operations,
    and the p99 latency of the acknowledged ones (``None`` when there were none)."""
    # Operations still in flight at the end complete a little later: they count in
    # the last second rather than opening a nearly empty one.
    seconds = max(1, round(end))
    buckets: list[dict[str, Any]] = [
        {"t": s, "ok": 0, "failed": 0, "unknown": 0, "latencies": []} for s in range(seconds)
    ]
    for record in records:
        slot = min(seconds - 1, max(0, int(record.complete)))
        bucket = buckets[slot]
        bucket[record.outcome] += 1
        if record.outcome == "ok":
            bucket["latencies"].append(record.latency)
    out = []
    for bucket in buckets:
        latencies = bucket.pop("latencies")
        p99 = percentile(latencies, 0.99)
        bucket["p99"] = None if p99 is None else round(p99, 6)
        out.append(bucket)
    return out


# -- terminal -------------------------------------------------------------------------------


def render_summary(result: RunResult) -> str:
    """The end-of-run summary for a terminal or a CI log (plain ASCII)."""
    scenario = result.scenario
    target = result.target
    how = []
    if target.get("proxy"):
        how.append(f"through the chaos proxy {target['proxy']}")
    if target.get("injector"):
        how.append("with the in-process injector")
    lines = [
        f"resilient-db chaos: {scenario.name} ({scenario.source})",
        f"  seed {scenario.seed} ({scenario.seed_origin}), planned {scenario.duration:g} s, "
        f"ran {result.elapsed:.1f} s, {target['api']} API",
        f"  target {target['url']}" + (" " + ", ".join(how) if how else ""),
        "",
    ]
    header = (
        f"{'phase':<14} {'window':>13} {'ops':>6} {'ok%':>6} {'p50':>9} {'p95':>9} "
        f"{'p99':>9} {'retries':>7} {'rejected':>8} {'unknown':>7}  faults"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for stats in result.phase_stats:
        window = f"{stats.start:.0f}-{stats.end:.0f}s"
        lines.append(
            f"{stats.name[:14]:<14} {window:>13} {stats.ops:>6} {_pct(stats.success_rate):>6} "
            f"{_ms(stats.p50):>9} {_ms(stats.p95):>9} {_ms(stats.p99):>9} {stats.retries:>7} "
            f"{stats.rejections:>8} {stats.unknown:>7}  {', '.join(stats.faults) or '-'}"
        )
    if result.checks:
        for title, checks in (
            ("invariants", result.invariants),
            ("steady state", result.steady_state),
        ):
            if not checks:
                continue
            lines.append("")
            lines.append(title)
            for check in checks:
                lines.append(f"  {_STATUS_WORD[check.status]:<12} {check.name}: {check.summary}")
                if check.status in ("fail", "inconclusive"):
                    lines.extend(f"  {'':<12}   {detail}" for detail in check.details[:10])
    if result.faults:
        lines.append("")
        lines.append("faults")
        for fault in result.faults:
            applied = "never applied" if fault.applied_at is None else f"at {fault.applied_at:.1f}s"
            lines.append(
                f"  {fault.name:<32} {fault.via:<8} {fault.kind:<16} {applied:<14} "
                f"fired {fault.fired}"
            )
    lines.append("")
    if result.error is not None:
        lines.append(f"harness error: {result.error.strip()}")
    verdict = VERDICTS[result.exit_code]
    lines.append(f"result: {verdict} (exit {int(result.exit_code)})")
    for name in ("report.html", "report.json", "junit.xml", "resilient-db.log"):
        if name in result.files:
            lines.append(f"  {name:<16} {result.files[name]}")
    lines.append(f"replay: {result.replay}")
    return "\n".join(lines)


# -- JSON --------------------------------------------------------------------------------


def report_json(result: RunResult) -> dict[str, Any]:
    """The machine-readable report."""
    scenario = result.scenario
    end = max(result.elapsed, scenario.duration)
    return {
        "format": FORMAT,
        "scenario": {
            "name": scenario.name,
            "source": scenario.source,
            "description": scenario.description,
            "duration": scenario.duration,
            "overrides": dict(scenario.overrides),
            "phases": [
                {
                    "name": p.name,
                    "start": p.start,
                    "end": p.end,
                    "rate": p.rate,
                    "faults": [
                        {"name": f.name, "via": f.via, "kind": f.kind, "params": dict(f.params)}
                        for f in p.faults
                    ],
                }
                for p in scenario.phases
            ],
        },
        "seed": scenario.seed,
        "seed_origin": scenario.seed_origin,
        "scenario_hash": f"sha256:{scenario.sha256}",
        "versions": result.versions,
        "replay": result.replay,
        "run_id": result.run_id,
        "started_at": result.started_at,
        "elapsed": round(result.elapsed, 3),
        "exit_code": int(result.exit_code),
        "verdict": VERDICTS[result.exit_code],
        "error": result.error,
        "interrupted": result.interrupted,
        "watchdog_fired": result.watchdog_fired,
        "target": result.target,
        "counts": {
            "operations": len(result.records),
            "ok": sum(1 for r in result.records if r.outcome == "ok"),
            "failed": sum(1 for r in result.records if r.outcome == "failed"),
            "unknown": sum(1 for r in result.records if r.outcome == "unknown"),
        },
        "phases": [s.to_json() for s in result.phase_stats],
        "invariants": [c.to_json() for c in result.invariants],
        "steady_state": [c.to_json() for c in result.steady_state],
        "faults": [
            {
                "name": f.name,
                "phase": f.phase,
                "via": f.via,
                "kind": f.kind,
                "applied_at": f.applied_at,
                "removed_at": f.removed_at,
                "fired": f.fired,
            }
            for f in result.faults
        ],
        "breaker_transitions": [
            {"at": round(e.at, 3), "from": e.old, "to": e.new, "reason": e.reason}
            for e in result.breaker_events
        ],
        "timeline": timeline(result.records, end),
        "samples": [s.to_json() for s in result.samples],
        "files": dict(result.files),
    }


# -- JUnit XML -------------------------------------------------------------------------------


def junit_xml(result: RunResult) -> str:
    """A JUnit XML document: one test case per invariant and per steady-state check.

    Failed checks are ``<failure>``; inconclusive ones (faults that never fired)
    and harness errors are ``<error>``; checks that do not apply are ``<skipped>``.
    """
    scenario = result.scenario
    suite_name = f"chaos.{scenario.name}"
    cases: list[tuple[str, CheckResult]] = []
    for check in result.checks:
        group = "invariants" if check.group == "invariant" else "steady_state"
        cases.append((f"{suite_name}.{group}", check))
    failures = sum(1 for _, c in cases if c.status == "fail")
    errors = sum(1 for _, c in cases if c.status == "inconclusive")
    skipped = sum(1 for _, c in cases if c.status == "skipped")
    tests = len(cases)
    if result.error is not None or result.interrupted:
        tests += 1
        errors += 1
    root = ET.Element("testsuites", name="resilient-db chaos")
    suite = ET.SubElement(
        root,
        "testsuite",
        name=suite_name,
        tests=str(tests),
        failures=str(failures),
        errors=str(errors),
        skipped=str(skipped),
        time=f"{result.elapsed:.3f}",
        timestamp=result.started_at,
    )
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    root.set("time", f"{result.elapsed:.3f}")
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("seed", str(scenario.seed)),
        ("scenario", scenario.source),
        ("scenario_hash", f"sha256:{scenario.sha256}"),
        ("replay", result.replay),
        ("exit_code", str(int(result.exit_code))),
        ("verdict", VERDICTS[result.exit_code]),
        ("resilient_db", result.versions.get("resilient-db", "")),
    ):
        ET.SubElement(properties, "property", name=name, value=value)
    if result.error is not None or result.interrupted:
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.harness", name="run")
        message = result.error or "interrupted (SIGINT/SIGTERM): partial results"
        error = ET.SubElement(case, "error", message=message.strip().splitlines()[0][:500])
        error.set("type", "harness_error" if result.error is not None else "interrupted")
        error.text = message
    for classname, check in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=check.name, time="0")
        body = "\n".join((check.summary, *check.details))
        if check.status == "fail":
            failure = ET.SubElement(case, "failure", message=check.summary[:500], type="violation")
            failure.text = body
        elif check.status == "inconclusive":
            error = ET.SubElement(case, "error", message=check.summary[:500], type="inconclusive")
            error.text = body
        elif check.status == "skipped":
            ET.SubElement(case, "skipped", message=check.summary[:500])
        else:
            out = ET.SubElement(case, "system-out")
            out.text = body
    system_out = ET.SubElement(suite, "system-out")
    system_out.text = render_summary(result)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# -- HTML ----------------------------------------------------------------------------------------

_CSS: Final = """
:root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --muted: #57606a; --line: #d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0; padding: 24px 32px; background: #fff; max-width: 1120px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
.sub { color: var(--muted); margin: 0 0 12px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff;
         font-weight: 600; font-size: 13px; vertical-align: middle; margin-left: 8px; }
.PASS { background: var(--ok); } .FAIL, .SAFETY, .HARNESS { background: var(--bad); }
.STEADY, .INCONCLUSIVE, .INTERRUPTED { background: var(--warn); }
.pass { color: var(--ok); font-weight: 600; } .fail { color: var(--bad); font-weight: 600; }
.inconclusive { color: var(--warn); font-weight: 600; } .skipped, .info { color: var(--muted); }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: 8px 12px; border-radius: 6px; overflow-x: auto; margin: 4px 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; }
.legend span { margin-right: 16px; white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
          vertical-align: -1px; margin-right: 4px; }
details { margin: 2px 0; } summary { cursor: pointer; }
svg text { font: 11px -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #57606a; }
"""

# Runs in the page only to confirm, for the browser test and for a reader, that the
# plot was laid out: it draws nothing itself.
_CHECK_SCRIPT: Final = """
(function () {
  var svg = document.getElementById("timeline");
  var status = "missing";
  if (svg) {
    var box = svg.getBoundingClientRect();
    var drawn = 0;
    var series = svg.querySelectorAll("[data-series]");
    for (var i = 0; i < series.length; i++) {
      var b = series[i].getBBox();
      if (b.width > 0 || b.height > 0) { drawn++; }
    }
    status = box.width > 0 && box.height > 0 && drawn > 0 ? "rendered" : "empty";
    svg.setAttribute("data-series-drawn", String(drawn));
  }
  document.documentElement.setAttribute("data-plot-status", status);
})();
"""

_BREAKER_COLORS: Final = {"closed": "#2da44e", "half_open": "#d4a72c", "open": "#cf222e"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10**exponent
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base:
            return float(step * base)
    return float(10 * base)


def _breaker_segments(events: Sequence[BreakerEvent], end: float) -> list[tuple[float, float, str]]:
    segments: list[tuple[float, float, str]] = []
    state, since = "closed", 0.0
    for event in events:
        at = min(max(event.at, 0.0), end)
        if at > since:
            segments.append((since, at, state))
        state, since = event.new, at
    if end > since:
        segments.append((since, end, state))
    return segments


def timeline_svg(result: RunResult) -> str:
    """The timeline plot as an inline SVG element."""
    scenario = result.scenario
    end = max(result.elapsed, scenario.duration, 1.0)
    buckets = timeline(result.records, end)
    t_max = float(max(end, len(buckets)))
    width, left, right = 1040, 64, 24
    plot_w = width - left - right
    top_a, h_a = 34, 170
    top_b, h_b = top_a + h_a + 34, 120
    top_c, h_c = top_b + h_b + 30, 22
    height = top_c + h_c + 34

    def x(t: float) -> float:
        return left + plot_w * (t / t_max)

    parts: list[str] = [
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="Timeline of the run">'
    ]
    # Phases, shaded behind everything.
    for index, phase in enumerate(scenario.phases):
        fill = "#cf222e" if phase.faults else "#57606a"
        opacity = 0.10 if phase.faults else (0.05 if index % 2 else 0.02)
        x0, x1 = x(phase.start), x(min(phase.end, t_max))
        parts.append(
            f'<rect class="phase" x="{x0:.1f}" y="{top_a}" width="{max(0.0, x1 - x0):.1f}" '
            f'height="{top_c + h_c - top_a}" fill="{fill}" fill-opacity="{opacity}">'
            f"<title>{_e(phase.name)}: {phase.start:g}-{phase.end:g} s"
            f"{': ' + _e(', '.join(f.name for f in phase.faults)) if phase.faults else ''}"
            "</title></rect>"
        )
        if phase.start > 0:
            parts.append(
                f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top_a - 20}" y2="{top_c + h_c}" '
                'stroke="#8c959f" stroke-width="1" stroke-dasharray="3,3"/>'
            )
        color = ' style="fill:#cf222e"' if phase.faults else ""
        parts.append(
            f'<text x="{x0 + 4:.1f}" y="{top_a - 8}" font-weight="600"{color}>'
            f"{_e(phase.name)}</text>"
        )

    # Panel A: throughput (acknowledged per second) and errors per second.
    peak = _nice_max(max([b["ok"] + b["failed"] + b["unknown"] for b in buckets] + [1]))
    slot = plot_w / t_max

    def ya(value: float) -> float:
        return top_a + h_a - h_a * (value / peak)

    for tick in (0.0, peak / 2, peak):
        y = ya(tick)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de" '
            f'stroke-width="1"/><text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{tick:g}</text>"
        )
    parts.append(
        f'<text x="{left}" y="{top_a + 12}" dx="6" font-weight="600">operations per second</text>'
    )
    for bucket in buckets:
        errors = bucket["failed"] + bucket["unknown"]
        if errors:
            x0 = x(bucket["t"]) + slot * 0.15
            parts.append(
                f'<rect data-series="errors" x="{x0:.1f}" y="{ya(errors):.1f}" '
                f'width="{slot * 0.7:.1f}" height="{top_a + h_a - ya(errors):.1f}" fill="#cf222e" '
                f'fill-opacity="0.85"><title>{bucket["t"]}-{bucket["t"] + 1} s: '
                f"{bucket['failed']} failed, {bucket['unknown']} unknown</title></rect>"
            )
    points = " ".join(f"{x(b['t'] + 0.5):.1f},{ya(b['ok']):.1f}" for b in buckets)
    area = (
        f"{x(buckets[0]['t'] + 0.5):.1f},{ya(0):.1f} {points} "
        f"{x(buckets[-1]['t'] + 0.5):.1f},{ya(0):.1f}"
    )
    parts.append(f'<polygon points="{area}" fill="#2da44e" fill-opacity="0.15"/>')
    parts.append(
        f'<polyline data-series="throughput" points="{points}" fill="none" stroke="#1a7f37" '
        f'stroke-width="2"/>'
    )
    for bucket in buckets:
        parts.append(
            f'<circle cx="{x(bucket["t"] + 0.5):.1f}" cy="{ya(bucket["ok"]):.1f}" r="2.2" '
            f'fill="#1a7f37"><title>{bucket["t"]}-{bucket["t"] + 1} s: {bucket["ok"]} '
            f"acknowledged</title></circle>"
        )

    # Panel B: p99 latency of acknowledged operations, per second.
    p99s = [b["p99"] for b in buckets if b["p99"] is not None]
    lat_peak = _nice_max(max(p99s, default=0.001) * 1000)

    def yb(ms: float) -> float:
        return top_b + h_b - h_b * (min(ms, lat_peak) / lat_peak)

    for tick in (0.0, lat_peak / 2, lat_peak):
        y = yb(tick)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de" '
            f'stroke-width="1"/><text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{tick:g} ms</text>"
        )
    parts.append(
        f'<text x="{left}" y="{top_b + 12}" dx="6" font-weight="600">p99 latency '
        "(acknowledged operations)</text>"
    )
    runs: list[list[str]] = [[]]
    for bucket in buckets:
        if bucket["p99"] is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(f"{x(bucket['t'] + 0.5):.1f},{yb(bucket['p99'] * 1000):.1f}")
    for run in runs:
        if len(run) > 1:
            parts.append(
                f'<polyline data-series="p99" points="{" ".join(run)}" fill="none" '
                'stroke="#0969da" stroke-width="2"/>'
            )
    for bucket in buckets:
        if bucket["p99"] is not None:
            parts.append(
                f'<circle data-series="p99" cx="{x(bucket["t"] + 0.5):.1f}" '
                f'cy="{yb(bucket["p99"] * 1000):.1f}" r="2.2" fill="#0969da"><title>'
                f"{bucket['t']}-{bucket['t'] + 1} s: p99 {_ms(bucket['p99'])}</title></circle>"
            )

    # Panel C: the breaker's state as a band.
    parts.append(f'<text x="{left - 6}" y="{top_c + 15}" text-anchor="end">breaker</text>')
    if scenario.workload.breaker is None:
        parts.append(
            f'<rect data-series="breaker" x="{left}" y="{top_c}" width="{plot_w}" height="{h_c}" '
            f'fill="#eaeef2"/><text x="{left + 6}" y="{top_c + 15}">no breaker</text>'
        )
    else:
        for start, stop, state in _breaker_segments(result.breaker_events, t_max):
            parts.append(
                f'<rect data-series="breaker" x="{x(start):.1f}" y="{top_c}" '
                f'width="{max(0.5, x(stop) - x(start)):.1f}" height="{h_c}" '
                f'fill="{_BREAKER_COLORS.get(state, "#8c959f")}"><title>breaker {_e(state)} '
                f"{start:.1f}-{stop:.1f} s</title></rect>"
            )

    # Time axis.
    axis_y = top_c + h_c + 6
    step = max(1, int(_nice_max(t_max / 10)))
    for second in range(0, int(t_max) + 1, step):
        parts.append(
            f'<line x1="{x(second):.1f}" x2="{x(second):.1f}" y1="{axis_y - 4}" y2="{axis_y}" '
            f'stroke="#8c959f"/><text x="{x(second):.1f}" y="{axis_y + 12}" '
            f'text-anchor="middle">{second}s</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _status_cell(status: str) -> str:
    return f'<td class="{_e(status)}">{_e(_STATUS_WORD.get(status, status))}</td>'


def _checks_table(checks: Sequence[CheckResult]) -> str:
    if not checks:
        return "<p class='sub'>none</p>"
    rows = []
    for check in checks:
        details = ""
        if check.details:
            items = "".join(f"<li><code>{_e(d)}</code></li>" for d in check.details)
            details = f"<details><summary>details</summary><ul>{items}</ul></details>"
        rows.append(
            f"<tr>{_status_cell(check.status)}<td>{_e(check.name)}</td>"
            f"<td>{_e(check.summary)}{details}</td></tr>"
        )
    return (
        "<table><thead><tr><th>status</th><th>check</th><th>result</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_html(result: RunResult) -> str:
    """The self-contained HTML report (no external resources, works offline)."""
    scenario = result.scenario
    verdict = VERDICTS[result.exit_code]
    badge_class = verdict.split()[0]
    phase_rows = "".join(
        f"<tr><td>{_e(s.name)}</td><td class='num'>{s.start:.1f}-{s.end:.1f} s</td>"
        f"<td class='num'>{s.ops}</td><td class='num'>{_pct(s.success_rate)}</td>"
        f"<td class='num'>{_ms(s.p50)}</td><td class='num'>{_ms(s.p95)}</td>"
        f"<td class='num'>{_ms(s.p99)}</td><td class='num'>{s.retries}</td>"
        f"<td class='num'>{s.rejections}</td><td class='num'>{s.unknown}</td>"
        f"<td>{_e(', '.join(s.faults) or '-')}</td></tr>"
        for s in result.phase_stats
    )
    fault_rows = "".join(
        f"<tr><td>{_e(f.name)}</td><td>{_e(f.via)}</td><td>{_e(f.kind)}</td>"
        f"<td class='num'>{'-' if f.applied_at is None else f'{f.applied_at:.1f} s'}</td>"
        f"<td class='num'>{'-' if f.removed_at is None else f'{f.removed_at:.1f} s'}</td>"
        f"<td class='num {'pass' if f.fired else 'inconclusive'}'>{f.fired}</td></tr>"
        for f in result.faults
    )
    transitions = "".join(
        f"<li>{e.at:.2f} s: {_e(e.old)} &rarr; {_e(e.new)} ({_e(e.reason)})</li>"
        for e in result.breaker_events
    )
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in result.versions.items())
    error = (
        f"<h2>Harness error</h2><pre>{_e(result.error)}</pre>" if result.error is not None else ""
    )
    legend = (
        '<p class="legend">'
        '<span><i class="swatch" style="background:#1a7f37"></i>acknowledged/s</span>'
        '<span><i class="swatch" style="background:#cf222e"></i>failed + unknown/s</span>'
        '<span><i class="swatch" style="background:#0969da"></i>p99 latency</span>'
        '<span><i class="swatch" style="background:#cf222e;opacity:.25"></i>fault phase</span>'
        '<span><i class="swatch" style="background:#2da44e"></i>breaker closed</span>'
        '<span><i class="swatch" style="background:#d4a72c"></i>half-open</span>'
        '<span><i class="swatch" style="background:#cf222e"></i>open</span></p>'
    )
    description = f"<p>{_e(scenario.description)}</p>" if scenario.description else ""
    target = result.target
    how = [f"{_e(target['url'])}", f"{_e(target['api'])} API"]
    if target.get("proxy"):
        how.append(f"proxy {_e(target['proxy'])}")
    if target.get("injector"):
        how.append("in-process injector")
    outcomes = {o: sum(1 for r in result.records if r.outcome == o) for o in ("ok", "failed")}
    outcomes["unknown"] = len(result.records) - outcomes["ok"] - outcomes["failed"]
    operations = (
        f"{len(result.records)} ({outcomes['ok']} acknowledged, {outcomes['failed']} failed, "
        f"{outcomes['unknown']} unknown)"
    )
    phase_head = "".join(
        f'<th class="num">{h}</th>'
        for h in ("window", "ops", "ok %", "p50", "p95", "p99", "retries", "rejected", "unknown")
    )
    fault_head = "".join(f'<th class="num">{h}</th>' for h in ("applied", "removed", "fired"))
    no_faults = "<tr><td colspan='6'>no fault planned</td></tr>"
    no_transitions = "<p class='sub'>none: the breaker stayed closed</p>"
    badge = (
        f'<span class="badge {_e(badge_class)}">{_e(verdict)} &middot; '
        f"exit {int(result.exit_code)}</span>"
    )
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>chaos: {_e(scenario.name)} &mdash; {_e(verdict)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(scenario.name)}{badge}</h1>",
        f'<p class="sub">resilient-db chaos report &middot; {_e(result.started_at)} '
        f"&middot; run {_e(result.run_id)}</p>",
        description,
        "<dl>",
        f"<dt>seed</dt><dd><code>{scenario.seed}</code> ({_e(scenario.seed_origin)})</dd>",
        f"<dt>duration</dt><dd>planned {scenario.duration:g} s, ran {result.elapsed:.1f} s</dd>",
        f"<dt>target</dt><dd>{' &middot; '.join(how)}</dd>",
        f"<dt>operations</dt><dd>{operations}</dd>",
        f"<dt>scenario</dt><dd><code>{_e(scenario.source)}</code> &middot; "
        f"<code>sha256:{_e(scenario.sha256[:16])}&hellip;</code></dd>",
        f"<dt>versions</dt><dd>{versions}</dd>",
        f"<dt>replay</dt><dd><pre>{_e(result.replay)}</pre></dd>",
        "</dl>",
        error,
        "<h2>Timeline</h2>",
        timeline_svg(result),
        legend,
        "<h2>Phases</h2>",
        f"<table><thead><tr><th>phase</th>{phase_head}<th>faults</th></tr></thead>",
        f"<tbody>{phase_rows}</tbody></table>",
        "<h2>Invariants</h2>",
        _checks_table(result.invariants),
        "<h2>Steady state</h2>",
        _checks_table(result.steady_state),
        "<h2>Faults</h2>",
        f"<table><thead><tr><th>fault</th><th>via</th><th>kind</th>{fault_head}</tr></thead>",
        f"<tbody>{fault_rows or no_faults}</tbody></table>",
        "<h2>Breaker transitions</h2>",
        f"<ul>{transitions}</ul>" if transitions else no_transitions,
        f"<script>{_CHECK_SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(line for line in lines if line) + "\n"


# -- files ---------------------------------------------------------------------------------------


def write_reports(
    result: RunResult, folder: Path | None, *, junit: Path | None = None
) -> dict[str, str]:
    """Write the reports; returns file name → path written.

    In ``folder``: ``report.json``, ``report.html``, ``junit.xml``, ``faults.jsonl``
    and ``samples.jsonl`` (``operations.jsonl`` is streamed by the runner). ``junit``
    is an extra copy of the JUnit XML where CI expects it.
    """
    files: dict[str, str] = {}
    xml = junit_xml(result)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        operations = folder / "operations.jsonl"
        if not operations.exists():
            with operations.open("w", encoding="utf-8") as out:
                for record in result.records:
                    out.write(json.dumps(record.to_json()) + "\n")
        files["operations.jsonl"] = str(operations)
        with (folder / "faults.jsonl").open("w", encoding="utf-8") as out:
            for entry in result.fault_log:
                out.write(json.dumps(entry) + "\n")
        files["faults.jsonl"] = str(folder / "faults.jsonl")
        with (folder / "samples.jsonl").open("w", encoding="utf-8") as out:
            for sample in result.samples:
                out.write(json.dumps(sample.to_json()) + "\n")
        files["samples.jsonl"] = str(folder / "samples.jsonl")
        (folder / "report.html").write_text(render_html(result), encoding="utf-8")
        files["report.html"] = str(folder / "report.html")
        (folder / "junit.xml").write_text(xml, encoding="utf-8")
        files["junit.xml"] = str(folder / "junit.xml")
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(xml, encoding="utf-8")
        files["junit"] = str(junit)
    if folder is not None:
        files["report.json"] = str(folder / "report.json")
        document = report_json(result)
        document["files"] = dict(files)
        (folder / "report.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return files
