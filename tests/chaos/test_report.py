"""The reports of a run: JSON lines, JSON, JUnit XML, the terminal summary, and the
self-contained HTML page — opened in a real headless Chromium, which must lay out the
timeline plot.

One short run of the built-in ``sqlite-outage`` scenario (a brown-out, then an outage
that opens the breaker, on the embedded SQLite database) feeds every test of this
module. Its HTML timeline is the screenshot in docs/chaos.md:
``RESILIENT_UPDATE_DOCS_IMG=1`` writes it to docs/img/chaos-report.png.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from resilient_db.chaos import (
    CheckResult,
    ExitCode,
    RunResult,
    builtin_scenarios,
    junit_xml,
    load_scenario,
    render_html,
    render_summary,
    report_json,
    run_scenario,
)
from resilient_db.chaos.report import VERDICTS
from resilient_db.testing import reset_breakers

ROOT = Path(__file__).parent.parent.parent
BROWSER_VAR = "RESILIENT_TEST_REQUIRE_BROWSER"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    """One run of the scenario, with its reports written (shared by the module)."""
    folder = tmp_path_factory.mktemp("report")
    reset_breakers()
    result = asyncio.run(
        run_scenario(
            load_scenario("sqlite-outage", seed=2024),
            report_dir=folder / "reports",
            junit=folder / "ci" / "chaos-junit.xml",
        )
    )
    return result, folder


def test_the_run_went_through_every_state_the_report_shows(run: tuple[RunResult, Path]) -> None:
    result, _ = run
    # The data is safe and every fault fired; the latency checks may miss on a machine
    # that is busy with something else, which is what they are for: not this module's
    # subject.
    assert result.exit_code in (ExitCode.PASS, ExitCode.STEADY_STATE), result.checks
    assert all(c.status in ("pass", "info", "skipped") for c in result.invariants)
    assert [e.new for e in result.breaker_events][:1] == ["open"]
    assert result.breaker_events[-1].new == "closed"


def test_every_operation_is_a_json_line(run: tuple[RunResult, Path]) -> None:
    result, _ = run
    lines = Path(result.files["operations.jsonl"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(result.records) > 100
    for record in records:
        assert set(record) >= {"invoke", "complete", "outcome", "attempts", "error"}
        assert record["complete"] >= record["invoke"]
        assert record["outcome"] in ("ok", "failed", "unknown")
        assert (record["error"] is None) == (record["outcome"] == "ok")
    assert any(r["error"] == "CircuitOpenError" for r in records)
    samples = Path(result.files["samples.jsonl"]).read_text().splitlines()
    assert len(samples) >= 8
    assert {"at", "breaker", "pool_checked_out", "in_flight"} <= set(json.loads(samples[0]))


def test_the_json_report_has_the_seed_hash_versions_and_replay_command(
    run: tuple[RunResult, Path],
) -> None:
    result, _ = run
    report = json.loads(Path(result.files["report.json"]).read_text())
    assert report == report_json(result) | {"files": report["files"]}
    assert report["seed"] == 2024
    text = builtin_scenarios()["sqlite-outage"]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert report["scenario_hash"] == f"sha256:{digest}"
    assert {"resilient-db", "python", "sqlalchemy", "aiosqlite"} <= set(report["versions"])
    assert report["replay"] == "resilient-db chaos run sqlite-outage --seed 2024"
    assert [p["name"] for p in report["phases"]] == [
        "baseline",
        "brownout",
        "outage",
        "recovery",
        "(all)",
    ]
    assert len(report["timeline"]) >= 8
    assert report["breaker_transitions"][0]["to"] == "open"
    assert report["verdict"] == VERDICTS[result.exit_code]


def test_the_junit_report_has_one_test_case_per_check(run: tuple[RunResult, Path]) -> None:
    result, folder = run
    for path in (Path(result.files["junit.xml"]), folder / "ci" / "chaos-junit.xml"):
        root = ET.parse(path).getroot()
        suite = root.find("testsuite")
        assert suite is not None
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == [c.name for c in result.checks]
        assert suite.get("tests") == str(len(cases))
        failed = [c for c in result.checks if c.status == "fail"]
        assert suite.get("failures") == str(len(failed))
        classes = {c.get("classname") for c in cases}
        assert classes == {"chaos.sqlite-outage.invariants", "chaos.sqlite-outage.steady_state"}
        properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert properties["seed"] == "2024"
        assert properties["replay"] == result.replay
        skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
        assert skipped == ["no_leaked_sessions"]


def test_junit_marks_violations_as_failures_and_inconclusive_checks_as_errors(
    run: tuple[RunResult, Path],
) -> None:
    result, _ = run
    broken = dataclasses.replace(
        result,
        exit_code=ExitCode.SAFETY,
        checks=(
            CheckResult(
                "no_duplicate_keys", "invariant", "fail", "1 keys written more than once", ("k",)
            ),
            CheckResult("faults_fired", "invariant", "inconclusive", "1 of 1 never fired"),
            CheckResult("recovery: p99", "steady_state", "pass", "ok"),
        ),
    )
    suite = ET.fromstring(junit_xml(broken)).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    failure = cases["no_duplicate_keys"].find("failure")
    assert failure is not None and failure.get("message") == "1 keys written more than once"
    error = cases["faults_fired"].find("error")
    assert error is not None and error.get("type") == "inconclusive"
    harness = dataclasses.replace(result, exit_code=ExitCode.HARNESS_ERROR, checks=(), error="boom")
    suite = ET.fromstring(junit_xml(harness)).find("testsuite")
    assert suite is not None and suite.get("errors") == "1"


def test_the_terminal_summary_has_a_row_per_phase_and_the_verdict(
    run: tuple[RunResult, Path],
) -> None:
    result, _ = run
    summary = render_summary(result)
    rows = [line.split()[0] for line in summary.splitlines() if line[:1].isalpha()]
    for phase in ("baseline", "brownout", "outage", "recovery"):
        assert phase in rows
    header = next(line for line in summary.splitlines() if line.startswith("phase"))
    for column in ("ops", "ok%", "p50", "p95", "p99", "retries", "rejected", "unknown"):
        assert column in header.split()
    outage = next(line for line in summary.splitlines() if line.startswith("outage"))
    assert int(outage.split()[8]) > 0  # breaker rejections during the outage
    verdict = VERDICTS[result.exit_code]
    assert f"result: {verdict} (exit {int(result.exit_code)})" in summary
    assert f"replay: {result.replay}" in summary


def test_the_html_report_is_self_contained(run: tuple[RunResult, Path]) -> None:
    result, _ = run
    page = Path(result.files["report.html"]).read_text()
    assert page == render_html(result)
    lowered = page.lower()
    for reference in ("<link", "<script src", "@import", "url(", "<img", "<iframe", "https:"):
        assert reference not in lowered
    # The only URL is the SVG namespace, which is a name, never fetched.
    assert lowered.count("http:") == lowered.count('xmlns="http://www.w3.org/2000/svg"') == 1
    assert '<svg id="timeline"' in page
    for series in ("throughput", "errors", "p99", "breaker"):
        assert f'data-series="{series}"' in page


def _browser() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = (
        "no chromium binary: install Debian's (apt-get install -y chromium) to render the "
        f"HTML report in a real browser; {BROWSER_VAR}=1 makes this a failure"
    )
    if os.environ.get(BROWSER_VAR, "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        if kind == b"IDAT":
            chunks.append(data[offset + 8 : offset + 8 + length])
        offset += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


def test_the_html_report_renders_in_a_real_browser_with_its_plot(
    run: tuple[RunResult, Path], tmp_path: Path
) -> None:
    browser = _browser()
    result, _ = run
    url = Path(result.files["report.html"]).resolve().as_uri()
    dom = _chromium(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Set by the page's own script once the browser has laid the SVG out.
    assert 'data-plot-status="rendered"' in dom.stdout, dom.stdout[:500]
    drawn = dom.stdout.split('data-series-drawn="', 1)[1].split('"', 1)[0]
    assert int(drawn) > 20

    shot = tmp_path / "chaos-report.png"
    screenshot = _chromium(
        browser,
        tmp_path / "profile-shot",
        "--hide-scrollbars",
        "--window-size=1200,1020",
        f"--screenshot={shot}",
        url,
    )
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1200, 1020)
    # A blank page decompresses to a handful of byte values; a drawn one to many.
    assert len(set(pixels)) > 100
    if os.environ.get("RESILIENT_UPDATE_DOCS_IMG"):
        target = ROOT / "docs" / "img" / "chaos-report.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, target)
