"""Landing in object storage: the real job against a real S3 server (moto's) on loopback.

Nothing is patched: the job reaches the store through Polars' own cloud I/O, with credentials
and the endpoint taken from the standard AWS_* variables, exactly as in a pod. boto3 only makes
buckets and looks at what landed. Every value read back is checked against the recorded JSON.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import polars as pl
import pytest
from conftest import GBONLY, PAGED, PURA, assert_one_error_line, assert_rows_are, fast_env, fixture_bytes, on_log, nationality_counts, raw_key, raw_users, record_sorts, served_users
from fake_api import mutate, status

import random_user_etl as etl
from _random_user_etl import staging, store, wire
from _random_user_etl.errors import Stopped
from random_user_config import SettingsError
from schemas import OUTPUT_SCHEMA, QUALITY_METADATA_KEY, SORT_KEY


# ---------------------------------------------------------------- tests


def test_a_run_lands_the_recorded_users_as_one_object_and_reads_back(api, settings, s3, out):
    batch = etl.run(settings(output_dir=s3.url(), seed="pura"))
    key = "lake/random_users_pura.parquet"
    assert s3.keys() == [key]
    assert batch.path == f"s3://{s3.name}/{key}" and batch.rows == 100
    # The size reported is the object's size in the store.
    assert batch.bytes == s3.head(key)["ContentLength"] > 0
    frame = etl.read_processed(s3.url()).collect()
    assert frame.schema == OUTPUT_SCHEMA
    assert_rows_are(frame, raw_users(PURA))
    assert frame["seed"].unique().to_list() == ["pura"]
    # The quality report travels inside the object.
    report = json.loads(pl.read_parquet_metadata(batch.path)[QUALITY_METADATA_KEY])
    assert report["rows"] == report["unique_user_ids"] == 100
    # Nothing landed on the local disk, and the run's staged pages are cleared.
    assert not out.exists()
    assert not (s3.staged() / "pura").exists()


def test_a_rerun_of_a_seed_replaces_its_object_and_each_seed_has_one(api, settings, s3):
    url = s3.url()
    etl.run(settings(output_dir=url, seed="pura"))
    first = etl.read_processed(url).select(pl.col("ingested_at").unique()).collect().item()
    etl.run(settings(output_dir=url, seed="pura"))
    assert s3.keys() == ["lake/random_users_pura.parquet"]
    again = etl.read_processed(url).collect()
    assert again.height == 100
    assert again["ingested_at"].unique().to_list() != [first]  # the second run's rows, not the first's
    etl.run(settings(output_dir=url, seed="gbonly", n=25, nat=("gb",)))
    assert s3.keys() == ["lake/random_users_gbonly.parquet", "lake/random_users_pura.parquet"]
    lake = etl.read_processed(url).collect()
    assert_rows_are(lake, raw_users(PURA, GBONLY))
    counts = dict(lake.group_by("nationality").len().iter_rows())
    assert counts == nationality_counts(raw_users(PURA, GBONLY))


def test_the_cli_lands_in_s3_from_environment_variables_alone(api, out, raw, cli, s3, monkeypatch):
    url = s3.url("users/daily")
    env = fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=url, RANDOM_USER_SEED="paged", RANDOM_USER_PAGE_SIZE=40)
    result = cli(env=env)  # AWS_* and TMPDIR come from this process's environment, as in a pod
    assert result.returncode == 0, result.stderr
    key = "users/daily/random_users_paged.parquet"
    assert s3.keys() == [key]
    assert sorted(int(r.params["page"]) for r in api.requests) == [1, 2, 3]
    summary = result.stderr.strip().splitlines()[-1]
    assert f"landed 100 rows, seed paged, file s3://{s3.name}/{key}, {s3.head(key)['ContentLength']} bytes" in summary
    # 100 users in pages of 40: pages 1 and 2 whole, the first 20 users of page 3.
    users = raw_users(*PAGED, limits={PAGED[2]: 20})
    # read_processed() with no argument reads the lake RANDOM_USER_OUTPUT_DIR names.
    monkeypatch.setenv("RANDOM_USER_OUTPUT_DIR", url)
    frame = etl.read_processed().collect()
    assert_rows_are(frame, users)
    assert sorted(frame["page"].unique()) == [1, 2, 3]


def test_an_empty_prefix_reads_as_an_empty_contract_frame_and_nothing_is_read_before_collect(s3):
    s3.client.put_object(Bucket=s3.name, Key="lake/notes.txt", Body=b"not a batch")
    frame = etl.read_processed(s3.url()).collect()
    assert frame.height == 0 and frame.schema == OUTPUT_SCHEMA
    frame = etl.read_processed(s3.url("no/such/prefix")).collect()
    assert frame.height == 0 and frame.schema == OUTPUT_SCHEMA
    # Lazy: building the frame touches no store, so even a missing bucket only fails at collect.
    lazy = etl.read_processed(f"s3://{s3.name}-missing/lake")
    assert isinstance(lazy, pl.LazyFrame)
    with pytest.raises(Exception, match="NoSuchBucket|404"):
        lazy.collect()


def test_a_failed_run_lands_nothing_and_leaves_the_previous_batch(api, settings, s3):
    url = s3.url()
    etl.run(settings(output_dir=url, seed="pura"))
    key = "lake/random_users_pura.parquet"
    before = s3.head(key)

    def north(doc):
        doc["results"][7]["location"]["coordinates"]["latitude"] = "north"

    # A rerun whose answer breaks the contract fails before anything is written...
    api.script(mutate(north))
    with pytest.raises(etl.EtlError, match="latitude"):
        etl.run(settings(output_dir=url, seed="pura"))
    assert s3.keys() == [key]
    after = s3.head(key)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    assert_rows_are(etl.read_processed(url).collect(), raw_users(PURA))
    # ...and a new seed whose run fails leaves no object at all, partial or whole.
    api.script(*[status(503)] * 4)  # the first try and all three retries
    with pytest.raises(etl.EtlError, match="503"):
        etl.run(settings(output_dir=url, seed="gbonly", n=25, nat=("gb",)))
    assert s3.keys() == [key]


def test_a_store_that_refuses_fails_in_one_line_and_the_next_run_reuses_the_staged_pages(
    api, out, raw, cli, settings, s3
):
    missing = f"{s3.name}-later"
    url = f"s3://{missing}/lake"
    env = fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=url, RANDOM_USER_SEED="paged", RANDOM_USER_PAGE_SIZE=40)
    result = cli(env=env)
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert f"cannot write {url}/random_users_paged.parquet" in error and "NoSuchBucket" in error
    assert len(api.requests) == 3
    # The pages fetched are kept in the temp folder; once the bucket exists, the next run
    # (this time in this process, same temp folder) lands them without asking the service again.
    s3.client.create_bucket(Bucket=missing)
    batch = etl.run(settings(output_dir=url, seed="paged", n=100, page_size=40))
    assert len(api.requests) == 3
    assert batch.rows == 100 and s3.client.list_objects_v2(Bucket=missing)["KeyCount"] == 1
    assert_rows_are(etl.read_processed(url).collect(), raw_users(*PAGED, limits={PAGED[2]: 20}))


def test_a_batch_sorted_in_several_key_ranges_lands_in_s3_in_order(settings, s3, monkeypatch):
    # Small ranges, so the external sort splits pages while the run goes on and streams its
    # ranges to the object store through Polars' cloud writer.
    sorts = record_sorts(monkeypatch)
    batch = etl.fetch_and_land(settings(output_dir=s3.url(), seed="paged", n=100, page_size=40, concurrency=2), run_rows=17, group_rows=40)
    assert sorts[0].runs == 6 and sorts[0].groups >= 1, "split into key ranges while the run went on"
    frame = etl.read_processed(s3.url()).collect()
    users = raw_users(*PAGED, limits={PAGED[2]: 20})
    assert_rows_are(frame, users)
    assert frame.select(SORT_KEY).rows() == sorted(map(raw_key, users))
    assert batch.rows == 100 and batch.report["unique_user_ids"] == 100


def staged_paged(folder: Path) -> list[Path]:
    """The three recorded pages of seed paged, staged as a run stages them."""
    folder.mkdir()
    return [
        staging.stage_part(folder, etl.transform(fixture_bytes(name), etl.PageRequest("paged", page, 40)), staging.part_identity(etl.Settings(), "paged", page, 40))
        for page, name in enumerate(PAGED, start=1)
    ]


@contextlib.contextmanager
def scratch_lost_midway(stage: Path):
    """The disk loses the sort's scratch once the write has begun its second key range."""
    with on_log("writing key range 2 of", lambda: shutil.rmtree(staging.sort_folder(stage))), pytest.raises((OSError, pl.exceptions.PolarsError)):
        yield


@contextlib.contextmanager
def stop_signal_arrived():
    """A SIGTERM delivered before the write, as the CLI notes it while the main thread waits in Polars."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the CLI's handler, minus its unwinding
    try:
        with wire.signals_noted(), pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("fault", [scratch_lost_midway, stop_signal_arrived], ids=["scratch-lost", "stop-signal"])
def test_a_write_that_fails_midway_leaves_the_earlier_object_as_it_was(fault, s3, tmp_path):
    # Polars completes an upload whose source failed, with the rows sent so far at the key (2.1): the
    # batch must be written whole before any of it is uploaded. A lost scratch file is that case; a
    # stop, which Polars does not complete an upload after, checks the stop ends the write unlanded.
    stage = tmp_path / "stage"
    parts, key = staged_paged(stage), f"{s3.url()}/random_users_paged.parquet"
    store.write_batch(parts, key, dt.datetime.now(dt.timezone.utc), 120, run_rows=17)
    earlier = s3.client.get_object(Bucket=s3.name, Key=key.split("/", 3)[3])["Body"].read()
    with fault(stage) if fault is scratch_lost_midway else fault():
        store.write_batch(parts, key, dt.datetime.now(dt.timezone.utc), 120, run_rows=17)
    assert s3.client.get_object(Bucket=s3.name, Key=key.split("/", 3)[3])["Body"].read() == earlier


# ---------------------------------------------------------------- paths are literal


def test_a_temp_folder_named_like_a_pattern_stages_and_sorts_this_runs_pages_not_a_siblings(api, settings, s3, tmp_path, monkeypatch):
    # A run whose upload failed left another seed's users staged, as this seed's, in the sibling tmp1.
    missing = f"{s3.name}-later"
    url = f"s3://{missing}/lake"
    for temp in ("tmp1", "tmp[1]"):
        (tmp_path / temp).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp1"))
    with pytest.raises(etl.EtlError, match="NoSuchBucket"):
        etl.run(settings(output_dir=url, seed="decoy", n=100, page_size=40))
    staged = etl.config.staging_root(url)
    (staged / "decoy").rename(staged / "paged")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp[1]"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp[1]"))
    s3.client.create_bucket(Bucket=missing)
    sorts = record_sorts(monkeypatch)
    etl.fetch_and_land(settings(output_dir=url, seed="paged", n=100, page_size=40, concurrency=2), run_rows=17, group_rows=40)
    assert sorts[0].runs == 6, "sorted in key ranges, in the temp folder"
    frame, users = etl.read_processed(url).collect(), served_users("paged", 100, 40)
    assert_rows_are(frame, users)
    assert frame.select(SORT_KEY).rows() == sorted(map(raw_key, users))


# Polars lists an s3:// lake by a pattern that reads these characters as pattern or changes them
# (an s3 prefix holding them reads another prefix's batches, or none at all).
UNLISTABLE_PREFIXES = ["lake[1]", "lake*", "lake?", "la]ke", "a{b}", "caf\u00e9", "50%", "a\\b", "a#b"]


@pytest.mark.parametrize("prefix", UNLISTABLE_PREFIXES)
def test_an_s3_prefix_polars_cannot_list_literally_is_refused_before_any_request(api, out, raw, cli, s3, prefix):
    url = s3.url(prefix)
    result = cli("--seed", "pura", env=fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=url))
    assert result.returncode == 2
    line = assert_one_error_line(result.stderr, re.escape(f"--output-dir (RANDOM_USER_OUTPUT_DIR) '{url}' holds"))
    assert "cannot be read back" in line
    assert api.requests == [] and s3.keys() == []


@pytest.mark.parametrize("prefix", ["lake[1]", "lake?"])
def test_read_processed_of_an_s3_prefix_polars_cannot_list_literally_raises_instead_of_reading_a_sibling(api, settings, s3, prefix):
    etl.run(settings(output_dir=s3.url("lake1"), seed="pura"))
    with pytest.raises(SettingsError, match="cannot be read back"):
        etl.read_processed(s3.url(prefix))
