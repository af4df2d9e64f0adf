"""The folder read_processed reads: a missing folder or a file named, an empty one an empty frame, the default
folder named when not there yet, one this user cannot list named; entries named like batches that are not
regular files named, links to batches read; an analyst without fcntl reads it too.

Cases that need a user who cannot read a folder run in a forked child that became uid 65534 (nobody):
root reads everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from support import PAGED, PURA_ANSWER, ROOT, as_nobody, assert_rows_are, raw_users

import random_user_etl as etl
from schemas import OUTPUT_SCHEMA


def test_read_processed_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        etl.read_processed(str(missing))


def test_read_processed_of_a_file_says_it_is_not_a_folder(tmp_path):
    path = tmp_path / "a-file"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=str(path)):
        etl.read_processed(str(path))


def test_read_processed_of_an_empty_folder_is_an_empty_contract_frame(tmp_path):
    frame = etl.read_processed(str(tmp_path))
    assert isinstance(frame, pl.LazyFrame)
    assert frame.collect_schema() == OUTPUT_SCHEMA and frame.collect().height == 0


NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
import random_user_etl
frame = random_user_etl.read_processed(sys.argv[1]).collect()
print(frame.height, sorted(set(frame["user_id"])) == sorted(sys.argv[2].split(",")))
"""


def test_an_analyst_without_fcntl_imports_the_job_and_reads_the_lake(settings, out):
    # A fresh interpreter: the job's modules are imported with fcntl blocked, as on Windows.
    etl.run(settings(seed="paged", n=120, page_size=40))
    ids = ",".join(u["login"]["uuid"] for u in raw_users(*PAGED))
    result = subprocess.run([sys.executable, "-c", NO_FCNTL, str(out), ids], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["120", "True"]


def test_read_processed_with_no_folder_named_and_no_default_folder_yet_names_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("RANDOM_USER_OUTPUT_DIR", raising=False)
    default = tmp_path / "processed_data"
    monkeypatch.chdir(tmp_path)  # the default lake is processed_data in the working folder
    with pytest.raises(FileNotFoundError, match=str(default)):
        etl.read_processed()
    default.mkdir()
    assert etl.read_processed().collect().height == 0


def test_a_lake_this_user_cannot_list_raises_permission_error_naming_it(tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    OUTPUT_SCHEMA.to_frame().write_parquet(lake / "random_users_pura.parquet")
    os.chmod(lake, 0o700)  # root's alone
    os.chmod(tmp_path, 0o711)  # others may pass through the test's folder to find that out
    outcome = as_nobody(tmp_path, lambda: etl.read_processed("lake"))
    assert outcome.startswith("PermissionError: ") and "'lake'" in outcome, outcome


def read_lake_in_a_child(lake: Path) -> subprocess.CompletedProcess:
    """read_processed(lake).collect() in a new interpreter, bounded: a hang fails the test instead of stalling it."""
    code = "import sys, random_user_etl as etl; print(etl.read_processed(sys.argv[1]).collect().height)"
    return subprocess.run([sys.executable, "-c", code, str(lake)], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_a_fifo_named_like_a_batch_is_named_instead_of_hanging_the_reader(api, out, settings):
    etl.run(settings(seed="pura"))
    fifo = out / "random_users_zz.parquet"
    os.mkfifo(fifo)
    result = read_lake_in_a_child(out)
    assert result.returncode == 1
    assert f"{fifo}: named like a batch but not a regular file" in result.stderr.strip().splitlines()[-1]


def test_a_folder_named_like_a_batch_is_named(api, out, settings):
    etl.run(settings(seed="pura"))
    folder = out / "random_users_zz.parquet"
    folder.mkdir()
    with pytest.raises(etl.EtlError, match=f"{folder}: named like a batch but not a regular file"):
        etl.read_processed(str(out))


def test_a_link_to_a_batch_is_read_as_the_batch(api, out, settings, tmp_path):
    etl.run(settings(seed="pura"))
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "random_users_pura.parquet").symlink_to(out / "random_users_pura.parquet")
    assert_rows_are(etl.read_processed(str(lake)).collect(), raw_users(PURA_ANSWER.name))
