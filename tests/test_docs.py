"""The README as a newcomer uses it: its settings table is the one the settings give, its analyst snippets run as printed."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "settings_table.py"
MARKERS = runpy.run_path(str(SCRIPT))  # the script's own BEGIN and END markers
BEGIN, END = MARKERS["BEGIN"], MARKERS["END"]


def test_readme_settings_table_is_the_generated_one(tmp_path):
    """Run from another folder, so a default folder under the working folder or the job's reads the same."""
    made = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme, "the README has lost the settings table's markers"
    in_readme = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert in_readme.strip() == made.strip(), "the README's settings table is stale: run `python docs/settings_table.py --write`"


def test_the_readmes_analyst_snippets_run_as_printed_from_another_folder(tmp_path, monkeypatch):
    """Every Python block of the analyst section, run in a folder where a batch has landed in ./processed_data."""
    import re

    import random_user_etl as etl

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## For analysts", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3, "Polars, pandas and DuckDB"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_USER_OUTPUT_DIR", raising=False)
    etl.replay(ROOT / "tests" / "fixtures" / "default_seed-pura_results-100.json", raw_dir="off")
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # raises if a snippet does not run as printed


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.split("## Two commands", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "one command sets up and runs the job, one the tests"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci == commands[1]
