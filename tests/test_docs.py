"""The README's settings table is the one the settings themselves give."""

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
