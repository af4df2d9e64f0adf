"""Paths are literal: a folder name holding glob characters, or starting with a tilde, names that folder for
runs, replay and read_processed, never a sibling's files or the home folder; a file:// address is refused as a setting."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from support import land_sorted, PURA_ANSWER, assert_one_error_line, assert_rows_are, raw_key, raw_users, record_sorts, served_users

import random_user_etl as etl
from random_user_config import Settings, SettingsError
from schemas import SORT_KEY


@pytest.mark.parametrize("name", ["output_dir", "raw_dir"])
def test_a_file_url_for_a_folder_is_refused_as_a_setting(name, tmp_path):
    with pytest.raises(SettingsError, match=f"--{name.replace('_', '-')} .*file:// .*use a plain path"):
        Settings(**{"output_dir": str(tmp_path / "out"), "raw_dir": str(tmp_path / "raw"), name: f"file://{tmp_path}/x"})


def test_the_cli_refuses_a_file_url_output_folder_before_writing_anything(tmp_path, cli):
    raw = tmp_path / "x" / "raw"  # overlaps the file:// folder once read as a plain path
    result = cli("--output-dir", f"file://{tmp_path}/x", "--raw-dir", raw, "--replay", PURA_ANSWER)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--output-dir .*use a plain path")
    assert sorted(os.listdir(tmp_path)) == []


GLOB_NAMES = ["lake[1]", "lake*", "lake?"]


def decoy_staging(sibling: Path, seed: str, settings) -> None:
    """Staged parts of `seed` in the output folder `sibling` that hold another seed's users: a run whose landing failed."""
    (sibling / "random_users_decoy.parquet").mkdir(parents=True)  # the decoy run cannot land, so its parts stay
    with pytest.raises(etl.EtlError):
        etl.run(settings(output_dir=str(sibling), seed="decoy", n=120, page_size=40))
    (sibling / ".staging" / "decoy").rename(sibling / ".staging" / seed)


def read_batch(path) -> pl.DataFrame:
    """One landed file, read by Polars as the one file it names."""
    return pl.read_parquet(path, glob=False)


def test_a_run_into_a_folder_named_like_a_pattern_lands_the_served_users_not_a_siblings(api, settings, tmp_path):
    decoy_staging(tmp_path / "lake1", "paged", settings)
    lake = tmp_path / "lake[1]"
    batch = etl.run(settings(output_dir=str(lake), seed="paged", n=120, page_size=40))
    assert batch.path == f"{lake}/random_users_paged.parquet"
    assert_rows_are(read_batch(batch.path), served_users("paged", 120, 40))
    assert not (tmp_path / "lake1" / "random_users_paged.parquet").exists() and (tmp_path / "lake1" / ".staging" / "paged").is_dir()


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_run_sorted_in_many_key_ranges_in_a_folder_named_like_a_pattern(api, settings, tmp_path, monkeypatch, name):
    decoy_staging(tmp_path / "lake1", "paged", settings)
    sorts = record_sorts(monkeypatch)
    lake = tmp_path / name
    batch = land_sorted(settings(output_dir=str(lake), seed="paged", n=120, page_size=40, concurrency=2), 17, 40)
    assert sorts[-1].runs == 8 and sorts[-1].groups >= 1, "split into key ranges while the run went on"
    frame, users = read_batch(batch.path), served_users("paged", 120, 40)
    assert_rows_are(frame, users)
    assert frame.select(SORT_KEY).rows() == sorted(map(raw_key, users))


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_read_processed_of_a_folder_named_like_a_pattern_reads_that_folder_alone(api, settings, tmp_path, name):
    for sibling in ("lake1", "lakeX", "lake]"):
        if sibling != name:
            etl.run(settings(output_dir=str(tmp_path / sibling), seed="pura"))  # the same file name as the lake's
    lake = tmp_path / name
    etl.run(settings(output_dir=str(lake), seed="pura"))
    assert_rows_are(etl.read_processed(str(lake)).collect(), raw_users(PURA_ANSWER.name))


def test_raw_and_replay_folders_named_like_patterns_replay_the_kept_answers(api, settings, tmp_path):
    decoy_staging(tmp_path / "again1", "paged", settings)
    raw = tmp_path / "raw[1]"
    etl.run(settings(output_dir=str(tmp_path / "lake"), raw_dir=str(raw), seed="paged", n=120, page_size=40))
    api.clear()
    batch = etl.replay(raw / "paged", settings(output_dir=str(tmp_path / "again[1]"), raw_dir=None))
    assert api.requests == []
    assert_rows_are(read_batch(batch.path), served_users("paged", 120, 40))


def test_an_output_folder_starting_with_a_tilde_is_the_folder_named_not_the_home_folder(api, settings, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    batch = etl.run(settings(output_dir="~/lake", seed="pura"))
    assert_rows_are(read_batch(tmp_path / "~" / "lake" / "random_users_pura.parquet"), raw_users(PURA_ANSWER.name))
    assert_rows_are(etl.read_processed("~/lake").collect(), raw_users(PURA_ANSWER.name))
    assert batch.path == "~/lake/random_users_pura.parquet" and list(home.iterdir()) == []


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.text(alphabet="ab1[]*?", min_size=1, max_size=6))
def test_read_processed_reads_the_folder_named_whatever_glob_characters_it_holds(tmp_path_factory, name):
    base = tmp_path_factory.mktemp("names")
    (base / name).mkdir()
    pl.DataFrame({"user_id": ["in-the-lake"]}).write_parquet(base / name / "random_users_s.parquet")
    # A sibling the name matches as a pattern, holding a batch of the same file name.
    for sibling in {"a", "b", "1", "ab1", "a1", "ab", "[", "]", "[1]"} - {name}:
        if fnmatch.fnmatchcase(sibling, name):
            (base / sibling).mkdir(exist_ok=True)
            pl.DataFrame({"user_id": ["a-sibling's"]}).write_parquet(base / sibling / "random_users_s.parquet")
    assert etl.read_processed(str(base / name)).select("user_id").collect().to_series().to_list() == ["in-the-lake"]
