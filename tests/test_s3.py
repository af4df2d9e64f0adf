"""Landing in object storage: the real job against a real S3 server (moto's) on loopback.

Nothing is patched: the job reaches the store through Polars' own cloud I/O, with credentials
and the endpoint taken from the standard AWS_* variables, exactly as in a pod. boto3 only makes
buckets and looks at what landed. Every value read back is checked against the recorded JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import polars as pl
import pytest
from support import (
    land_sorted,
    GBONLY,
    HELD,
    PAGED,
    PREFIX,
    PURA,
    assert_one_error_line,
    assert_rows_are,
    assert_stopped,
    held_env,
    held_store,
    sigterm_when_held,
    fast_env,
    fixture_bytes,
    nationality_counts,
    on_log,
    raw_key,
    raw_users,
    record_sorts,
    run_cli,
    served_users,
    start_cli,
    wait_until,
)
from fake_api import mutate, status

import random_user_etl as etl
from _random_user_etl import run, sort, staging, store
from _random_user_etl.stop import Stop
from _random_user_etl.store import ObjectStore
from _random_user_etl.errors import StorageError, Stopped
from _random_user_etl.places import staging_root
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


def test_a_missing_bucket_fails_in_one_line_before_any_request_and_lands_once_it_exists(api, out, raw, cli, settings, s3):
    # Checked first: a large run once fetched every page, minutes under the service's rate limit, to fail on this.
    missing = f"{s3.name}-later"
    url = f"s3://{missing}/lake"
    env = fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=url, RANDOM_USER_SEED="paged", RANDOM_USER_PAGE_SIZE=40)
    result = cli(env=env)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"^{PREFIX}cannot write to {url}: the object store answered NoSuchBucket")
    assert api.requests == [] and not staging_root(url).exists()
    s3.client.create_bucket(Bucket=missing)
    batch = etl.run(settings(output_dir=url, seed="paged", n=100, page_size=40))
    assert batch.rows == 100 and len(api.requests) == 3
    assert_rows_are(etl.read_processed(url).collect(), raw_users(*PAGED, limits={PAGED[2]: 20}))


def test_missing_credentials_fail_in_one_line_before_any_request(api, out, raw, s3, nowhere, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    # Polars then asks the instance's metadata service (it does not read AWS_EC2_METADATA_DISABLED):
    # pointed at a loopback port where nothing listens, it fails at once.
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", nowhere.removesuffix("/api/1.4/"))
    # In a process of its own, as in a pod: Polars keeps credentials it found for the life of the process.
    result = run_cli(env=fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=s3.url(), RANDOM_USER_SEED="pura"))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"^{PREFIX}cannot write to {s3.url()}: no AWS credentials are set \(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    assert api.requests == [] and s3.keys() == [] and s3.all_keys() == []


def test_the_write_check_is_one_small_object_beside_the_batches_that_readers_skip(api, settings, s3):
    etl.run(settings(output_dir=s3.url(), seed="pura"))
    etl.run(settings(output_dir=s3.url(), seed="gbonly", n=25, nat=("gb",)))
    check = f"lake/{store.WRITE_CHECK}"
    assert s3.all_keys() == sorted([check, "lake/random_users_gbonly.parquet", "lake/random_users_pura.parquet"])
    assert s3.head(check)["ContentLength"] < 2000  # overwritten by each run: always one object
    assert_rows_are(etl.read_processed(s3.url()).collect(), raw_users(PURA, GBONLY))


@pytest.mark.parametrize("spelled", ["S3://{name}/lake", "s3://{name}", "s3://{name}/"], ids=["upper-case-scheme", "no-prefix", "no-prefix-slash"])
def test_an_upper_case_scheme_and_a_bucket_with_no_prefix_land(spelled, api, settings, s3):
    # Polars reads S3:// as a local path; with no prefix, batches land at the top of the bucket.
    address = spelled.format(name=s3.name)
    batch = etl.run(settings(output_dir=address, seed="pura"))
    prefix = "lake/" if address.endswith("/lake") else ""
    assert batch.path == f"s3://{s3.name}/{prefix}random_users_pura.parquet"
    assert s3.keys("") == [f"{prefix}random_users_pura.parquet"]
    assert_rows_are(etl.read_processed(address.replace("S3://", "s3://")).collect(), raw_users(PURA))


def staged_parts(s3) -> list[str]:
    """The parts staged for seed paged in the bucket's private staging folder."""
    return sorted(p.name for p in (s3.staged() / "paged").glob("part-*.parquet"))


def test_a_store_that_never_answers_ends_the_run_within_its_deadline_before_any_request(api, out, raw, s3, s3_endpoint):
    with held_store(s3_endpoint, holds="/") as held:
        result = run_cli(env=held_env(api, out, raw, s3, held.url, RANDOM_USER_TIMEOUT=0.5, RANDOM_USER_RETRIES=0), timeout=30)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, rf"^{PREFIX}cannot write to {s3.url()}: no answer from the object store within 0.5s \(--timeout\)$")
    assert api.requests == [] and s3.all_keys() == []


def test_an_upload_the_store_never_answers_ends_the_run_within_its_deadline_and_a_rerun_lands_the_staged_pages(api, out, raw, settings, s3, s3_endpoint):
    # In a process of its own: Polars keeps its client of a bucket, endpoint and all, for the life of the process.
    with held_store(s3_endpoint) as held:
        result = run_cli(env=held_env(api, out, raw, s3, held.url, RANDOM_USER_TIMEOUT=0.5, RANDOM_USER_RETRIES=0), timeout=30)
        assert held.held.is_set(), result.stderr  # the write check passed through; the batch's upload was held
    assert result.returncode == 1, result.stderr
    url = f"{s3.url()}/random_users_paged.parquet"
    assert_one_error_line(result.stderr, rf"^{PREFIX}cannot write {url}: no answer from the object store within 0.5s \(--timeout\)$")
    assert staged_parts(s3) == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"] and len(api.requests) == 3
    assert s3.keys() == []
    batch = etl.run(settings(output_dir=s3.url(), seed="paged", n=100, page_size=40))
    assert (batch.pages_fetched, batch.pages_reused) == (0, 3) and len(api.requests) == 3
    assert_rows_are(etl.read_processed(s3.url()).collect(), raw_users(*PAGED, limits={PAGED[2]: 20}))


def test_sigterm_during_an_upload_the_store_never_answers_ends_the_job_promptly_and_keeps_the_staged_pages(api, out, raw, s3, s3_endpoint, tmp_path):
    err = tmp_path / "stderr.txt"
    with held_store(s3_endpoint) as held:
        code, seconds = sigterm_when_held(held, held_env(api, out, raw, s3, held.url, RANDOM_USER_TIMEOUT=HELD), err, "the batch's upload held")
    assert_stopped(code, err.read_text(), seconds, signal.SIGTERM)
    assert staged_parts(s3) == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert s3.keys() == []


@contextlib.contextmanager
def stopped_once(held: threading.Event):
    """A SIGTERM to this process once `held` is set, raising Stopped (as the CLI's handler does) where the caller waits; raised out of the block."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(Stopped(signum)))
    try:
        threading.Thread(target=lambda: held.wait(HELD) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
        with pytest.raises(Stopped):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Whatever of the stopped call still talks to the store, done (a join the stop cut short says so too early).
    wait_until(lambda: not any(thread.name == "object-store" for thread in threading.enumerate()), HELD, "the stopped calls ended")


def test_a_run_stopped_during_its_upload_lands_nothing_after_the_stop_and_a_rerun_lands_it(api, settings, s3, s3_endpoint, monkeypatch):
    # A Python caller's run stopped while the store holds the batch's first try: a call left going on
    # would try again once --timeout passed, and land the batch behind the stopped run's back. The
    # timeout is long enough that the stop always comes first, however loaded the machine.
    with held_store(s3_endpoint, once=True) as held:
        monkeypatch.setenv("AWS_ENDPOINT_URL", held.url)  # before the bucket's first call: Polars keeps its client
        with stopped_once(held.held):
            etl.run(settings(output_dir=s3.url(), seed="paged", n=100, page_size=40, timeout=5, retries=1))
        assert s3.keys() == [], "the stopped run's batch landed after the stop"
        assert staged_parts(s3) == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
        batch = etl.run(settings(output_dir=s3.url(), seed="paged", n=100, page_size=40))
        assert (batch.pages_fetched, batch.pages_reused) == (0, 3)
        assert_rows_are(etl.read_processed(s3.url()).collect(), raw_users(*PAGED, limits={PAGED[2]: 20}))
    assert list(Path(tempfile.gettempdir()).rglob("*.tmp")) == []


def stopped_in_a_thread(settings, stop: Stop, held) -> BaseException | None:
    """What a run into the bucket raised when its Stop was asked from this thread while the store held a call of it."""
    ended: dict = {}

    def land() -> None:
        """The run, keeping what it raised."""
        try:
            ended["batch"] = etl.run(settings, stop)
        except BaseException as exc:  # Stopped is a KeyboardInterrupt
            ended["error"] = exc

    thread = threading.Thread(target=land, daemon=True)
    thread.start()
    wait_until(lambda: held.held.is_set() or not thread.is_alive(), what="the store holding the run's call")
    stop.stop()
    wait_until(lambda: not thread.is_alive(), 15, "the stopped run to end while the store holds its call")
    return ended.get("error")


def test_a_run_in_a_thread_stopped_by_its_stop_during_its_upload_ends_and_lands_nothing(api, settings, s3, s3_endpoint, monkeypatch):
    # No signal here: the run's own Stop, asked from another thread while the store holds the upload,
    # must end the upload's process as a signal would; the timeout is far past the wait for the end.
    with held_store(s3_endpoint, once=True) as held:
        monkeypatch.setenv("AWS_ENDPOINT_URL", held.url)
        ran = settings(output_dir=s3.url(), seed="paged", n=100, page_size=40, timeout=30, retries=1)
        assert isinstance(stopped_in_a_thread(ran, Stop(), held), Stopped)
        assert s3.keys() == []


def test_a_run_in_a_thread_stopped_by_its_stop_during_the_write_check_ends_before_any_request(api, settings, s3, s3_endpoint, monkeypatch):
    with held_store(s3_endpoint, holds="/", once=True) as held:
        monkeypatch.setenv("AWS_ENDPOINT_URL", held.url)
        ran = settings(output_dir=s3.url(), seed="paged", n=100, page_size=40, timeout=30, retries=1)
        assert isinstance(stopped_in_a_thread(ran, Stop(), held), Stopped)
    assert api.requests == [] and s3.keys() == []


def test_a_multipart_upload_stopped_midway_is_never_completed_and_the_earlier_object_stays(s3, s3_endpoint, tmp_path, monkeypatch):
    # Parts of 5 MiB (S3's least), so a 12 MB batch goes up in three; the store holds part 2's first try.
    monkeypatch.setenv("POLARS_UPLOAD_CHUNK_SIZE", str(5 << 20))
    key, large = "lake/random_users_large.parquet", tmp_path / "large.parquet"
    s3.client.put_object(Bucket=s3.name, Key=key, Body=b"the earlier batch")
    options = store.store_options(etl.Settings(timeout=5, retries=1))
    with held_store(s3_endpoint, holds="partNumber=2&", once=True) as held:
        monkeypatch.setenv("AWS_ENDPOINT_URL", held.url)
        pl.DataFrame({"x": range(1_500_000)}).with_columns(pl.col("x").hash()).write_parquet(large, compression="uncompressed")
        with stopped_once(held.held):
            store.upload(large, f"s3://{s3.name}/{key}", {}, options, Stop())
        assert s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read() == b"the earlier batch"
    assert not large.exists()


def test_a_batch_sorted_in_several_key_ranges_lands_in_s3_in_order(settings, s3, monkeypatch):
    # Small ranges, so the external sort splits pages while the run goes on and streams its
    # ranges to the object store through Polars' cloud writer.
    sorts = record_sorts(monkeypatch)
    batch = land_sorted(settings(output_dir=s3.url(), seed="paged", n=100, page_size=40, concurrency=2), 17, 40)
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
        staging.stage_part(
            folder, etl.transform(fixture_bytes(name), etl.PageRequest("paged", page, 40)), staging.part_identity(etl.Settings(), "paged", page, 40)
        )
        for page, name in enumerate(PAGED, start=1)
    ]


@contextlib.contextmanager
def scratch_lost_midway(stage: Path, stop: Stop):
    """The disk loses the sort's scratch once the write has begun its second key range."""
    with on_log("writing key range 2 of", lambda: shutil.rmtree(staging.sort_folder(stage))), pytest.raises((OSError, pl.exceptions.PolarsError)):
        yield


@contextlib.contextmanager
def stop_signal_arrived(stage: Path, stop: Stop):
    """A SIGTERM delivered before the write, as the CLI notes it while the main thread waits in Polars."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the CLI's handler, minus its unwinding
    try:
        with stop.noting_signals(), pytest.raises(Stopped):
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
    stop = Stop()
    sink = ObjectStore(s3.url(), {}, stop)

    def land() -> None:
        """Land the staged pages in key ranges of 17 rows."""
        sink.land(run.sorted_batch(parts, [40, 40, 40], sort.ExternalSort(staging.sort_folder(stage), 120, 17, stop=stop), "paged"))

    land()
    earlier = s3.client.get_object(Bucket=s3.name, Key=key.split("/", 3)[3])["Body"].read()
    with fault(stage, stop):
        land()
    assert s3.client.get_object(Bucket=s3.name, Key=key.split("/", 3)[3])["Body"].read() == earlier


# ---------------------------------------------------------------- paths are literal


def test_a_temp_folder_named_like_a_pattern_stages_and_sorts_this_runs_pages_not_a_siblings(api, settings, s3, tmp_path, monkeypatch):
    # A run whose upload failed left another seed's users staged, as this seed's, in the sibling tmp1.
    url = s3.url()
    for temp in ("tmp1", "tmp[1]"):
        (tmp_path / temp).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp1"))

    def upload_fails(*args, **kwargs):
        raise StorageError("the store went away")

    with pytest.MonkeyPatch.context() as patch:  # the precondition only: a failed upload, as a store that went away gives
        patch.setattr(store, "upload", upload_fails)
        with pytest.raises(etl.EtlError, match="the store went away"):
            etl.run(settings(output_dir=url, seed="decoy", n=100, page_size=40))
    staged = staging_root(url)
    (staged / "decoy").rename(staged / "paged")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp[1]"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp[1]"))
    sorts = record_sorts(monkeypatch)
    land_sorted(settings(output_dir=url, seed="paged", n=100, page_size=40, concurrency=2), 17, 40)
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


# ---------------------------------------------------------------- one lake, one spelling


def test_read_processed_reads_an_upper_case_scheme_as_the_lake_it_names(api, settings, s3):
    etl.run(settings(output_dir=s3.url(), seed="pura"))
    assert_rows_are(etl.read_processed(s3.url().replace("s3://", "S3://")).collect(), raw_users(PURA))


def test_a_run_stopped_under_one_spelling_of_a_prefix_resumes_under_another(api, settings, s3, monkeypatch):
    # "lake/", "lake//" and "lake" are one prefix: one staging folder, one seed lock, one resume.
    def upload_fails(*args, **kwargs):
        raise StorageError("the store went away")

    with pytest.MonkeyPatch.context() as patch:  # the precondition only: a failed upload, as a store that went away gives
        patch.setattr(store, "upload", upload_fails)
        with pytest.raises(etl.EtlError, match="the store went away"):
            etl.run(settings(output_dir=s3.url("lake//"), seed="paged", n=100, page_size=40))
    batch = etl.run(settings(output_dir=s3.url("lake/"), seed="paged", n=100, page_size=40))
    assert (batch.pages_fetched, batch.pages_reused) == (0, 3) and len(api.requests) == 3
    assert batch.path == f"{s3.url()}/random_users_paged.parquet"
    assert_rows_are(etl.read_processed(s3.url("lake/")).collect(), raw_users(*PAGED, limits={PAGED[2]: 20}))


def test_a_prefix_too_long_for_a_batch_key_is_refused_before_any_request(api, out, raw, cli, s3):
    # S3 takes keys of at most 1024 bytes: the write check's key fits here, a batch's of a long seed does not.
    url, seed = s3.url("a" * 990), "s" * 60
    result = cli("--seed", seed, env=fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=url))
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, r"--output-dir \(RANDOM_USER_OUTPUT_DIR\) has a prefix of 990 bytes: .*limit of 1024 bytes.*use at most 902$")
    assert api.requests == [] and s3.all_keys() == []


def test_an_empty_aws_secret_fails_in_one_line_of_storage_before_any_request(api, out, raw, s3, monkeypatch):
    # Polars' credential provider (boto3's, where installed) raises an error of its own, no OSError.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    result = run_cli(env=fast_env(api.url, out, raw, RANDOM_USER_OUTPUT_DIR=s3.url(), RANDOM_USER_SEED="pura"))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"^{PREFIX}cannot write to {s3.url()}: .*AWS_SECRET_ACCESS_KEY")
    assert api.requests == [] and s3.all_keys() == []


def test_a_job_killed_during_its_upload_takes_the_upload_with_it(api, out, raw, s3, s3_endpoint):
    # kill -9 runs no handler: the upload's process must see its parent gone by itself, or it would try
    # again once --timeout passed and land a batch whose run never finished (its staging, its raw pages).
    import psutil

    with held_store(s3_endpoint, once=True) as held:
        env = fast_env(
            api.url,
            out,
            raw,
            RANDOM_USER_OUTPUT_DIR=s3.url(),
            RANDOM_USER_SEED="paged",
            RANDOM_USER_N=100,
            RANDOM_USER_PAGE_SIZE=40,
            RANDOM_USER_TIMEOUT=5,
            RANDOM_USER_RETRIES=1,
            AWS_ENDPOINT_URL=held.url,
        )
        job = start_cli(env=env)
        try:
            assert held.held.wait(60), "the upload never reached the store"
            uploads = psutil.Process(job.pid).children(recursive=True)
            assert uploads, "the upload runs in a process of its own"
        finally:
            job.kill()
            job.wait()
        gone, alive = psutil.wait_procs(uploads, timeout=20)
        for process in alive:
            process.kill()
        assert not alive, "the upload outlived the job"
        assert s3.keys() == [], "a killed job's batch landed after it died"


def test_a_run_that_lands_leaves_nothing_in_the_temp_folder_and_a_second_run_of_the_seed_too(api, settings, s3):
    temp = Path(tempfile.gettempdir())
    for _ in range(2):  # the second run finds no folder and no lock of the first
        batch = etl.run(settings(output_dir=s3.url(), seed="pura"))
        assert_rows_are(pl.read_parquet(batch.path), raw_users(PURA))
        assert sorted(temp.rglob("*")) == [], "the run's private staging, lock and temp files are gone once it landed"


def test_runs_of_one_seed_into_object_storage_at_once_take_turns_while_each_tidies_up(api, settings, s3):
    # Each run that lands removes its lock and folders: one starting then must neither fail nor share a lock.
    import concurrent.futures as futures

    with futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: etl.run(settings(output_dir=s3.url(), seed="pura", concurrency=1)), range(6)))
    assert {batch.rows for batch in batches} == {100}
    assert_rows_are(etl.read_processed(s3.url()).collect(), raw_users(PURA))
    assert sorted(Path(tempfile.gettempdir()).rglob("*")) == []


@pytest.mark.parametrize("body", [b"torn", fixture_bytes(PURA)], ids=["torn", "not-parquet"])
def test_a_torn_or_foreign_object_in_the_lake_is_named_when_the_lake_is_collected(api, settings, s3, body):
    etl.run(settings(output_dir=s3.url(), seed="pura"))
    s3.client.put_object(Bucket=s3.name, Key="lake/random_users_torn.parquet", Body=body)
    with pytest.raises(StorageError) as refused:
        etl.read_processed(s3.url()).collect()
    assert f"s3://{s3.name}/lake/random_users_torn.parquet" in str(refused.value)
    assert "Person" not in str(refused.value) and "{" not in str(refused.value)  # the object's bytes are never echoed
