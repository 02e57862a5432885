"""The ``resilient-db`` command line: the README's main job, exit codes, Ctrl-C, the proxy."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from resilient_db.chaos.cli import main

ROOT = Path(__file__).parent.parent.parent


def command() -> list[str]:
    """The installed console script, or the module when it is not on disk."""
    script = Path(sys.executable).parent / "resilient-db"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "resilient_db", "chaos"]  # pragma: no cover


def server_free_env() -> dict[str, str]:
    """The environment without any database settings: the default run needs none."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENT_", "PG"))}


def test_the_readme_main_job_runs_with_no_arguments_and_no_server(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    main_job = block.group(1).strip().splitlines()[0].split("&&")[-1].strip()
    assert main_job == ".venv/bin/resilient-db chaos run"

    started = time.monotonic()
    done = subprocess.run(
        [*command(), "chaos", "run"],
        cwd=tmp_path,
        env=server_free_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert took < 40
    out = done.stdout
    assert "resilient-db chaos: quick (builtin:quick)" in out
    for row in ("baseline", "faults", "recovery", "(all)"):
        assert re.search(rf"^{re.escape(row)}\s+\d+-\d+s\s+\d+", out, re.M), row
    assert "result: PASS (exit 0)" in out
    assert re.search(r"^replay: resilient-db chaos run quick --seed \d+$", out, re.M)
    folder = tmp_path / "reports" / "chaos" / "quick"
    for name in ("report.html", "report.json", "junit.xml", "operations.jsonl", "faults.jsonl"):
        assert (folder / name).is_file(), name
    # The library's own logs (retries, unknown commits...) went to a file, not over the
    # progress line.
    logged = (folder / "resilient-db.log").read_text().splitlines()
    assert logged
    assert not [line for line in logged if line.split(": ", 1)[-1] in done.stderr]


def test_the_broken_policy_exits_1_and_names_the_duplicated_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit = tmp_path / "junit" / "chaos.xml"
    code = main(
        [
            "chaos",
            "run",
            "blind-retry",
            "--seed",
            "3",
            "--duration",
            "3",
            "--report-dir",
            str(tmp_path / "reports"),
            "--junit",
            str(junit),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(x for x in out.splitlines() if "no_duplicate_keys" in x)
    assert re.search(r"FAIL\s+no_duplicate_keys: \d+ keys written more than once: insert-\d+", line)
    assert "result: SAFETY VIOLATION (exit 1)" in out
    assert "replay: resilient-db chaos run blind-retry --seed 3 --duration 3" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert "no_duplicate_keys" in failed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chaos", "run", "missing.toml"], "missing.toml: no such file, and not a built-in"),
        (["chaos", "run", "--url", "mysql://db/x"], "--url: target.url: driver 'mysql'"),
        (["chaos", "run", "--seed", "-1"], "--seed: scenario.seed: got -1"),
        (["chaos", "run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["chaos", "run", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["chaos"], "choose a command"),
        ([], "choose a command"),
    ],
)
def test_a_bad_invocation_is_a_harness_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 4
    assert message in capsys.readouterr().err


def test_a_scenario_file_error_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[scenario]\nduration = 2\n[workload]\nconcurrency = 'many'\n")
    assert main(["chaos", "run", str(path)]) == 4
    assert capsys.readouterr().err.strip() == (
        f"resilient-db chaos run: {path}: workload.concurrency: got a string 'many'; "
        "accepted: an integer >= 1"
    )


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "run", "--help"]) == 0
    assert "Exit codes: 0 pass, 1 safety invariant violated" in " ".join(
        capsys.readouterr().out.split()
    )


def test_list_shows_the_built_in_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("quick", "blind-retry", "sqlite-outage"):
        assert re.search(rf"^{name}\s+\d+s\s+embedded SQLite\s+\S", out, re.M), name
    assert "INVALID" not in out


def test_python_m_resilient_db_chaos_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "resilient_db.chaos", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "quick" in done.stdout


def test_ctrl_c_cleans_up_writes_partial_reports_and_exits_130(tmp_path: Path) -> None:
    err_lines: list[str] = []
    in_faults = threading.Event()
    with subprocess.Popen(
        [*command(), "chaos", "run", "quick", "--report-dir", str(tmp_path)],
        cwd=tmp_path,
        env=server_free_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        stderr = process.stderr

        def read_progress() -> None:
            for line in stderr:
                err_lines.append(line)
                if "phase faults starts" in line:
                    in_faults.set()

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        assert in_faults.wait(60), "".join(err_lines)
        time.sleep(1.0)  # into the fault phase, with faults in force
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        out = process.stdout.read()  # a few kilobytes: the pipe never filled
        reader.join(10)
    err = "".join(err_lines)
    assert process.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted: cleaning up" in err
    assert "result: INTERRUPTED (exit 130)" in out
    report = json.loads((tmp_path / "quick" / "report.json").read_text())
    assert report["interrupted"] is True
    assert report["verdict"] == "INTERRUPTED"
    assert 3 < report["elapsed"] < 11  # stopped in the fault phase, not at the 12 s end
    operations = (tmp_path / "quick" / "operations.jsonl").read_text().splitlines()
    assert len(operations) == report["counts"]["operations"] > 100


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server that echoes what it gets, on a free port (stopped after the test)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_the_standalone_proxy_forwards_with_its_faults_and_serves_the_api(
    echo_server: int,
) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resilient_db.chaos",
            "proxy",
            "--upstream",
            f"127.0.0.1:{echo_server}",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--no-postgres",
            "--fault",
            'proxy = "latency", latency = 0.2',
            "--duration",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(4)]
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", banner[0])
        api = re.search(r"Toxiproxy API on (http://\S+)", "".join(banner))
        assert listening and api, banner
        with socket.create_connection(("127.0.0.1", int(listening.group(1))), timeout=5) as conn:
            started = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            assert time.monotonic() - started >= 0.2  # the latency toxic applied
        with urllib.request.urlopen(f"{api.group(1)}/proxies", timeout=5) as response:
            proxies = json.loads(response.read())
        assert proxies["pg"]["toxics"][0]["type"] == "latency"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped: 1 connections" in out


def test_the_proxy_refuses_a_fault_it_cannot_apply(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["chaos", "proxy", "--upstream", "127.0.0.1:5432", "--fault", 'injector = "hang", rate = 1']
    )
    assert code == 4
    assert "the standalone proxy takes proxy faults only" in capsys.readouterr().err
