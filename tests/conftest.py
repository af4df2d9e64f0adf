"""Shared fixtures: a fake randomuser.me on loopback, settings that point at it, the CLI."""

from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import polars as pl
import pytest

# The project is imported as installed (pip install -e .); pytest puts this folder on sys.path for its helpers.
from fake_api import FIXTURES, FakeRandomUser
from oracle import COLUMNS, LONE_SURROGATE, USER_COLUMNS, Refused, raw_key, reference_rows, user_rows  # noqa: F401  (the one oracle)

import random_user_etl as etl
from _random_user_etl import sort, store, wire
from _random_user_etl.places import staging_root
from random_user_config import Settings

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

PREFIX = "random_user_etl.py: error: "
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")

# Waits are settings: tests shrink them so no case sleeps for long.
FAST = dict(timeout=2.0, retries=3, backoff=0.01, rate_limit_wait=0.05)


def fixture_bytes(name: str) -> bytes:
    """A recorded answer, byte for byte."""
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict:
    """A recorded answer, parsed by the standard library: the reference for every value check."""
    return json.loads(fixture_bytes(name))


# ---------------------------------------------------------------- the raw reference
# What the recorded JSON says, read by the standard library: what landed values are checked against.

PURA = "default_seed-pura_results-100.json"
GBONLY = "nat-gb_seed-gbonly_results-25.json"
PAGED = tuple(f"paged_seed-paged_results-40_page-{page}.json" for page in (1, 2, 3))  # seed "paged", 40 a page


def raw_users(*names: str, limits: dict[str, int] | None = None) -> list[dict]:
    """The users of recorded answers, parsed by the standard library (the first `limits[name]` of one)."""
    users = []
    for name in names:
        results = fixture_json(name)["results"]
        users += results[: (limits or {}).get(name, len(results))]
    return users


def assert_rows_are(frame: pl.DataFrame, users: list[dict]) -> None:
    """The frame holds exactly these raw users, each with every column the oracle reads from the raw JSON."""
    assert frame.height == len(users), "a user landed twice, or not at all"
    got = {row["user_id"]: {name: row[name] for name in USER_COLUMNS} for row in frame.to_dicts()}
    expected = user_rows(users)
    assert sorted(got) == sorted(expected)
    for user_id, row in got.items():
        assert row == expected[user_id], user_id


def served_users(seed: str, n: int, page_size: int) -> list[dict]:
    """The users the fake serves a run of (seed, n, page_size), page by page, parsed by the standard library."""
    from fake_api import page_body

    full, rest = divmod(n, page_size)  # written out, not the job's page_sizes: full pages, then the rest
    sizes = [page_size] * full + ([rest] if rest else [])
    users = [u for page, size in enumerate(sizes, start=1) for u in json.loads(page_body(seed, page, size))["results"]]
    assert len(users) == n
    return users


def assert_null_counts(report: dict, users: list[dict]) -> None:
    """A batch's quality report counts, as nulls, exactly the raw users' empty national ids (no other column has any)."""
    no_id = sum(1 for u in users if not u["id"]["value"])
    assert no_id and {k: v for k, v in report["nulls"].items() if v} == {"national_id": no_id, "national_id_type": no_id}


def record_sorts(monkeypatch) -> list:
    """Every ExternalSort the job makes from here on (the real class), to check how many key ranges it used."""
    made = []

    class Recorded(sort.ExternalSort):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sort, "ExternalSort", Recorded)
    return made


def nationality_counts(users: list[dict]) -> dict[str, int]:
    """How many raw users of each nationality."""
    return dict(collections.Counter(u["nat"] for u in users))


@pytest.fixture
def api():
    """A fake randomuser.me serving the recorded answers on 127.0.0.1."""
    with FakeRandomUser() as server:
        yield server


@pytest.fixture(scope="session")
def nowhere():
    """An API address on loopback that refuses every connection: a port held bound, never listening."""
    import socket

    with socket.socket() as held:  # held for the session, so no server of a later test can take the port
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/api/1.4/"


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


@dataclasses.dataclass
class Ran:
    """What a CLI run gave: read like subprocess.CompletedProcess (returncode, stdout, stderr)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """cli(*ARGS, env=..., cwd=...): the job's main(ARGS) in this process, as an operator's run would go.

    Only the RANDOM_USER_* variables in `env` are set (and any other name in it); the environment,
    the working folder, the root logger and the stop event are as before once the call returns.
    Tests of the process itself (signals, kill -9, limits, the terminal, memory) use run_cli.
    """

    def call(*args, env: dict | None = None, cwd: Path | None = None) -> Ran:
        with pytest.MonkeyPatch.context() as patch:
            for name in [k for k in os.environ if k.startswith("RANDOM_USER_")]:
                patch.delenv(name)
            for name, value in (env or {}).items():
                patch.setenv(name, str(value))
            if cwd is not None:
                patch.chdir(cwd)
            capsys.readouterr()  # what the test printed before is not the run's
            returncode = main_in_process([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Ran(returncode, out, err)

    return call


def main_in_process(argv: list[str]) -> int:
    """etl.main(argv), its exit status; the root logger, the signal handlers and the stop event restored afterwards."""
    root, urllib3_log = logging.getLogger(), logging.getLogger("urllib3")
    saved = root.handlers[:], root.level, urllib3_log.level
    # A stopped run leaves SIGINT and SIGTERM ignored (the process is leaving): a later test's
    # subprocess would inherit that and never hear its own Ctrl-C.
    # (Only the main thread may set handlers, and a run in another thread sets none.)
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    root.handlers[:] = []  # main's basicConfig(force=True) would close pytest's own handlers
    try:
        return etl.main(argv)
    except SystemExit as exc:  # argparse: --help, or a bad flag
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level, urllib3_level = saved
        root.setLevel(level)
        urllib3_log.setLevel(urllib3_level)
        logging.captureWarnings(False)  # main routes warnings into the log: this process's go back to pytest
        wire.STOP.clear()  # a stopped run leaves the event set: the next test starts unstopped
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# A real S3-protocol server on loopback (moto), for the object-storage tests.


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for the whole session."""
    from moto.server import (
        ThreadedMotoServer,  # imported here: only the S3 tests pay for it
    )

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_environ(endpoint: str, home: Path) -> dict[str, str]:
    """The standard AWS_* variables for the loopback store; no profile or config file of the machine."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclasses.dataclass
class Bucket:
    """A fresh bucket on the loopback store, and what landed in it."""

    name: str
    client: object

    def url(self, prefix: str = "lake") -> str:
        """The s3:// address of a prefix in this bucket."""
        return f"s3://{self.name}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under a prefix but the job's write check (store.WRITE_CHECK, which test_s3 looks at on its own)."""
        return [key for key in self.all_keys(prefix) if key.rpartition("/")[2] != store.WRITE_CHECK]

    def all_keys(self, prefix: str = "") -> list[str]:
        """Every key under a prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def head(self, key: str) -> dict:
        """The object's ETag, size and time."""
        return self.client.head_object(Bucket=self.name, Key=key)

    def staged(self, prefix: str = "lake") -> Path:
        """The local staging folder of runs landing in this prefix."""
        return staging_root(self.url(prefix))


@pytest.fixture
def s3(s3_endpoint, tmp_path, monkeypatch) -> Bucket:
    """A new bucket; AWS_* point this process and its children at the loopback store.

    The temp folder (where runs for object storage stage their pages) is the test's own, for
    this process (tempfile.tempdir) and for the CLI's (TMPDIR) alike.
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_environ(s3_endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # Polars keeps one client per bucket for the life of the process: a fresh name per test.
    import boto3

    name = f"lake-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


def landed(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes, to prove a failed run changed nothing."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def batch_files(folder: Path) -> list[str]:
    """The names of the landed batch files in a folder."""
    return sorted(p.name for p in folder.glob(store.BATCH_GLOB))


def run_cli(*args, env: dict | None = None, timeout: float = 60, **popen) -> subprocess.CompletedProcess:
    """`python random_user_etl.py ARGS` in a subprocess, like the `cli` fixture, usable from any thread."""
    return subprocess.run(
        [sys.executable, str(ROOT / "random_user_etl.py"), *map(str, args)],
        env=clean_environ(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **popen,
    )


class CasePool:
    """Runs the selected cases of a parametrised test a few at a time, each in its own folder.

    A CLI run costs about half a second of CPU, mostly the Polars import: running the cases of a
    matrix two or three at a time keeps the suite fast on two cores. Only the cases pytest
    selected (see -k) are run; each test then asserts on its own case's outcome.
    """

    def __init__(self, request, argname: str, work, tmp_path_factory, workers: int = 3):
        cases = [
            item.callspec.params[argname]
            for item in request.session.items
            if item.module is request.module and argname in getattr(getattr(item, "callspec", None), "params", {})
        ]
        folders = {case: tmp_path_factory.mktemp(re.sub(r"\W+", "-", str(case))[:40]) for case in dict.fromkeys(cases)}
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="case")
        self.futures = {case: self.pool.submit(work, case, folder) for case, folder in folders.items()}

    def result(self, case):
        """The outcome of one case (its exception, if the harness itself failed)."""
        return self.futures[case].result(timeout=120)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.pool.shutdown(wait=True, cancel_futures=True)


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """landed() with each file's bytes as a short hash: the same check, a readable diff."""
    return {name: hashlib.sha256(data).hexdigest()[:16] for name, data in files.items()}


def assert_one_error_line(stderr: str, says: str) -> str:
    """Exactly one error line, last, matching `says`; every other line a log line; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith(PREFIX), stderr
    assert re.search(says, lines[-1]), lines[-1]
    assert len(lines[-1]) < 400, lines[-1]
    assert all(LOG_LINE.match(line) for line in lines[:-1]), stderr
    return lines[-1]


# Answer doctors for fake_api.mutate: each returns a fn(doc) -> doc.


def users(change):
    """A mutate fn applying `change(results)` to the list of users, returning the document."""

    def fn(doc):
        change(doc["results"])
        return doc

    return fn


def info(**fields):
    """A mutate fn changing fields of `info`."""

    def fn(doc):
        doc["info"].update(fields)
        return doc

    return fn


def duplicate_first_id(results):
    results[1]["login"]["uuid"] = results[0]["login"]["uuid"]


@pytest.fixture(autouse=True)
def unstopped():
    """Every test starts, and leaves the process, with the job's stop event clear (a stopped run sets it)."""
    wire.STOP.clear()
    yield
    wire.STOP.clear()


@contextlib.contextmanager
def on_log(text: str, act):
    """While held, call `act` once, on the first record of the job's log (debug included) that starts with `text`."""

    class Once(logging.Handler):
        def emit(self, record):
            nonlocal act
            if act and record.getMessage().startswith(text):
                act, then = None, act
                then()

    log, handler = logging.getLogger("random_user_etl"), Once(logging.DEBUG)
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
