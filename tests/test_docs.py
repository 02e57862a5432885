"""The docs say what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from resilient_db._doctables import sqlite_table, sqlstate_table

ROOT = Path(__file__).parent.parent


def test_errors_page_embeds_the_current_sqlstate_table() -> None:
    assert sqlstate_table() in (ROOT / "docs" / "errors.md").read_text()


def test_errors_page_embeds_the_current_sqlite_table() -> None:
    assert sqlite_table() in (ROOT / "docs" / "errors.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    main_job, tests = block.group(1).strip().splitlines()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci.splitlines()
    assert main_job.split("&&")[-1].strip() in ci


RUN = re.compile(
    r"<!-- docs-test: run -->\n```python\n(?P<code>.*?)```"
    r"(?:\s*<!-- docs-test: output -->\n```text\n(?P<output>.*?)```)?",
    re.S,
)


def runnable_blocks() -> list[tuple[str, str, str]]:
    """Every code block marked to run: (where, code, expected output lines)."""
    found = []
    for page in sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]):
        for n, match in enumerate(RUN.finditer(page.read_text()), 1):
            where = f"{page.relative_to(ROOT)}#{n}"
            found.append((where, match["code"], match["output"] or ""))
    return found


BLOCKS = runnable_blocks()


def test_the_docs_have_runnable_blocks() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(("where", "code", "expected"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_self_contained_doc_blocks_run_and_print_what_the_page_says(
    where: str, code: str, expected: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr}"
    for line in expected.strip().splitlines():
        assert line in done.stdout, f"{where} no longer prints {line!r}:\n{done.stdout}"
