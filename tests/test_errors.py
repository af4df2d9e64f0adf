"""The error chain: a page's error names its page, a storage error its path, each keeps its cause, -v shows the chain;
a library's warning, a corrupt staged page, a write refused or a full disk, each said by its reason."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import polars as pl
import pyarrow.parquet as pq
import pytest
from support import LOG_LINE, PAGED, PREFIX, assert_one_error_line, assert_rows_are, fast_env, fixture_bytes, land_sorted, raw_users, run_cli
from fake_api import body, normal, status

import random_user_etl as etl
from _random_user_etl.errors import AnswerError, ServiceError, StorageError, on_page, panic_text_silenced, write_error
from _random_user_etl.folders import write_atomically
from _random_user_etl.shown import shorten

# Page 2 of seed "paged" cut off after its first user's password: malformed JSON that holds a person.
CUT_PAGE = fixture_bytes(PAGED[1])[:600] + b"}"
FIRST = raw_users(PAGED[1])[0]
PERSON = (FIRST["name"]["first"], FIRST["name"]["last"], FIRST["email"], FIRST["login"]["uuid"])
CUT_LINE = PREFIX + "page 2: the answer is not JSON of the randomuser.me 1.4 shape (malformed JSON at character 0)"


def causes(exc: BaseException) -> list[BaseException]:
    """The exceptions an error was raised from, nearest first."""
    chain = []
    while exc.__cause__ is not None:
        exc = exc.__cause__
        chain.append(exc)
    return chain


def run_paged(cli, api, out, raw, *args):
    """The CLI (the `cli` fixture) on two pages of seed "paged", one at a time, so the script's second answer is page 2."""
    return cli("--seed", "paged", "--n", "80", "--page-size", "40", "--concurrency", "1", *args, env=fast_env(api.url, out, raw))


def test_the_line_is_formatted_from_the_page_and_path_attributes():
    assert str(AnswerError("no results", page=3)) == "page 3: no results"
    assert str(StorageError("Permission denied", path=Path("/x/y"), doing="cannot write")) == "cannot write /x/y: Permission denied"
    assert str(StorageError("odd", page=2, path="/x", doing="cannot stage in")) == "page 2: cannot stage in /x: odd"
    assert str(StorageError("named like a batch", path="/x/b.parquet")) == "/x/b.parquet: named like a batch"


def test_on_page_keeps_the_kind_the_path_and_the_reason():
    inner = StorageError("Permission denied", path="/x", doing="cannot keep")
    outer = on_page(inner, 4)
    assert type(outer) is StorageError and (outer.page, outer.path, outer.reason) == (4, "/x", "Permission denied")
    assert str(outer) == "page 4: cannot keep /x: Permission denied"


def test_a_failed_pages_error_has_its_page_and_its_polars_cause(api, settings):
    api.script(normal(), body(CUT_PAGE))
    with pytest.raises(AnswerError) as caught:
        etl.run(settings(seed="paged", n=80, page_size=40, concurrency=1))
    assert caught.value.page == 2
    assert "page 2" not in caught.value.reason  # the page is an attribute, not part of the text
    assert isinstance(causes(caught.value)[-1], pl.exceptions.PolarsError)


def test_an_error_status_names_its_page(api, settings):
    api.script(normal(), status(404))
    with pytest.raises(ServiceError) as caught:
        etl.run(settings(seed="paged", n=80, page_size=40, concurrency=1))
    assert caught.value.page == 2 and str(caught.value) == "page 2: HTTP 404"


def test_an_output_folder_that_cannot_be_made_is_a_storage_error_with_its_path_and_oserror(api, settings, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "out"
    with pytest.raises(StorageError) as caught:
        etl.run(settings(seed="paged", n=40, output_dir=str(output)))
    assert Path(caught.value.path) == output and caught.value.page is None
    assert isinstance(caught.value.__cause__, NotADirectoryError)
    assert api.requests == []


def test_a_raw_folder_that_cannot_be_made_names_its_path(api, settings, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StorageError) as caught:
        etl.run(settings(seed="paged", n=40, raw_dir=str(tmp_path / "a-file" / "raw")))
    assert Path(caught.value.path) == tmp_path / "a-file" / "raw"
    assert isinstance(caught.value.__cause__, OSError)


def test_a_replay_of_nothing_names_its_source(tmp_path):
    with pytest.raises(StorageError) as caught:
        etl.replay(tmp_path / "none", output_dir=str(tmp_path / "out"), raw_dir=None)
    assert caught.value.path == tmp_path / "none"
    assert str(caught.value) == f"nothing to replay at {tmp_path / 'none'}: no such folder or file"


def test_verbose_logs_the_chain_by_class_and_never_the_answers_bytes(api, out, raw, cli):
    api.script(normal(), body(CUT_PAGE))
    result = run_paged(cli, api, out, raw, "-v")
    assert result.returncode == 1, result.stderr
    err = result.stderr
    lines = err.rstrip("\n").splitlines()
    assert lines[-1] == CUT_LINE
    chain = [line.split(" DEBUG ", 1)[1] for line in lines if " DEBUG caused by " in line]
    assert chain == [
        "caused by AnswerError: the answer is not JSON of the randomuser.me 1.4 shape (malformed JSON at character 0)",
        "caused by ComputeError: its text is not logged: it can hold personal data",
    ]
    assert [word for word in PERSON if word in err] == []


def test_without_verbose_the_one_line_is_as_before(api, out, raw, cli):
    api.script(normal(), body(CUT_PAGE))
    result = run_paged(cli, api, out, raw)
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert "caused by" not in err and err.rstrip("\n").splitlines()[-1] == CUT_LINE


def test_an_object_stores_words_show_no_secret_of_the_address_they_name(tmp_path, nowhere):
    # A real Polars failure, quickly (no retries): its text names the endpoint as given, password and all.
    source = tmp_path / "one.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(source)
    endpoint = nowhere.replace("http://", "http://someone:s3cretpass@").split("/api/")[0]
    options = {"aws_endpoint_url": endpoint, "aws_access_key_id": "k", "aws_secret_access_key": "s", "aws_region": "us-east-1", "max_retries": 0}
    with pytest.raises(OSError) as caught:
        pl.scan_parquet(source).sink_parquet("s3://bucket/key.parquet", storage_options=options)
    assert "s3cretpass" in str(caught.value)  # what the library says
    line = write_error(caught.value)
    assert "s3cretpass" not in line and "PUT http://***@127.0.0.1:" in line, line


def test_a_librarys_words_show_no_secret_of_any_address_in_them():
    text = "Failed to parse: https://someone:s3cret@h\u2764.example/api/?token=t0psecret, and http://u:p%40ss@other/?key=k3y"
    line = write_error(ValueError(text))
    assert not [word for word in ("s3cret", "t0psecret", "p%40ss", "k3y") if word in line], line
    assert "https://***@h\u2764.example/api/?token=***" in line, line


def test_a_storage_line_is_as_before(api, out, raw, cli, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_paged(cli, api, out, raw, "--output-dir", tmp_path / "a-file" / "out")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == PREFIX + f"cannot write to {tmp_path / 'a-file' / 'out'}: Not a directory"


# ------------------------------------------------------------------ what reaches the terminal


UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(text=st.text(), limit=st.integers(min_value=1, max_value=300))
def test_shorten_gives_one_bounded_line_with_no_control_character(text, limit):
    shown = shorten(text, limit)
    assert len(shown) <= limit + 3  # the "..." that says it was cut
    assert not UNSAFE.search(shown) and len(shown.splitlines()) <= 1, repr(shown)
    assert all(c.isprintable() for c in shown), repr(shown)
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        assert shown == text  # a plain value is shown as it is


def test_shorten_shows_what_it_escaped():
    assert shorten("a\x1b[31mb\x07\n\u202e") == "a\\x1b[31mb\\x07\\n\\u202e"
    assert shorten("x" * 100, 10) == "x" * 10 + "..."
    assert shorten(None) == "None"


# The job's CLI in a process of its own, with a warning issued as a library issues one, once a run starts.
WARNING_LAUNCHER = """
import sys, warnings
import random_user_etl
real_run = random_user_etl.run
def run(*args, **kwargs):
    warnings.warn("a library's notice", UserWarning)
    return real_run(*args, **kwargs)
random_user_etl.run = run
sys.exit(random_user_etl.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_a_library_warning_is_a_log_line_only_with_verbose(verbose, api, out, raw):
    # In a process of its own: pytest takes this process's warnings for itself.
    result = run_cli("--seed", "pura", *verbose, env=fast_env(api.url, out, raw), via=(WARNING_LAUNCHER,))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.rstrip("\n").split("\n")
    assert all(LOG_LINE.match(line) for line in lines), result.stderr
    assert ("a library's notice" in result.stderr) == bool(verbose), result.stderr
    if not verbose:
        assert len(lines) == 1 and " INFO landed 100 rows, seed pura" in lines[0], result.stderr


def test_a_cli_run_to_object_storage_with_no_region_prints_only_the_jobs_line(api, out, raw, s3, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    result = run_cli(env=fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=s3.url(), RANDOM_USER_SEED="pura"))
    assert result.returncode == 0, result.stderr
    assert s3.keys() == ["lake/random_users_pura.parquet"]
    lines = result.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and LOG_LINE.match(lines[0]) and " INFO landed 100 rows, seed pura" in lines[0], result.stderr


def test_a_failed_cli_run_to_object_storage_with_no_region_prints_only_its_line(out, raw, s3, nowhere, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    result = run_cli(env=fast_env(nowhere, out, raw, RANDOM_USER_OUTPUT_DIR=s3.url(), RANDOM_USER_SEED="pura", RANDOM_USER_RETRIES=0))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: cannot reach")
    assert len(result.stderr.rstrip("\n").split("\n")) == 1, result.stderr


# ---------------------------------------------------------------- a service out of reach


OFFLINE_WAYS = r"--replay .*fake service"


@pytest.mark.parametrize("where", ["refused", "does not resolve"])
def test_a_service_out_of_reach_says_so_and_points_once_to_the_offline_ways(where, nowhere, out, raw, cli):
    url = nowhere if where == "refused" else "http://random-user.invalid/api/1.4/"  # .invalid never resolves
    done = cli("--seed", "demo", "--allow-http", "--retries", "0", env=fast_env(url, out, raw))
    assert done.returncode == 1, done.stderr
    line = assert_one_error_line(done.stderr, r"cannot (reach|resolve) .*" + OFFLINE_WAYS)
    assert len(re.findall("--replay", done.stderr)) == 1, done.stderr  # once, on the last line alone
    assert "cannot" in line


def test_a_service_that_answers_badly_points_to_no_offline_way(api, out, raw, cli):
    api.script(status(500), status(500))
    done = cli("--seed", "demo", "--retries", "1", env=fast_env(api.url, out, raw))
    assert done.returncode == 1
    assert "--replay" not in done.stderr


# ---------------------------------------------------------------- a full disk says so


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem of its own (tmpfs), to fill for real; unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here, so no disk can be filled for real: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, free: int) -> None:
    """Empty the disk, then fill it until `free` bytes are left."""
    for path in disk.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    info = os.statvfs(disk)
    (disk / "filler").write_bytes(b"x" * max(info.f_bavail * info.f_frsize - free, 0))


def fill_until_it_lands(disk: Path, land) -> set[str]:
    """Run land() with ever more room left on the disk until it lands; every failure says the disk is full; what each was doing."""
    doing = set()
    for free in itertools.count(0, 8192):
        fill(disk, free)
        try:
            land()
            return doing
        except StorageError as exc:
            assert str(exc).endswith(": No space left on device"), (free, str(exc))
            doing.add(exc.doing)


def test_a_full_disk_says_so_wherever_the_run_was_writing(api, settings, small_disk):
    run = settings(seed="paged", n=120, page_size=40, concurrency=1, output_dir=str(small_disk / "out"), raw_dir=str(small_disk / "raw"))
    doing = fill_until_it_lands(small_disk, lambda: land_sorted(run, 17, 40))
    # Polars said "Invalid thrift: transport error" or "underlying IO error: ..." here, by where the write stopped.
    assert doing == {"cannot keep the raw answer in", "cannot stage in", "cannot split into key ranges in", "cannot write"}


def test_a_full_temp_folder_says_so_for_an_object_storage_run(api, settings, s3, small_disk, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    run = settings(seed="paged", n=120, page_size=40, concurrency=1, output_dir=s3.url(), raw_dir=None)
    doing = fill_until_it_lands(small_disk, lambda: etl.run(run))
    assert {"cannot stage in", "cannot write"} <= doing


def test_the_cli_says_no_space_left_in_one_line(api, out, raw, cli, small_disk):
    fill(small_disk, 24576)  # room for a page or so
    result = run_paged(cli, api, small_disk / "out", raw)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, r"^random_user_etl\.py: error: page \d+: cannot stage in .*: No space left on device$")


# ---------------------------------------------------------------- an unlucky disk under the staged pages


def staged_page_1(api, settings, out):
    """A run of seed paged stopped by a 404 at page 3, its pages 1 and 2 staged: the run's settings and page 1's part."""
    run = settings(seed="paged", n=120, page_size=40, concurrency=1, retries=0)
    api.script(normal(), normal(), status(404))
    with pytest.raises(ServiceError):
        etl.run(run)
    return run, out / ".staging" / "paged" / "part-00001.parquet"


def test_a_staged_page_with_a_corrupt_page_under_a_whole_footer_is_fetched_again_not_trusted(api, settings, out):
    run, part = staged_page_1(api, settings, out)
    whole = part.read_bytes()
    ids = pq.ParquetFile(part).metadata.row_group(0).column(0)  # user_id: the quality report reads it
    start = ids.data_page_offset
    part.write_bytes(whole[:start] + b"\x00" * 64 + whole[start + 64 :])  # rotted where the footer does not look
    before = len(api.requests)
    etl.run(run)
    assert sorted(r.params["page"] for r in api.requests[before:]) == ["1", "3"]
    assert_rows_are(pl.read_parquet(out / "random_users_paged.parquet"), raw_users(*PAGED))


# ---------------------------------------------------------------- a write refused says why, whatever the disk says after


@contextlib.contextmanager
def file_size_limit(most: int):
    """Files this process writes may grow to `most` bytes (ulimit -f): past it a write fails EFBIG though the disk has room, as under a quota."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (most, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_refused_with_room_on_the_disk_says_why_wherever_the_run_was_writing(api, settings, tmp_path):
    doing = set()
    for most in itertools.count(2048, 2048):
        run = settings(seed="paged", n=120, page_size=40, concurrency=1, output_dir=str(tmp_path / f"out-{most}"), raw_dir=None)
        try:
            with file_size_limit(most):
                land_sorted(run, 17, 40)
            break
        except StorageError as exc:
            # Polars said "Invalid thrift: transport error", or its own words around the errno, by where the write stopped.
            assert str(exc).endswith(": File too large"), (most, str(exc))
            doing.add(exc.doing)
    assert {"cannot stage in", "cannot write"} <= doing, doing


def test_a_full_disk_says_so_though_another_process_frees_room_as_the_write_fails(small_disk):
    fill(small_disk, 0)
    frame = pl.DataFrame({"text": [f"{i:08d}" * 8 for i in range(50_000)]})

    def write(target):
        """A Polars write into the full disk; as it fails, room is freed (a neighbour's file removed)."""
        try:
            frame.write_parquet(target)
        finally:
            (small_disk / "filler").unlink()

    with pytest.raises(OSError) as caught:
        write_atomically(small_disk / "frame.parquet", write)
    assert caught.value.errno == errno.ENOSPC and not isinstance(caught.value, pl.exceptions.PolarsError)
    assert sorted(path.name for path in small_disk.iterdir()) == []  # the temp file is gone too


def test_a_staged_page_that_makes_polars_panic_is_fetched_again_with_no_panic_text_on_stderr(api, settings, out, capfd):
    # Polars' Rust panic hook writes "thread ... panicked at ..." to the process's stderr before the
    # PanicException reaches Python: the job catches the exception, and no such text may reach the terminal.
    run, part = staged_page_1(api, settings, out)
    whole = part.read_bytes()
    for offset in range(4, len(whole) - 8):  # the first byte whose loss makes Polars panic reading the part
        rotted = whole[:offset] + b"\x00" + whole[offset + 1 :]
        try:
            pl.read_parquet(rotted)
        except pl.exceptions.PanicException:
            break
        except Exception:
            continue
    else:
        pytest.fail("no single lost byte makes this Polars panic: the case cannot be built")
    part.write_bytes(rotted)
    capfd.readouterr()  # the search's own panics are not the run's
    before = len(api.requests)
    etl.run(run)
    assert "panicked" not in capfd.readouterr().err
    assert sorted(r.params["page"] for r in api.requests[before:]) == ["1", "3"]
    assert_rows_are(pl.read_parquet(out / "random_users_paged.parquet"), raw_users(*PAGED))


@pytest.mark.parametrize("last_out", ["first", "second"])
def test_two_threads_silencing_stderr_at_once_leave_it_as_it_was(last_out):
    # The process has one stderr: each holder restoring what it saw would leave it silenced for good.
    before = os.fstat(2)
    first_in, second_in, first_may_leave, first_left = (threading.Event() for _ in range(4))

    def first() -> None:
        """Silence, let the second silence too, and leave when told."""
        with panic_text_silenced():
            first_in.set()
            first_may_leave.wait(10)
        first_left.set()

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    first_in.wait(10)
    with panic_text_silenced():
        second_in.set()
        if last_out == "second":
            first_may_leave.set()
            first_left.wait(10)
            assert os.fstat(2).st_ino != before.st_ino  # still silenced: the second holds it
    first_may_leave.set()
    thread.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
