"""Shared fixtures: a fake randomuser.me on loopback, settings that point at it, the CLI."""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import decimal
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(TESTS)]

from fake_api import FIXTURES, FakeRandomUser  # noqa: E402

import random_user_etl as etl  # noqa: E402
from _random_user_etl import client, sort, store, wire  # noqa: E402
from random_user_config import Settings, staging_root  # noqa: E402
from schemas import OUTPUT_SCHEMA  # noqa: E402

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

# Columns compared value by value with the raw JSON.
CHECKED = ("email", "postcode", "latitude", "age", "date_of_birth", "nationality")


def instant(text: str) -> dt.datetime:
    """An ISO-8601 UTC time from the raw JSON as an aware datetime."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def raw_key(user: dict) -> tuple:
    """A raw user's sort key (nationality, last name, first name, id), from the JSON."""
    return (user["nat"], user["name"]["last"], user["name"]["first"], user["login"]["uuid"])


def raw_users(*names: str, limits: dict[str, int] | None = None) -> list[dict]:
    """The users of recorded answers, parsed by the standard library (the first `limits[name]` of one)."""
    users = []
    for name in names:
        results = fixture_json(name)["results"]
        users += results[: (limits or {}).get(name, len(results))]
    return users


def expected_values(users: list[dict]) -> dict[str, dict]:
    """What each user's checked columns must hold, keyed by user id, from the raw JSON."""
    return {
        u["login"]["uuid"]: {
            "email": u["email"],
            "postcode": str(u["location"]["postcode"]),
            "latitude": float(u["location"]["coordinates"]["latitude"]),
            "age": int(u["dob"]["age"]),
            "date_of_birth": instant(u["dob"]["date"]),
            "nationality": u["nat"],
        }
        for u in users
    }


def assert_rows_are(frame: pl.DataFrame, users: list[dict]) -> None:
    """The frame holds exactly these raw users, each with the raw JSON's values."""
    expected = expected_values(users)
    assert sorted(frame["user_id"]) == sorted(expected)
    for row in frame.select("user_id", *CHECKED).to_dicts():
        assert {name: row[name] for name in CHECKED} == expected.pop(row["user_id"])


def served_users(seed: str, n: int, page_size: int) -> list[dict]:
    """The users the fake serves a run of (seed, n, page_size), page by page, parsed by the standard library."""
    from fake_api import page_body

    sizes = client.page_sizes(n, page_size)
    return [u for page, size in enumerate(sizes, start=1) for u in json.loads(page_body(seed, page, size))["results"]]


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
    """etl.main(argv), its exit status; the root logger and the stop event restored afterwards."""
    root, urllib3_log = logging.getLogger(), logging.getLogger("urllib3")
    saved = root.handlers[:], root.level, urllib3_log.level
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
        wire.STOP.clear()  # a stopped run leaves the event set: the next test starts unstopped


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


# ---------------------------------------------------------------- the contract's reference reading
# THE oracle of the fuzz and table tests: every contract column of every row, worked out from what
# Python's json reads, by the contract's rules written out here (not by the job's code):
# - text columns take a JSON string as is; a JSON true/false as "true"/"false"; a JSON integer as its
#   digits ("-0" as "0"); any other JSON number as its shortest round-trip decimal without exponent
#   (1.5e3 -> "1500", 1.50 -> "1.5", -0.0 -> "-0"); an object or array where a value belongs refuses;
# - whole numbers: text of ASCII digits with an optional sign, within Int32;
# - floats: text of a decimal or exponent number, inf or nan (any case, signed), then the range check;
# - instants: YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM), a real date, fraction cut to
#   microseconds, years 1 to 9999 in UTC; nothing else (no leap second, no one-digit month);
# - "" or null national id fields -> null; "" user id -> null; any other null refuses;
# - full_name = first + " " + last, street_address = number + " " + street;
# - a NaN or Infinity constant, a number beyond a float's range, or a lone UTF-16 surrogate in a
#   landed text refuses; so does a body that is not UTF-8 (RFC 8259), a UTF-8 BOM aside. Duplicate keys read as Python's json reads them (the last one wins).


class Refused(Exception):
    """The reference refuses this answer: the job must raise EtlError."""


@dataclasses.dataclass(frozen=True)
class JsonNumber:
    """A JSON number as written, so no reading of it is lost before the contract's rules apply."""

    text: str
    integral: bool


INT32 = (-(2**31), 2**31 - 1)
WHOLE_TEXT = re.compile(r"[+-]?[0-9]+")
FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)
INSTANT_TEXT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(?:\.([0-9]+))?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise Refused(f"{name} is not JSON")


def standard_json(body: bytes):
    """The body as Python's json reads it, numbers kept as written; Refused if it does not read."""
    try:
        # RFC 8259 answers are UTF-8: json.loads(bytes) would also take UTF-16, or raw surrogates (surrogatepass).
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refused("not UTF-8") from None
    try:
        return json.loads(
            text,
            parse_int=lambda text: JsonNumber(text, True),
            parse_float=lambda text: JsonNumber(text, False),
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise Refused(f"json refuses it: {type(exc).__name__}") from None


def as_text(value) -> str | None:
    """A JSON scalar as the contract's text, by the rules above."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, JsonNumber):
        if value.integral:
            return "0" if value.text == "-0" else value.text
        number = float(value.text)
        if math.isinf(number):
            raise Refused("a number beyond a float's range")
        return format(decimal.Decimal(repr(number)).normalize(), "f")
    raise Refused(f"a JSON {type(value).__name__} where a value belongs")


def declared(value, dtype, path: str = ""):
    """The declared part of a raw value (schemas.RAW_*): texts at the leaves, None for a null or absent object."""
    if isinstance(dtype, pl.List):
        if not isinstance(value, list):
            raise Refused(f"{path} is not an array")
        return [declared(item, dtype.inner, path) for item in value]
    if isinstance(dtype, pl.Struct):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise Refused(f"{path} is not an object")
        return {f.name: declared(value.get(f.name), f.dtype, f"{path}.{f.name}") for f in dtype.fields}
    return as_text(value)


def dotted(record: dict | None, path: str):
    """A dotted field of a declared record, None where any object on the way is null."""
    for name in path.split("."):
        if record is None:
            return None
        record = record[name]
    return record


def whole(text: str) -> int:
    """A whole-number column's value, or Refused."""
    if not WHOLE_TEXT.fullmatch(text) or not INT32[0] <= int(text) <= INT32[1]:
        raise Refused("not a whole number")
    return int(text)


def coordinate(text: str, bound: float) -> float:
    """A latitude or longitude, or Refused."""
    if not FLOAT_TEXT.fullmatch(text) or not -bound <= float(text) <= bound:
        raise Refused("not a coordinate")
    return float(text)


def utc_instant(text: str) -> dt.datetime:
    """An instant column's value in UTC, or Refused."""
    match = INSTANT_TEXT.fullmatch(text)
    if not match:
        raise Refused("not an instant")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = dt.timedelta(0) if zone == "Z" else int(zone[0] + "1") * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        local = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), int((fraction or "0")[:6].ljust(6, "0")))
        return (local.replace(tzinfo=dt.timezone.utc) - offset).astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        raise Refused("not a real instant") from None


def reference_rows(body: bytes, ingested_at: dt.datetime) -> list[dict]:
    """Every contract row of an answer (no expectations), from Python's json by the rules above; Refused otherwise."""
    from schemas import MAX_FIELD_BYTES, RAW_RESPONSE, SOURCE_FIELDS

    doc = standard_json(body)
    if not isinstance(doc, dict):
        raise Refused("not one JSON object")
    if doc.get("results") is None:
        raise Refused("no results")
    top = declared(doc, pl.Struct(RAW_RESPONSE))
    if top["error"] is not None:
        raise Refused("a service error")
    info = top["info"] or dict.fromkeys(("seed", "results", "page", "version"))
    if info["page"] is not None and not re.fullmatch(r"[1-9][0-9]{0,4}", info["page"]):
        raise Refused("info.page is no page number")
    if info["results"] is not None and info["results"] != str(len(top["results"])):
        raise Refused("info.results contradicts the users")
    rows = []
    for user in top["results"]:
        text = {name: dotted(user, source) for name, source in SOURCE_FIELDS.items()}
        if text["user_id"] == "":
            text["user_id"] = None
        for name in ("national_id_type", "national_id"):
            text[name] = text[name] or None
        if any(value is None for name, value in text.items() if name not in ("national_id_type", "national_id")):
            raise Refused("a required field is null")
        if any(LONE_SURROGATE.search(value) for value in text.values() if value is not None):
            raise Refused("a lone surrogate in a landed text")
        if any(len(value.encode("utf-8", "surrogatepass")) > MAX_FIELD_BYTES for value in text.values() if value is not None):
            raise Refused("a text field past the contract's length bound")
        rows.append(
            {
                **text,
                "full_name": f"{text['first_name']} {text['last_name']}",
                "date_of_birth": utc_instant(text["date_of_birth"]),
                "age": whole(text["age"]),
                "registered_at": utc_instant(text["registered_at"]),
                "street_number": whole(text["street_number"]),
                "street_address": f"{whole(text['street_number'])} {text['street_name']}",
                "latitude": coordinate(text["latitude"], 90),
                "longitude": coordinate(text["longitude"], 180),
            }
        )
    if len({row["user_id"] for row in rows}) < len(rows):
        raise Refused("a user id repeats")
    if any(LONE_SURROGATE.search(info[name] or "") for name in ("seed", "version")):
        raise Refused("a lone surrogate in info")
    meta = {"seed": info["seed"] or None, "page": int(info["page"]) if info["page"] else None, "api_version": info["version"], "ingested_at": ingested_at}
    columns = OUTPUT_SCHEMA.names()
    return [{name: {**row, **meta}[name] for name in columns} for row in rows]


@pytest.fixture(autouse=True)
def unstopped():
    """Every test starts, and leaves the process, with the job's stop event clear (a stopped run sets it)."""
    wire.STOP.clear()
    yield
    wire.STOP.clear()
