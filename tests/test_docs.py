"""The docs say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

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
