"""Every example runs, and prints what docs/examples.md says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "examples.md"
EXAMPLE = re.compile(
    r"<!-- docs-test: example (?P<command>[^>]*?)(?P<postgres> postgres)? -->\n```text\n"
    r"(?P<output>.*?)```",
    re.S,
)
EXAMPLES = [
    (m["command"].strip(), bool(m["postgres"]), m["output"])
    for m in EXAMPLE.finditer(PAGE.read_text())
]


def test_every_example_folder_is_on_the_page() -> None:
    documented = " ".join(command for command, _, _ in EXAMPLES)
    entry_points = [
        *(ROOT / "examples").glob("*.py"),
        *(ROOT / "examples").glob("*/app.py"),
        *(ROOT / "examples").glob("*/*.toml"),
    ]
    paths = [str(p.relative_to(ROOT)) for p in entry_points]
    assert [p for p in paths if p not in documented] == []


@pytest.mark.parametrize(
    ("command", "postgres", "expected"), EXAMPLES, ids=[e[0] for e in EXAMPLES]
)
def test_example_prints_what_its_page_says(
    command: str, postgres: bool, expected: str, request: pytest.FixtureRequest
) -> None:
    env = dict(os.environ)
    if postgres:
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    done = subprocess.run(
        [sys.executable, "-W", "error", *command.split()],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for line in expected.strip().splitlines():
        assert line.strip() in output, f"{command} no longer prints {line!r}:\n{output}"
