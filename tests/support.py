"""What the tests share besides fixtures: the recorded answers and their raw reading, the job's CLI run
in this process or in one of its own, waits that poll, and checks of what a run left behind."""

from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import http.server
import importlib.util
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import pytest

# The project is imported as installed (pip install -e .); pytest puts this folder on sys.path for its helpers.
from fake_api import FIXTURES
from oracle import COLUMNS, LONE_SURROGATE, USER_COLUMNS, Refused, raw_key, reference_rows, user_rows  # noqa: F401  (the one oracle)

import random_user_etl as etl
from _random_user_etl import sort, store
from _random_user_etl.run import Run, SortSizes
from random_user_config import Settings
from _random_user_etl.sources import ServicePages
from _random_user_etl.places import staging_root

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


def land_sorted(settings: Settings, run_rows: int, group_rows: int):
    """A run whose external sort takes these sizes: small ones make a few pages into many key ranges."""
    return Run(settings, ServicePages(), sort_sizes=SortSizes(run_rows, group_rows)).land()


def nationality_counts(users: list[dict]) -> dict[str, int]:
    """How many raw users of each nationality."""
    return dict(collections.Counter(u["nat"] for u in users))


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
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


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

    def delta_log(self, table: str) -> list[list[dict]]:
        """The actions of each version of the Delta table under `table` (a key prefix), read from its log by the standard library."""
        # Not through deltalake: some of its calls hold the GIL while they wait on the store, which this process serves.
        keys = [key for key in self.all_keys(f"{table}/_delta_log/") if key.endswith(".json")]
        bodies = [self.client.get_object(Bucket=self.name, Key=key)["Body"].read().decode() for key in keys]
        return [[json.loads(line) for line in body.splitlines() if line.strip()] for body in bodies]

    def head(self, key: str) -> dict:
        """The object's ETag, size and time."""
        return self.client.head_object(Bucket=self.name, Key=key)

    def staged(self, prefix: str = "lake") -> Path:
        """The local staging folder of runs landing in this prefix."""
        return staging_root(self.url(prefix))


def landed(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes, to prove a failed run changed nothing."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def batch_files(folder: Path) -> list[str]:
    """The names of the landed batch files in a folder."""
    return sorted(p.name for p in folder.glob(store.BATCH_GLOB))


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


# ---------------------------------------------------------------- the job's CLI, launched
# One launcher: run_cli runs `random_user_etl.py ARGS` to its end, in this process (in_process=capsys,
# which the `cli` fixture passes) or in one of its own; start_cli starts it in the background, for
# tests of the process itself (signals, kill -9). Only the RANDOM_USER_* variables in `env` are set.

SCRIPT = ROOT / "random_user_etl.py"

# Runs the job in-process and records its own high-water mark on exit. Not getrusage: on Linux
# a child's ru_maxrss starts at its parent's RSS at fork, and pytest grows large over a session.
PEAK_LAUNCHER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    open(os.environ["PEAK_FILE"], "w").write(peak)
"""


@dataclasses.dataclass
class Ran:
    """What a CLI run gave, read like subprocess.CompletedProcess; peak_mb is its own peak RSS when measured."""

    returncode: int
    stdout: str
    stderr: str
    peak_mb: float | None = None


def job_command(args: Sequence, via: Sequence = (), prefix: Sequence[str] = ()) -> list[str]:
    """`[PREFIX] python random_user_etl.py ARGS`; with `via` (code, *its args), `python -c CODE ... ARGS` instead."""
    if via:
        code, *before = via
        return [*prefix, sys.executable, "-c", code, *map(str, before), *map(str, args)]
    return [*prefix, sys.executable, str(SCRIPT), *map(str, args)]


def start_cli(*args, env: dict | None = None, log: Path | None = None, via: Sequence = (), prefix: Sequence[str] = (), **popen) -> subprocess.Popen:
    """The CLI started in a process of its own, in the background; its stderr to the file `log` (a pipe nobody reads could block it)."""
    popen = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True) | popen
    with open(log, "w") if log is not None else contextlib.nullcontext() as handle:
        if handle is not None:
            popen["stderr"] = handle
        return subprocess.Popen(job_command(args, via, prefix), env=clean_environ(**(env or {})), **popen)


def run_cli(*args, env: dict | None = None, timeout: float = 60, in_process=None, measure: bool = False, **launch) -> Ran:
    """The CLI run to its end: in this process with in_process=capsys, else in its own (`launch`: start_cli's via, prefix, cwd, ...).

    measure: the run's own peak memory, in peak_mb. In this process, only `cwd` of `launch` is taken;
    the environment, the working folder, the root logger and the stop event are as before once it returns.
    """
    if in_process is not None:
        return run_in_process(in_process, args, env, launch.pop("cwd", None))
    env = dict(env or {})
    if measure:  # in a temp file of the run's own: runs of many threads at once measure apart
        peak = Path(tempfile_path("peak"))
        env["PEAK_FILE"], launch["via"] = peak, (PEAK_LAUNCHER, SCRIPT)
    launch = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE) | launch
    with start_cli(*args, env=env, **launch) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    peak_mb = None
    if measure:
        peak_mb = int(peak.read_text()) / 1024  # VmHWM is in kB
        peak.unlink()
    return Ran(proc.returncode, stdout, stderr, peak_mb)


def tempfile_path(name: str) -> str:
    """A new, empty file of this user's in the temp folder, for a child to write into."""
    import tempfile

    handle, path = tempfile.mkstemp(prefix=f"{name}-")
    os.close(handle)
    return path


def run_in_process(capsys, args: Sequence, env: dict | None, cwd: Path | None) -> Ran:
    """main(ARGS) in this process, as an operator's run would go; what it printed, read through capsys."""
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


def wait_until(condition: Callable[[], object], timeout: float = 20.0, what: str = "", step: float = 0.01) -> None:
    """Poll condition() every `step` seconds until it is true; fail the test, naming `what`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not so within {timeout} s: {what or condition}")
        time.sleep(step)


# ---------------------------------------------------------------- what the job logs

RETRY_LINE = re.compile(r"retry (\d+) of (\d+) for (\S+): (.+)")


def assert_pura_landed(path) -> None:
    """The landed batch holds exactly the recorded users of seed pura, value for value."""
    frame = pl.read_parquet(path)
    assert_rows_are(frame, raw_users(PURA))
    assert frame.select("seed", "page").unique().rows() == [("pura", 1)]


def retry_lines(records) -> list[re.Match]:
    """The 'retry k of n for URL: reason' lines of the job's log."""
    return [m for r in records if (m := RETRY_LINE.fullmatch(r.getMessage()))]


def pii_of(users_: list[dict]) -> list[tuple[str, str]]:
    """(kind, value) of every personal value of these users: names, emails, ids, usernames, phones."""
    values = []
    for user in users_:
        first, last = user["name"]["first"], user["name"]["last"]
        values += [("first name", first), ("last name", last), ("full name", f"{first} {last}")]
        values += [("email", user["email"]), ("user id", user["login"]["uuid"]), ("username", user["login"]["username"])]
        values += [("phone", user["phone"]), ("cell", user["cell"])]
        if user["id"]["value"]:
            values.append(("national id", user["id"]["value"]))
    return values


def leaked(text: str, values: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The personal values that appear in text (names as whole words, the rest as substrings)."""
    found = []
    for kind, value in values:
        if "name" in kind and " " not in value:
            hit = re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text)
        else:
            hit = value in text
        if hit:
            found.append((kind, value))
    return found


# ---------------------------------------------------------------- a job stopped by a signal

HELD = 30  # seconds the fake (or a wait the job is told to make) holds the job: far past the bound
PROMPT = 3.0  # "within 2 seconds", with room for a loaded machine
STOP_LINE = {
    signal.SIGINT: "random_user_etl.py: stopped by SIGINT; staged pages are kept and the next run resumes",
    signal.SIGTERM: "random_user_etl.py: stopped by SIGTERM; staged pages are kept and the next run resumes",
}


def assert_stopped(code: int, stderr: str, seconds: float, signum: int) -> None:
    """Exit 128 + the signal, promptly, with one stop line last; every other line a log line; no retry after it."""
    assert code == 128 + signum, stderr
    assert seconds < PROMPT, f"exited {seconds:.2f}s after the signal"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = stderr.rstrip("\n").splitlines()
    assert lines[-1] == STOP_LINE[signum], stderr
    assert all(LOG_LINE.match(line) for line in lines[:-1]), stderr
    assert "retry 2 of" not in stderr, stderr  # nothing was retried once it was told to stop


def signalled_exit(proc: subprocess.Popen, signum: int, then=None) -> tuple[int, float]:
    """Signal the process, call then() if given, wait for it to end: its status and seconds from the signal; fail past HELD."""
    proc.send_signal(signum)
    signalled = time.monotonic()
    if then is not None:
        then()
    try:
        code = proc.wait(timeout=HELD)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {HELD}s after {signal.Signals(signum).name}")
    return code, time.monotonic() - signalled


def delivered(pid: int, signum: int) -> bool:
    """True once a signal sent to a process is no longer pending: its C-level handler has taken it."""
    status_ = Path(f"/proc/{pid}/status").read_text()
    pending = [int(re.search(rf"^{field}:\s+(\w+)$", status_, re.M)[1], 16) for field in ("ShdPnd", "SigPnd")]
    return not any(mask & (1 << (signum - 1)) for mask in pending)


# ---------------------------------------------------------------- files planted where the job works

PURA_ANSWER = TESTS / "fixtures" / PURA
PAGE_2_ANSWER = TESTS / "fixtures" / PAGED[1]


def make_bait(tmp_path: Path) -> Path:
    """A folder that is not the job's, holding a file and a kept-answer look-alike, for a link to point at."""
    bait = tmp_path / "bait"
    bait.mkdir()
    (bait / "precious.txt").write_bytes(b"not the job's to touch\n")
    (bait / "page-00009.json.gz").write_bytes(gzip.compress(b"{}"))
    (bait / "unchecked-page-00001.json.gz").write_bytes(b"looks like a kept answer")
    return bait


def refused_untouched(run, bait: Path, says: str) -> None:
    """run() fails with EtlError matching `says`, and the bait holds the same files with the same bytes."""
    before = landed(bait)
    with pytest.raises(etl.EtlError, match=says) as caught:
        run()
    assert "\n" not in str(caught.value)
    assert landed(bait) == before and sorted(os.listdir(bait)) == sorted(before)


OWN_FOLDERS = {  # the folders the job makes its own, and where each lies
    "staging": lambda out, raw: out / ".staging",
    "seed-staging": lambda out, raw: out / ".staging" / "pura",
    "sort": lambda out, raw: out / ".staging" / "pura" / "sort",
    "raw-seed": lambda out, raw: raw / "pura",
}


def linked(where: str):
    """A planting that makes the job's own folder `where` (OWN_FOLDERS) a link to the bait."""

    def plant(out, raw, bait):
        path = OWN_FOLDERS[where](out, raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(bait, target_is_directory=True)
        return path

    plant.__name__ = "link_" + where.replace("-", "_")
    return plant


OTHER_UID = 1001  # no such user is needed: os.chown takes any number


def plant_folder(path: Path, uid: int, mode: int) -> Path:
    """A folder at `path`, holding a file of its owner's, with this owner and mode (os.chmod: no umask)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "theirs.txt").write_bytes(b"left alone")
    os.chmod(path, mode)
    os.chown(path, uid, -1)
    return path


def as_nobody(folder: Path, call) -> str:
    """What call() raised ("Type: text"), or "returned", in a forked child that entered `folder`, then became uid 65534.

    Forked, not started: the interpreter lives under /root, which uid 65534 cannot enter. The
    child only lists a folder before answering, so no lock another thread held is ever needed.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.chdir(folder)  # entered as root: the child needs no way in through /tmp's pytest folders
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                call()
                outcome = "returned"
            except BaseException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child as uid 65534 did not answer within 30 s")
        with open(read, "rb", closefd=False) as pipe:
            return pipe.read().decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def spark_missing() -> str | None:
    """Why the Spark test cannot run here, or None. CI installs pyspark and has Java 17 on PATH."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (requirements-dev.txt installs it)"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java runtime: PySpark needs `java` on PATH or JAVA_HOME (Java 17)"
    return None


SPARK_MISSING = spark_missing()


# ---------------------------------------------------------------- an object store that holds


class HeldStore(http.server.ThreadingHTTPServer):
    """An S3 endpoint on loopback that passes every request on to moto's, but holds those for keys holding `holds` unanswered."""

    daemon_threads = True

    def __init__(self, upstream: str, holds: str, once: bool = False):
        super().__init__(("127.0.0.1", 0), HeldStoreHandler)
        self.holds, self.once = holds, once  # once: only the first such request is held, later tries pass
        self.upstream = urllib.parse.urlsplit(upstream)
        self.held, self.release = threading.Event(), threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HeldStoreHandler(http.server.BaseHTTPRequestHandler):
    """Each request passed on to the upstream store and its answer back, or held unanswered."""

    protocol_version = "HTTP/1.1"

    def relay(self):
        """Pass the request on and its answer back, unless it is one to hold."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.holds in self.path and not (self.server.once and self.server.held.is_set()):  # accepted, read, and never answered
            self.server.held.set()
            self.server.release.wait(60)
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=10)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

    def log_message(self, *args):
        """Nothing on stderr: the tests read the job's."""


@contextlib.contextmanager
def held_store(upstream: str, holds: str = "/random_users_", once: bool = False):
    """A HeldStore serving on a thread of its own while held; by default it holds a batch's upload."""
    server = HeldStore(upstream, holds, once)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def held_env(api, out, raw, s3, store_url: str, **env) -> dict:
    """The CLI's variables for a run of seed paged (three pages) landing in the bucket through `store_url`."""
    return fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=s3.url(), RANDOM_USER_SEED="paged", RANDOM_USER_PAGE_SIZE=40, AWS_ENDPOINT_URL=store_url, **env)


def sigterm_when_held(held: HeldStore, env: dict, log: Path, what: str) -> tuple[int, float]:
    """Start the CLI with `env`, SIGTERM it once the store holds its request (`what`): its status and seconds from the signal."""
    proc = start_cli(env=env, log=log)
    try:
        wait_until(lambda: held.held.is_set() or proc.poll() is not None, what=what)
        assert proc.poll() is None, log.read_text()
        return signalled_exit(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
