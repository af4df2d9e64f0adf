"""The project as a package: pyproject.toml's requirements, the wheel it builds, and an install in a fresh venv.

Every build here runs offline: no build isolation (setuptools comes from the test environment), no
dependencies (they are the test environment's), on a copy of the project, so nothing lands in the tree.
"""

from __future__ import annotations

import configparser
import email
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from support import ROOT, clean_environ
from packaging.requirements import Requirement

from _random_user_etl import __version__

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text()) if (ROOT / "pyproject.toml").exists() else {}
# What the image and `pip install .` must carry: the job's three modules and its private package.
MODULES = {"random_user_etl.py", "random_user_config.py", "schemas.py"} | {f"_random_user_etl/{p.name}" for p in (ROOT / "_random_user_etl").glob("*.py")}
# Left out of the copy a build runs on: what a run, a test run or a venv leaves in a checkout.
LEFTOVERS = shutil.ignore_patterns(
    ".git",
    ".venv",
    "processed_data",
    "raw_data",
    ".staging",
    "__pycache__",
    "build",
    "*.egg-info",
    ".hypothesis",
    ".pytest_cache",
    "results",
    ".ruff_cache",
    ".mypy_cache",
)


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def by_name(requirements) -> dict[str, str]:
    """Each requirement's canonical name with its extras and version bounds, as packaging reads them."""
    parsed = [Requirement(text) for text in requirements]
    return {req.name.lower().replace("_", "-"): (sorted(req.extras), str(req.specifier)) for req in parsed}


def test_requirements_txt_pins_exactly_the_runtime_dependencies_of_pyproject():
    # The image installs requirements.txt, `pip install .` the pyproject's list: the same job needs the same.
    assert by_name(requirement_lines(ROOT / "requirements.txt")) == by_name(PYPROJECT["project"]["dependencies"])


def test_requirements_delta_txt_pins_exactly_the_delta_extra_of_pyproject():
    # The image installs requirements-delta.txt beside requirements.txt, `pip install .[delta]` the extra: the same table needs the same.
    assert by_name(requirement_lines(ROOT / "requirements-delta.txt")) == by_name(PYPROJECT["project"]["optional-dependencies"]["delta"])


def test_requirements_dev_txt_installs_the_project_with_its_dev_extra():
    assert requirement_lines(ROOT / "requirements-dev.txt") == ["-e .[dev]"]
    dev = by_name(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert {"pytest", "pytest-xdist", "moto", "ruff", "mypy", "packaging", "setuptools"} <= set(dev)
    assert dev["random-user-etl"] == (["analyst", "delta"], "")  # the analyst's readers and the Delta table too: the engine and delta tests use them


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the project as a checkout holds it, to build from."""
    copy = tmp_path_factory.mktemp("checkout") / "random-user-etl"
    shutil.copytree(ROOT, copy, ignore=LEFTOVERS)
    return copy


def pip(python: str | Path, *args, cwd: Path) -> None:
    """Run pip offline under `python`, failing the test with pip's own output."""
    result = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args, "--no-index", "--no-deps", "--no-build-isolation"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip wheel .` builds from the copy."""
    folder = tmp_path_factory.mktemp("wheel")
    pip(sys.executable, "wheel", "-q", ".", "-w", str(folder), cwd=source)
    [built] = folder.glob("*.whl")
    assert built.name == f"random_user_etl-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_wheel_holds_the_job_and_nothing_else(wheel):
    dist_info = f"random_user_etl-{__version__}.dist-info/"
    names = set(wheel.namelist())
    assert {name for name in names if not name.startswith(dist_info)} == MODULES


def test_the_wheel_declares_the_console_script_version_and_runtime_requirements(wheel):
    dist_info = f"random_user_etl-{__version__}.dist-info/"
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(dist_info + "entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"random-user-etl": "random_user_etl:cli"}
    metadata = email.message_from_bytes(wheel.read(dist_info + "METADATA"))
    assert metadata["Name"] == "random-user-etl" and metadata["Version"] == __version__
    runtime = [text for text in metadata.get_all("Requires-Dist") if "extra ==" not in text]
    assert by_name(runtime) == by_name(requirement_lines(ROOT / "requirements.txt"))


def sharing_venv(folder: Path) -> Path:
    """A venv with no packages of its own that sees this test run's installed packages (not its editable project); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # A path listed in a .pth file is searched, but the .pth files inside it are not run: the
    # editable install's finder stays off, so the project is found only where this venv installs it.
    shared = [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages") and Path(path).is_dir()]
    Path(own, "shared-test-environment.pth").write_text("".join(f"{path}\n" for path in shared))
    return python


def test_pip_install_dot_in_a_fresh_venv_gives_the_module_and_the_command_outside_the_checkout(source, tmp_path):
    python = sharing_venv(tmp_path / "venv")
    pip(python, "install", "-q", ".", cwd=source)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_environ()
    env.pop("PYTHONPATH", None)
    code = "from random_user_etl import read_processed; import random_user_etl, schemas; print(random_user_etl.__file__, schemas.__file__)"
    found = subprocess.run([str(python), "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert all(Path(path).is_relative_to(tmp_path / "venv") for path in found.stdout.split()), found.stdout
    command = tmp_path / "venv" / "bin" / "random-user-etl"
    version = subprocess.run([str(command), "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"random-user-etl {__version__}\n"), version.stderr
    refused = subprocess.run([str(command), "--n", "0"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr == "random-user-etl: error: --n (RANDOM_USER_N) must be at least 1\n", refused.stderr
    assert os.listdir(elsewhere) == []  # refused before anything is made
