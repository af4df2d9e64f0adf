"""What replay reads: regular files only (a FIFO or a device is refused without hanging), never a folder in
the output's staging folder, a batch from page 1; a folder it cannot list is named.

Cases that need a user who cannot read a folder run in a forked child that became uid 65534 (nobody):
root reads everything."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from support import PAGE_2_ANSWER, PURA_ANSWER, as_nobody, assert_one_error_line, batch_files, landed, run_cli

import random_user_etl as etl
from random_user_config import Settings


# In a subprocess: only a process boundary bounds a job that would block opening the FIFO.
def test_replay_of_a_fifo_page_fails_in_one_line_instead_of_hanging(raw, out, tmp_path):
    folder = tmp_path / "kept" / "paged"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "page-00001.json.gz")
    result = run_cli("--replay", folder, "--output-dir", out, timeout=30)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{folder / 'page-00001.json.gz'}: not a regular file")
    assert batch_files(out) == [] and not (out / ".staging" / "paged").exists()


def test_replay_of_a_fifo_as_one_saved_answer_fails_in_one_line(out, tmp_path):
    fifo = tmp_path / "answer.json"
    os.mkfifo(fifo)
    result = run_cli("--replay", fifo, "--output-dir", out, timeout=30)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{fifo}: not a regular file")
    assert not out.exists()


def test_replay_of_a_device_is_refused(out, tmp_path):
    folder = tmp_path / "kept" / "pura"
    folder.mkdir(parents=True)
    (folder / "page-00001.json.gz").symlink_to("/dev/null")
    (tmp_path / "answer.json").symlink_to("/dev/null")
    for source in (folder, tmp_path / "answer.json"):
        with pytest.raises(etl.EtlError, match="not a regular file"):
            etl.replay(source, output_dir=str(out), raw_dir=None)
    assert batch_files(out) == [] and not (out / ".staging" / "pura").exists()


def test_replay_of_a_single_page_2_answer_says_why_and_leaves_nothing_behind(out, cli):
    result = cli("--replay", PAGE_2_ANSWER, "--output-dir", out)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"cannot replay {PAGE_2_ANSWER}: it is page 2 of seed 'paged', and a batch starts at page 1")
    assert batch_files(out) == [] and landed(out) == {}
    assert not (out / ".staging" / "paged").exists()


def test_replay_of_a_folder_this_user_cannot_list_names_it(tmp_path):
    kept = tmp_path / "kept" / "pura"
    kept.mkdir(parents=True)
    (kept / "page-00001.json.gz").write_bytes(gzip.compress(PURA_ANSWER.read_bytes()))
    os.chmod(kept, 0o700)
    os.chmod(tmp_path, 0o711)
    os.chmod(tmp_path / "kept", 0o711)
    run = Settings(output_dir=str(tmp_path / "out"), raw_dir=None)
    outcome = as_nobody(tmp_path, lambda: etl.replay(Path("kept/pura"), run))
    assert outcome.startswith("StorageError: cannot replay kept/pura: ") and "Permission denied" in outcome, outcome
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spelling", ["plain", "dotted", "through-a-link"])
def test_replay_of_a_folder_in_the_output_staging_is_refused_and_the_folder_kept(spelling, out, tmp_path, cli):
    source = out / ".staging" / "pura"
    source.mkdir(parents=True)
    (source / "page-00001.json.gz").write_bytes(gzip.compress(PURA_ANSWER.read_bytes()))
    before = landed(out)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pura").symlink_to(source, target_is_directory=True)  # named as the seed it holds
    given = {"plain": source, "dotted": out / ".staging" / ".." / ".staging" / "pura", "through-a-link": tmp_path / "elsewhere" / "pura"}
    result = cli("--replay", given[spelling], "--output-dir", out)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"cannot replay {given[spelling]}: it lies in the staging folder {out / '.staging'}")
    assert landed(out) == before and batch_files(out) == []
