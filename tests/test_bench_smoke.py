"""The benchmark runs end to end and writes well-formed output (never a timing check).

``python -m bench --quick`` runs every figure with a few iterations against the
test run's PostgreSQL server and a temporary SQLite file; this test only checks
that it exits cleanly and that the JSON and the SVG it writes are complete: every
figure, every variant, every target, numbers where numbers are due. What the
numbers say is for docs/performance.md, from a real run.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench.instructions import PRICES, VARIANTS, callgrind, type_cache_misses

ROOT = Path(__file__).resolve().parent.parent

FIGURES = [
    "overhead",
    "transaction",
    "rejection",
    "deadline",
    "outage",
    "recovery",
    "memory",
    "proxy",
]

OVERHEAD_VARIANTS = {
    "raw",
    "raw, listeners installed",
    "@resilient",
    "@resilient + OTel SDK",
    "ResilientEngine",
    "ResilientEngine + OTel SDK",
    "hand-glued",
    "hand-glued + OTel span",
    "stamina",
}
DEADLINE_VARIANTS = {
    "@resilient(timeout=T)",
    "@resilient(deadline=T, retries=3)",
    "ResilientEngine(timeout=T)",
    "asyncio.timeout(T) + plain session",
}
OUTAGE_VARIANTS = {
    "no retry (raw engine)",
    "tenacity alone (4 attempts)",
    "hand-glued (tenacity + aiobreaker)",
    "stamina (4 attempts)",
    "@resilient (budget + breaker)",
    "ResilientEngine (budget + breaker)",
}
RECOVERY_VARIANTS = {
    "no retry (raw engine)",
    "tenacity alone",
    "hand-glued (tenacity + aiobreaker)",
    "stamina",
    "@resilient",
    "ResilientEngine",
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _run_bench(module: str, out: Path, pg_url: str, *options: str) -> str:
    """``python -m <module> <options> --out <out> --pg-url <pg_url>``: it must exit
    cleanly; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", module, *options, "--out", str(out), "--pg-url", pg_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"python -m {module} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def quick_run(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    stdout = _run_bench("bench", out, pg_url, "--quick")
    (json_path,) = out.glob("bench-*.json")
    (svg_path,) = out.glob("bench-*.svg")
    return json_path, svg_path, stdout


@pytest.mark.postgres
def test_every_figure_is_reported_with_its_targets(quick_run: tuple[Path, Path, str]) -> None:
    json_path, _, stdout = quick_run
    report = json.loads(json_path.read_text())
    assert report["quick"] is True
    assert report["failed"] == {}
    assert list(report["figures"]) == FIGURES
    assert report["versions"]["postgresql"]
    for key, figure in report["figures"].items():
        assert figure["title"] and figure["table"], key
        assert figure["table"] in stdout, key
        for target in figure["targets"]:
            assert target["what"] and target["unit"], (key, target)
            assert _number(target["limit"]), (key, target)
            assert target["measured"] is None or _number(target["measured"]), (key, target)
            assert target["met"] in (True, False, None), (key, target)
    assert "=== targets ===" in stdout


@pytest.mark.postgres
def test_each_figure_has_every_variant_and_its_numbers(quick_run: tuple[Path, Path, str]) -> None:
    figures = json.loads(quick_run[0].read_text())["figures"]

    overhead = figures["overhead"]["data"]["results"]
    assert [r["database"] for r in overhead] == ["PostgreSQL (asyncpg)", "SQLite (aiosqlite)"]
    for result in overhead:
        rows = {row["variant"]: row for row in result["rows"]}
        assert set(rows) >= OVERHEAD_VARIANTS
        assert rows["raw"]["ratio"] == 1.0
        for row in rows.values():
            assert _number(row["median_us"]) and row["median_us"] > 0
            assert _number(row["ratio"]) and _number(row["cpu_ratio"])
            assert len(row["per_round_us"]) == row["rounds"]
            assert _number(row["extra"]["spans_per_op"])

    transaction = figures["transaction"]["data"]
    assert len(transaction["rows"]) == 5
    assert _number(transaction["set_local_round_trip_us"])
    assert all(_number(r["extra"]["statements_per_unit"]) for r in transaction["rows"])

    rejection = figures["rejection"]["data"]
    assert len(rejection["rows"]) == 7
    assert all(isinstance(v, int) for k, v in rejection["witness"].items())

    deadline = figures["deadline"]["data"]
    for database in ("postgresql", "sqlite"):
        assert set(deadline[database]) == DEADLINE_VARIANTS
        for summary in deadline[database].values():
            assert _number(summary["late_ms_median"]) and summary["errors"]

    outage = {r["variant"]: r for r in figures["outage"]["data"]["rows"]}
    assert set(outage) >= OUTAGE_VARIANTS
    for row in outage.values():
        assert row["requests"] > 0 and isinstance(row["witness_connections"], int)
        assert _number(row["ratio_to_no_retry"])

    recovery = figures["recovery"]["data"]
    assert {r["variant"] for r in recovery["rows"]} == RECOVERY_VARIANTS
    assert set(recovery["timeline"]) == RECOVERY_VARIANTS
    for row in recovery["rows"]:
        assert _number(row["baseline_per_s"])
        assert row["first_success_s"] is None or _number(row["first_success_s"])

    memory = figures["memory"]["data"]["rows"]
    assert [r["variant"] for r in memory] == ["@resilient", "@resilient + OTel SDK", "hand-glued"]
    for row in memory:
        assert len(row["samples_kib"]) == 11 and row["peak_rss_kib"] > 0
        assert _number(row["slope_bytes_per_call"])
        assert _number(row["steady_slope_bytes_per_call"])

    proxy = figures["proxy"]["data"]
    assert _number(proxy["added_p50_us"]) and set(proxy["summary"]) == {"direct", "proxied"}


@pytest.mark.postgres
def test_the_plot_is_an_svg_with_a_panel_per_figure(quick_run: tuple[Path, Path, str]) -> None:
    root = ET.parse(quick_run[1]).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    titles = [
        "".join(node.itertext())
        for node in root.iter("{http://www.w3.org/2000/svg}text")
        if node.get("class") == "title"
    ]
    for number in range(1, 7):
        assert any(title.startswith(f"{number}. ") for title in titles), (number, titles)
    bars = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    lines = list(root.iter("{http://www.w3.org/2000/svg}polyline"))
    assert len(bars) > 20 and len(lines) >= len(RECOVERY_VARIANTS) + 3


@pytest.mark.postgres
def test_the_ablation_runs_every_variant_and_writes_numbers(pg_url: str, tmp_path: Path) -> None:
    stdout = _run_bench("bench.ablation", tmp_path, pg_url, "--quick")
    (json_path,) = tmp_path.glob("ablation-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    names = [row["variant"] for row in rows]
    assert names[:3] == ["raw", "raw, listeners installed", "@resilient"]
    assert sum(name.startswith("ResilientEngine") for name in names) == 5
    for row in rows:
        assert _number(row["ratio"]) and _number(row["cpu_ratio"]), row
        assert row["variant"] in stdout


@pytest.mark.postgres
def test_the_bytecode_count_sees_the_guarded_path(pg_url: str, tmp_path: Path) -> None:
    _run_bench("bench.bytecodes", tmp_path, pg_url, "--units", "3")
    (json_path,) = tmp_path.glob("bytecodes-*.json")
    rows = {row["variant"]: row for row in json.loads(json_path.read_text())["rows"]}
    assert list(rows) == ["raw", "raw, listeners installed", "@resilient", "ResilientEngine"]
    assert rows["raw"]["bytecodes_per_unit"] > 1000  # the tracer saw SQLAlchemy's work
    # Any Engine listener puts SQLAlchemy on its event-dispatching path: the raw
    # row must run without it, or the baseline hides that cost.
    assert rows["raw, listeners installed"]["beyond_raw"] > 0
    for name in ("@resilient", "ResilientEngine"):
        assert rows[name]["beyond_raw"] > 0, rows[name]
        functions = {f["function"].split(":")[0] for f in rows[name]["top_functions"]}
        assert "_policy.py" in functions  # the policy's own functions are among them


@pytest.mark.postgres
def test_the_side_by_side_comparison_imports_the_earlier_revision(
    pg_url: str, tmp_path: Path
) -> None:
    _run_bench("bench.versus", tmp_path, pg_url, "HEAD", "--quick")
    (json_path,) = tmp_path.glob("versus-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    names = [row["variant"] for row in rows]
    assert names[0] == "raw" and names[2::2] == ["@resilient now", "ResilientEngine now"]
    assert names[1].startswith("@resilient at ") and names[3].startswith("ResilientEngine at ")
    for row in rows:
        assert _number(row["ratio"]) and _number(row["cpu_ratio"]), row


@pytest.mark.postgres
@pytest.mark.parametrize("variant", [*VARIANTS, *PRICES])
def test_the_instruction_count_child_runs_each_unit(pg_url: str, variant: str) -> None:
    # What `python -m bench.instructions` runs under valgrind, run without it here:
    # a child under valgrind takes about a minute to import what it needs.
    child = [sys.executable, "-m", "bench.instructions", "--child", variant]
    done = subprocess.run(
        [*child, "--warmup", "1", "--units", "2", "--pg-url", pg_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_callgrind_totals_are_read_from_its_output(tmp_path: Path) -> None:

    small = callgrind([sys.executable, "-S", "-c", "pass"], tmp_path / "small.out")
    more = callgrind(
        [sys.executable, "-S", "-c", "for _ in range(100_000): pass"], tmp_path / "more.out"
    )
    assert 0 < small < more


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_type_cache_misses_are_the_mro_walks_of_the_profile(tmp_path: Path) -> None:
    # Each new class misses the type cache at its first lookup: 5,000 of them must
    # show as MRO walks a bare interpreter does not make.
    quiet = tmp_path / "quiet.out"
    missing = tmp_path / "missing.out"
    callgrind([sys.executable, "-S", "-c", "pass"], quiet)
    program = "for i in range(5000): getattr(type('C%d' % i, (), {}), 'absent', None)"
    total = callgrind([sys.executable, "-S", "-c", program], missing)
    walks = type_cache_misses(missing)
    assert type_cache_misses(quiet) * 2 < walks < total
