"""Lint and types as tests: ruff's checks and format, and mypy over the job's modules, as pyproject.toml configures them.

Each tool runs from the test environment (`python -m ...`) in the checkout, so a red lint is a red test run.
Nothing is left in the tree: ruff keeps no cache, and mypy's cache lives in the test's temporary folder.
The virtual environment and build/ are never read: ruff's extend-exclude leaves them out, and mypy
reads only the files pyproject.toml names.
"""

from __future__ import annotations

import ast
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


JOB_MODULES = [
    "random_user_etl.py",
    "random_user_config.py",
    "schemas.py",
    *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "_random_user_etl").glob("*.py")),
]
MOST_PARAMETERS = 6  # a step that needs more takes an object that holds them


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """A function's parameters, *args and **kwargs included, a method's self or cls not."""
    args = function.args
    names = [arg.arg for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [f"**{args.kwarg.arg}"] if args.kwarg else []
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_function_of_the_job_takes_more_than_six_parameters():
    crowded = []
    for module in JOB_MODULES:
        for node in ast.walk(ast.parse((ROOT / module).read_text(), module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(parameters(node)) > MOST_PARAMETERS:
                crowded.append(f"{module}:{node.lineno} {node.name}({', '.join(parameters(node))})")
    assert not crowded, "functions with more than six parameters:\n" + "\n".join(crowded)
