"""Shared fixtures: a fake randomuser.me on loopback, settings that point at it, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(TESTS)]

import random_user_etl as etl  # noqa: E402
from fake_api import FIXTURES, FakeRandomUser  # noqa: E402
from random_user_config import Settings  # noqa: E402

# Waits are settings: tests shrink them so no case sleeps for long.
FAST = dict(timeout=2.0, retries=3, backoff=0.01, rate_limit_wait=0.05)


def fixture_bytes(name: str) -> bytes:
    """A recorded answer, byte for byte."""
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict:
    """A recorded answer, parsed by the standard library: the reference for every value check."""
    return json.loads(fixture_bytes(name))


@pytest.fixture
def api():
    """A fake randomuser.me serving the recorded answers on 127.0.0.1."""
    with FakeRandomUser() as server:
        yield server


@pytest.fixture
def out(tmp_path) -> Path:
    """The output folder of a test run."""
    return tmp_path / "out"


@pytest.fixture
def raw(tmp_path) -> Path:
    """The raw-answer folder of a test run."""
    return tmp_path / "raw"


@pytest.fixture
def settings(api, out, raw):
    """Settings(**changes) for a run against the fake API with fast waits."""

    def make(**changes) -> Settings:
        values = dict(FAST, api_url=api.url, output_dir=str(out), raw_dir=str(raw))
        values.update(changes)
        return Settings(**values)

    return make


def clean_environ(**env) -> dict:
    """This process's environment without any RANDOM_USER_ setting, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RANDOM_USER_")}
    base.update({k: str(v) for k, v in env.items()})
    return base


def fast_env(api_url: str, out: Path, raw: Path, **env) -> dict:
    """Environment variables that point the CLI at a fake API with fast waits."""
    values = {f"RANDOM_USER_{k.upper()}": v for k, v in FAST.items()}
    values.update(RANDOM_USER_API_URL=api_url, RANDOM_USER_OUTPUT_DIR=out, RANDOM_USER_RAW_DIR=raw)
    values.update(env)
    return values


@pytest.fixture
def cli():
    """Run `python random_user_etl.py ARGS` in a subprocess, as an operator would."""

    def run(*args, env: dict | None = None, timeout: float = 60, **popen) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "random_user_etl.py"), *map(str, args)],
            env=clean_environ(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **popen,
        )

    return run


def landed(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes, to prove a failed run changed nothing."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def batch_files(folder: Path) -> list[str]:
    """The names of the landed batch files in a folder."""
    return sorted(p.name for p in folder.glob(etl.BATCH_GLOB))
