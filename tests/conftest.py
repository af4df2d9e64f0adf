"""Fixtures: a fake randomuser.me on loopback, settings that point at it, the CLI in this process, a bucket on a loopback S3."""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path

import pytest

# The project is imported as installed (pip install -e .); pytest puts this folder on sys.path for its helpers.
from fake_api import FakeRandomUser
from support import FAST, Bucket, Ran, aws_environ, run_cli

from random_user_config import Settings


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


@pytest.fixture
def cli(capsys):
    """cli(*ARGS, env=..., cwd=...): the job's main(ARGS) in this process (support.run_cli with in_process)."""

    def call(*args, env: dict | None = None, cwd: Path | None = None) -> Ran:
        return run_cli(*args, env=env, in_process=capsys, cwd=cwd)

    return call


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


# One local Spark session, for the tests that read the lake with Spark (engines, Delta).


@pytest.fixture(scope="module")
def spark():
    """A one-thread local Spark session, bound to loopback, UTC, no UI."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("random-user-etl-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.default.parallelism", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
