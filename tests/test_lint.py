"""Lint and types as tests: ruff's checks and format, and mypy over the job's modules, as pyproject.toml configures them.

Each tool runs from the test environment (`python -m ...`) in the checkout, so a red lint is a red test run.
Nothing is left in the tree: ruff keeps no cache, and mypy's cache lives in the test's temporary folder.
The virtual environment and build/ are never read: ruff's extend-exclude leaves them out, and mypy
reads only the files pyproject.toml names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

CHECKS = {
    "ruff-check": ["ruff", "check", "--no-cache", "."],
    "ruff-format": ["ruff", "format", "--no-cache", "--check", "."],
    "mypy": ["mypy", "--cache-dir", "{cache}"],
}


@pytest.mark.parametrize("command", CHECKS.values(), ids=CHECKS.keys())
def test_the_checkout_passes(command: list[str], tmp_path: Path):
    args = [arg.replace("{cache}", str(tmp_path / "mypy-cache")) for arg in command]
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{' '.join(args)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
