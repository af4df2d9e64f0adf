"""The lake as one Delta table (--table-format delta): each batch one commit into <output-dir>/random_users/.

The real job lands into a real table (deltalake), locally and on moto's S3 on loopback; every value
read back is checked against the raw JSON the fake served, read by the standard library.
"""

from __future__ import annotations

import concurrent.futures as futures
import datetime as dt
import json
import signal
import subprocess
import sys

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from fake_api import PICKED_SEED, status
from support import (
    HELD,
    PREFIX,
    SPARK_MISSING,
    assert_one_error_line,
    assert_rows_are,
    assert_stopped,
    fast_env,
    held_env,
    held_store,
    land_sorted,
    on_log,
    raw_key,
    run_cli,
    served_users,
    sigterm_when_held,
    start_cli,
    wait_until,
)

import random_user_etl as etl
from _random_user_etl import __version__
from random_user_config import SettingsError
from schemas import OUTPUT_SCHEMA, PII_CLASSES, SORT_KEY

TABLE = "random_users"


def table(out) -> DeltaTable:
    """The lake's table as deltalake opens it."""
    return DeltaTable(str(out / TABLE))


def rows(out) -> pl.DataFrame:
    """Every row of the local table, read by Polars through deltalake itself (not the job's reader)."""
    return pl.scan_delta(str(out / TABLE)).collect()


def seed_rows(frame: pl.DataFrame, seed: str) -> pl.DataFrame:
    """The rows of one seed."""
    return frame.filter(pl.col("seed") == seed)


def batch_commits(delta: DeltaTable) -> list[dict]:
    """The table's commits after its creation (version 0: the schema, no rows), oldest first."""
    commits = sorted(delta.history(), key=lambda commit: commit["version"])
    assert commits[0]["operation"] == "CREATE TABLE" and commits[0]["version"] == 0
    return commits[1:]


def land(settings, seed: str, n: int = 12, page_size: int = 5, **changes):
    """One delta run of (seed, n, page_size) against the fake."""
    return etl.run(settings(table_format="delta", seed=seed, n=n, page_size=page_size, **changes))


# ---------------------------------------------------------------- landing


def test_a_delta_run_lands_its_batch_into_one_table_as_the_raw_json_has_it(settings, out):
    land(settings, "alpha")
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [TABLE]
    assert (out / TABLE / "_delta_log").is_dir()
    frame = rows(out)
    assert frame.schema == OUTPUT_SCHEMA
    assert_rows_are(frame, served_users("alpha", 12, 5))
    assert [commit["version"] for commit in batch_commits(table(out))] == [1]


def test_the_default_format_lands_files_and_no_table(settings, out):
    etl.run(settings(seed="alpha", n=12, page_size=5))
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == ["random_users_alpha.parquet"]


def test_each_batch_is_one_commit_recording_its_seed_and_the_jobs_version(settings, out):
    land(settings, "alpha")
    land(settings, "beta", n=7)
    commits = batch_commits(table(out))
    assert [commit["version"] for commit in commits] == [1, 2]
    assert [commit["random_user_etl.seed"] for commit in commits] == ["alpha", "beta"]
    assert {commit["random_user_etl.version"] for commit in commits} == {__version__}
    frame = rows(out)
    assert_rows_are(seed_rows(frame, "alpha"), served_users("alpha", 12, 5))
    assert_rows_are(seed_rows(frame, "beta"), served_users("beta", 7, 5))


def test_a_rerun_replaces_exactly_its_seeds_rows_in_one_commit(settings, out):
    land(settings, "alpha")
    land(settings, "beta", n=7)
    before = seed_rows(rows(out), "beta").sort("user_id")
    land(settings, "alpha", n=9)  # fewer users: the 12 rows of alpha must all go
    commits = batch_commits(table(out))
    assert len(commits) == 3
    last = commits[-1]
    assert last["operationParameters"]["predicate"] == "seed = 'alpha'"
    assert last["operationParameters"]["mode"] == "Overwrite"
    frame = rows(out)
    assert_rows_are(seed_rows(frame, "alpha"), served_users("alpha", 9, 5))
    assert seed_rows(frame, "beta").sort("user_id").equals(before)


def test_a_failed_run_leaves_the_table_at_its_previous_version(settings, out, api):
    land(settings, "alpha")
    api.script(*[status(503)] * 4)  # the first try and all three retries
    with pytest.raises(etl.EtlError):
        land(settings, "alpha", n=5)
    assert table(out).version() == 1
    assert_rows_are(rows(out), served_users("alpha", 12, 5))


def test_an_unknown_table_format_is_refused_before_any_request(api, out, raw):
    ran = etl_cli(api, out, raw, "--seed", "alpha", "--table-format", "iceberg")
    assert ran.returncode == 2
    assert_one_error_line(ran.stderr, "--table-format")
    assert api.requests == [] and not out.exists()


def test_an_unknown_table_format_in_the_environment_is_refused_before_any_request(api, out, raw):
    ran = run_cli("--seed", "alpha", env=fast_env(api.url, out, raw, RANDOM_USER_TABLE_FORMAT="iceberg"))
    assert ran.returncode == 2
    assert_one_error_line(ran.stderr, r"RANDOM_USER_TABLE_FORMAT must be files or delta, got 'iceberg'")
    assert api.requests == [] and not out.exists()


def test_compact_with_replay_is_refused_as_bad_settings(out, raw, capsys):
    assert compact_cli(out, "--replay", str(raw / "alpha")) == 2
    assert_one_error_line(capsys.readouterr().err, "--compact is a job of its own")


def test_a_folder_that_is_no_delta_table_where_the_table_goes_fails_in_one_line_before_any_request(api, out, raw):
    (out / TABLE).mkdir(parents=True)
    (out / TABLE / "notes.txt").write_text("not a table")
    ran = etl_cli(api, out, raw, "--seed", "alpha", "--table-format", "delta")
    assert ran.returncode == 1
    assert_one_error_line(ran.stderr, "not a Delta table")
    assert api.requests == []
    assert sorted(path.name for path in (out / TABLE).iterdir()) == ["notes.txt"]


def etl_cli(api, out, raw, *args):
    """The CLI in a process of its own, pointed at the fake."""
    return run_cli(*args, env=fast_env(api.url, out, raw))


# ---------------------------------------------------------------- what readers see


def test_the_table_stays_at_the_protocol_plain_readers_handle_with_zstd_files_in_key_order(settings, out):
    land(settings, "alpha", n=12)
    land(settings, "alpha", n=12)
    delta = table(out)
    protocol = delta.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features
    assert delta.metadata().configuration.get("delta.enableDeletionVectors", "false") == "false"
    import pyarrow.parquet as pq

    for uri in delta.file_uris():
        meta = pq.ParquetFile(uri).metadata
        assert {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups) for c in range(meta.num_columns)} == {"ZSTD"}
    (uri,) = delta.file_uris()  # the rerun replaced the first file whole
    frame = pl.read_parquet(uri)
    assert frame.height == 12
    assert frame.select(SORT_KEY).equals(frame.select(SORT_KEY).sort(SORT_KEY))


# The test above lands one block of rows, which no writer can put out of order.
def test_a_batch_of_many_key_ranges_lands_in_the_tables_files_in_the_raw_keys_order(settings, out):
    land_sorted(settings(seed="many", n=1000, page_size=250, concurrency=2, table_format="delta"), 17, 40)
    rows = pl.concat(pl.read_parquet(uri) for uri in table(out).file_uris())
    assert rows.select(SORT_KEY).rows() == sorted(map(raw_key, served_users("many", 1000, 250)))


def test_the_pii_classes_are_in_the_table_schemas_column_metadata(settings, out):
    land(settings, "alpha")
    fields = {field.name: field.metadata for field in table(out).schema().fields}
    assert list(fields) == list(OUTPUT_SCHEMA)
    assert {name: metadata.get("pii") for name, metadata in fields.items()} == PII_CLASSES


def test_pandas_reads_the_table_through_deltalake(settings, out):
    land(settings, "alpha")
    land(settings, "beta", n=7)
    frame = table(out).to_pandas()
    assert sorted(frame["user_id"]) == sorted(u["login"]["uuid"] for u in served_users("alpha", 12, 5) + served_users("beta", 7, 5))
    assert str(frame["date_of_birth"].dtype) == "datetime64[us, UTC]"


def test_duckdb_reads_the_tables_arrow_dataset_with_no_extension(settings, out):
    import duckdb

    land(settings, "alpha")
    land(settings, "beta", n=7)
    land(settings, "alpha", n=9)
    dataset = table(out).to_pyarrow_dataset()
    con = duckdb.connect()
    con.register("users", dataset)
    got = dict(con.sql("SELECT seed, count(*) FROM users GROUP BY seed").fetchall())
    assert got == {"alpha": 9, "beta": 7}
    ids = {row[0] for row in con.sql("SELECT user_id FROM users WHERE seed = 'alpha'").fetchall()}
    assert ids == {u["login"]["uuid"] for u in served_users("alpha", 9, 5)}


def test_read_processed_finds_the_table_and_reads_it_lazily_with_the_output_schema(settings, out):
    land(settings, "alpha")
    land(settings, "beta", n=7)
    lake = etl.read_processed(str(out))
    assert isinstance(lake, pl.LazyFrame)
    frame = lake.collect()
    assert frame.schema == OUTPUT_SCHEMA
    assert_rows_are(frame, served_users("alpha", 12, 5) + served_users("beta", 7, 5))
    assert etl.read_processed(str(out), unique_users=True).collect().height == 19


def test_read_processed_reads_an_earlier_version(settings, out):
    land(settings, "alpha")
    land(settings, "alpha", n=9)
    assert_rows_are(etl.read_processed(str(out)).collect(), served_users("alpha", 9, 5))
    first = batch_commits(table(out))[0]
    at = dt.datetime.fromtimestamp(first["timestamp"] / 1000, dt.UTC)  # the first batch's commit time: a run later than it landed the second
    for version in (first["version"], at):
        earlier = etl.read_processed(str(out), version=version).collect()
        assert earlier.schema == OUTPUT_SCHEMA
        assert_rows_are(earlier, served_users("alpha", 12, 5))


def test_a_version_of_a_lake_of_files_is_refused(settings, out):
    etl.run(settings(seed="alpha", n=5, page_size=5))
    with pytest.raises(SettingsError, match="Delta table"):
        etl.read_processed(str(out), version=0)


def test_a_column_added_to_the_contract_lands_into_an_existing_table_and_reads_as_null_in_older_rows(settings, out):
    # The table as an older contract made it: every column but picture_url, one batch of seed old.
    users = served_users("old", 6, 6)
    land(settings, "old", n=6, page_size=6)
    older = rows(out).drop("picture_url")
    (out / TABLE).rename(out / "landed")
    write_deltalake(str(out / TABLE), older.to_arrow())
    land(settings, "alpha")
    delta = table(out)
    assert "picture_url" in [field.name for field in delta.schema().fields]
    assert delta.version() == 1  # the batch and its new column: one commit
    frame = etl.read_processed(str(out)).collect()
    assert frame.schema == OUTPUT_SCHEMA
    assert seed_rows(frame, "old")["picture_url"].null_count() == 6
    assert_rows_are(seed_rows(frame, "alpha"), served_users("alpha", 12, 5))
    assert sorted(seed_rows(frame, "old")["user_id"]) == sorted(u["login"]["uuid"] for u in users)


def test_four_runs_of_different_seeds_land_into_one_table_at_once(settings, out):
    seeds = ["one", "two", "three", "four"]
    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda seed: land(settings, seed, n=7), seeds))
    commits = batch_commits(table(out))
    assert sorted(commit["random_user_etl.seed"] for commit in commits) == sorted(seeds)
    assert [commit["operation"] for commit in commits] == ["WRITE"] * 4
    frame = rows(out)
    for seed in seeds:
        assert_rows_are(seed_rows(frame, seed), served_users(seed, 7, 5))


# ---------------------------------------------------------------- object storage

# deltalake holds the GIL through some calls to the store: moto on a thread of this process could not
# answer them, so these tests' store is moto in a process of its own (the conftest s3 fixture, on it).
MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the test process closes it, or dies
"""


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in a process of its own on a free loopback port, for this module."""
    server = subprocess.Popen([sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    address = server.stdout.readline().strip()
    assert address, "moto did not start"
    yield f"http://{address}"
    server.stdin.close()
    server.wait(timeout=30)


def test_a_delta_run_lands_into_a_table_on_s3(settings, s3):
    etl.run(settings(table_format="delta", seed="alpha", n=12, page_size=5, output_dir=s3.url()))
    etl.run(settings(table_format="delta", seed="alpha", n=9, page_size=5, output_dir=s3.url()))
    keys = s3.keys("lake/")
    assert any(key.startswith(f"lake/{TABLE}/_delta_log/") for key in keys)
    assert all(key.startswith(f"lake/{TABLE}/") for key in keys), keys
    frame = etl.read_processed(s3.url()).collect()
    assert frame.schema == OUTPUT_SCHEMA
    assert_rows_are(frame, served_users("alpha", 9, 5))


def test_four_runs_land_into_one_table_on_s3_at_once(settings, s3):
    seeds = ["one", "two", "three", "four"]
    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda seed: etl.run(settings(table_format="delta", seed=seed, n=7, page_size=5, output_dir=s3.url())), seeds))
    frame = etl.read_processed(s3.url()).collect()
    for seed in seeds:
        assert_rows_are(seed_rows(frame, seed), served_users(seed, 7, 5))
    assert sorted(frame["seed"].unique()) == sorted(seeds)


def test_compact_compacts_a_table_on_s3(settings, s3):
    for seed, n in (("alpha", 12), ("beta", 7), ("alpha", 9)):
        etl.run(settings(table_format="delta", seed=seed, n=n, page_size=5, output_dir=s3.url()))
    before = etl.read_processed(s3.url()).collect().sort("user_id")
    done = etl.compact(settings(output_dir=s3.url(), retain_hours=0))
    assert done.files_after < done.files_before
    data = [key for key in s3.keys(f"lake/{TABLE}/") if key.endswith(".parquet") and "/_delta_log/" not in key]
    assert len(data) == done.files_after
    assert etl.read_processed(s3.url()).collect().sort("user_id").equals(before)
    assert_rows_are(before, served_users("alpha", 9, 5) + served_users("beta", 7, 5))


def test_a_write_check_refuses_a_missing_bucket_before_any_request(api, out, raw, s3):
    ran = etl_cli(api, out, raw, "--seed", "alpha", "--table-format", "delta", "--output-dir", f"s3://{s3.name}-missing/lake")
    assert ran.returncode == 1
    assert api.requests == []
    assert ran.stderr.startswith(PREFIX)


def test_the_commit_metadata_is_json(settings, out):
    land(settings, "alpha")
    log = sorted((out / TABLE / "_delta_log").glob("*.json"))[1]
    info = next(json.loads(line)["commitInfo"] for line in log.read_text().splitlines() if "commitInfo" in line)
    assert info["random_user_etl.seed"] == "alpha"


# ---------------------------------------------------------------- refusals


def test_rows_of_another_seed_are_refused_by_the_predicate_in_one_line_without_them(settings, out, tmp_path):
    from _random_user_etl.delta import DeltaTable as Sink
    from _random_user_etl.store import SortedBatch

    land(settings, "alpha")
    beta = rows(out).with_columns(seed=pl.lit("beta"))  # a batch said to be alpha's whose rows are another seed's
    with pytest.raises(etl.EtlError) as failed:
        Sink(str(out)).land(SortedBatch(beta.lazy(), "alpha", {}, tmp_path, 1000))
    said = str(failed.value)
    assert "\n" not in said and "failed validation" in said
    assert not any(user_id in said for user_id in beta["user_id"])
    assert table(out).version() == 1
    assert_rows_are(rows(out), served_users("alpha", 12, 5))


# ---------------------------------------------------------------- replay and maintenance


def test_a_replay_lands_into_the_table_like_a_run(settings, out, raw):
    land(settings, "alpha")
    before = rows(out).drop("ingested_at").sort("user_id")
    etl.replay(raw / "alpha", settings(table_format="delta"))
    commits = batch_commits(table(out))
    assert [commit["random_user_etl.seed"] for commit in commits] == ["alpha", "alpha"]
    assert rows(out).drop("ingested_at").sort("user_id").equals(before)


def compact_cli(out, *args):
    """`--compact` of the local table, in this process."""
    from support import main_in_process

    return main_in_process(["--compact", "--output-dir", str(out), *args])


def test_compact_merges_small_files_and_vacuums_what_no_version_within_retain_hours_needs(settings, out, capsys):
    for seed, n in (("alpha", 12), ("beta", 7), ("gamma", 5), ("alpha", 9)):
        land(settings, seed, n=n)
    before = etl.read_processed(str(out)).collect().sort("user_id")
    files_before = len(table(out).file_uris())
    on_disk_before = len(list((out / TABLE).glob("*.parquet")))
    assert compact_cli(out, "--retain-hours", "0") == 0
    delta = table(out)
    assert len(delta.file_uris()) < files_before
    assert len(list((out / TABLE).glob("*.parquet"))) < on_disk_before
    assert sorted(path.name for path in (out / TABLE).glob("*.parquet")) == sorted(uri.rsplit("/", 1)[1] for uri in delta.file_uris())
    assert etl.read_processed(str(out)).collect().sort("user_id").equals(before)
    assert "compacted" in capsys.readouterr().err


def test_compact_keeps_the_files_of_versions_within_retain_hours(settings, out):
    land(settings, "alpha")
    land(settings, "beta", n=7)
    assert compact_cli(out) == 0  # the default: a week
    assert_rows_are(etl.read_processed(str(out), version=1).collect(), served_users("alpha", 12, 5))


def test_compact_given_the_stop_of_a_run_that_failed_compacts(settings, out, api):
    # A caller may keep one Stop for its jobs one after another: a run's failure winds it down, and
    # that wind-down is the run's alone, as it is for the next run (Run.land begins it again).
    land(settings, "alpha")
    land(settings, "beta", n=7)
    stop = etl.Stop()
    api.script(*[status(503)] * 4)  # the first try and all three retries
    with pytest.raises(etl.EtlError):
        etl.run(settings(table_format="delta", seed="gamma", n=5, page_size=5), stop)
    done = etl.compact(settings(retain_hours=0), stop)
    assert done.files_after < done.files_before
    assert_rows_are(rows(out), served_users("alpha", 12, 5) + served_users("beta", 7, 5))


def test_compact_where_there_is_no_table_fails_in_one_line(out, capsys):
    out.mkdir()
    assert compact_cli(out) == 1
    assert_one_error_line(capsys.readouterr().err, "no Delta table")


def test_a_run_stopped_while_its_batch_is_written_leaves_the_table_at_its_previous_version(settings, out):
    from _random_user_etl.run import Run, SortSizes
    from _random_user_etl.sources import ServicePages

    land(settings, "alpha")
    stop = etl.Stop()
    with on_log("writing key range 2 of", stop.stop), pytest.raises(etl.Stopped):
        Run(settings(table_format="delta", seed="alpha", n=9, page_size=5), ServicePages(), stop, SortSizes(3, 3)).land()
    assert table(out).version() == 1
    assert_rows_are(rows(out), served_users("alpha", 12, 5))


def test_a_first_run_stopped_while_its_batch_is_written_makes_no_table(settings, out):
    from _random_user_etl.run import Run, SortSizes
    from _random_user_etl.sources import ServicePages

    stop = etl.Stop()
    with on_log("writing key range 2 of", stop.stop), pytest.raises(etl.Stopped):
        Run(settings(table_format="delta", seed="alpha", n=9, page_size=5), ServicePages(), stop, SortSizes(3, 3)).land()
    assert not DeltaTable.is_deltatable(str(out / TABLE))
    assert etl.read_processed(str(out)).collect().height == 0


@pytest.mark.skipif(SPARK_MISSING is not None, reason=SPARK_MISSING or "")
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_reads_the_tables_current_file_list(settings, out, spark):
    # Spark without the Delta package reads no log: it is given the files of the version it reads.
    land(settings, "alpha")
    land(settings, "beta", n=7)
    land(settings, "alpha", n=9)  # alpha's first file is no longer in the table, but still on disk
    assert len(list((out / TABLE).glob("*.parquet"))) > len(table(out).file_uris())
    frame = spark.read.parquet(*table(out).file_uris())
    assert [field.name for field in frame.schema.fields] == list(OUTPUT_SCHEMA)
    counts = {row["seed"]: row["count"] for row in frame.groupBy("seed").count().collect()}
    assert counts == {"alpha": 9, "beta": 7}
    ids = {row["user_id"] for row in frame.select("user_id").collect()}
    assert ids == {u["login"]["uuid"] for u in served_users("alpha", 9, 5) + served_users("beta", 7, 5)}


def test_a_picked_seed_whose_rows_are_in_the_table_is_refused_and_the_table_untouched(api, out, raw, cli):
    api.picks = PICKED_SEED  # the service picks a seed the table holds
    env = fast_env(api.url, out, raw, RANDOM_USER_TABLE_FORMAT="delta")
    assert cli("--seed", "other", "--n", 5, env=env).returncode == 0
    assert cli("--n", 5, env=env).returncode == 0  # the table holds no row of the picked seed yet: it lands
    assert sorted(rows(out)["seed"].unique()) == sorted(["other", PICKED_SEED])
    result = cli("--n", 5, env=env)  # no --seed: the service picks the seed that has landed
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"a batch of seed {PICKED_SEED} is already at .*{TABLE}: the service picked it")
    assert table(out).version() == 2


def test_compact_keeps_each_batchs_rows_in_their_raw_keys_order(settings, out):
    for seed in ("many", "more"):
        land_sorted(settings(seed=seed, n=1000, page_size=250, concurrency=2, table_format="delta"), 17, 40)
    assert compact_cli(out, "--retain-hours", "0") == 0
    (uri,) = table(out).file_uris()
    compacted = pl.read_parquet(uri)
    assert compacted["seed"].rle().struct.field("value").to_list() in (["many", "more"], ["more", "many"])  # each batch's rows together
    for seed in ("many", "more"):
        assert seed_rows(compacted, seed).select(SORT_KEY).rows() == sorted(map(raw_key, served_users(seed, 1000, 250)))


def test_sigterm_during_a_commit_the_store_never_answers_ends_the_job_promptly_and_commits_nothing(api, out, raw, s3, s3_endpoint, tmp_path):
    # deltalake's write runs until the store answers, and cannot be cancelled: the commit runs in a
    # process of its own, which the stop kills; the table stays at the version it had (here, its creation).
    err = tmp_path / "stderr.txt"
    with held_store(s3_endpoint, holds=f"/{TABLE}/_delta_log/00000000000000000001.json") as held:
        env = held_env(api, out, raw, s3, held.url, RANDOM_USER_TABLE_FORMAT="delta", RANDOM_USER_TIMEOUT=HELD)
        code, seconds = sigterm_when_held(held, env, err, "the batch's commit held")
    assert_stopped(code, err.read_text(), seconds, signal.SIGTERM)
    lake = DeltaTable(f"{s3.url()}/{TABLE}", storage_options={"allow_http": "true"})
    assert lake.version() == 0 and len(lake.file_uris()) == 0


def test_a_commit_the_store_never_answers_fails_in_one_line_that_says_it_timed_out(api, out, raw, s3, s3_endpoint):
    # delta-rs chains an error's causes on lines of their own ("↳ ..."), the first only "Generic S3 error".
    with held_store(s3_endpoint, holds=f"/{TABLE}/_delta_log/00000000000000000001.json") as held:
        env = held_env(api, out, raw, s3, held.url, RANDOM_USER_TABLE_FORMAT="delta", RANDOM_USER_TIMEOUT=1, RANDOM_USER_RETRIES=0)
        ran = run_cli(env=env)
    assert ran.returncode == 1
    assert_one_error_line(ran.stderr, rf"^{PREFIX}cannot commit to {s3.url()}/{TABLE}: .*timed out")
    lake = DeltaTable(f"{s3.url()}/{TABLE}", storage_options={"allow_http": "true"})
    assert lake.version() == 0 and len(lake.file_uris()) == 0


def test_a_commits_process_killed_by_something_else_fails_the_run_in_one_line_and_commits_nothing(api, out, raw, s3, s3_endpoint, tmp_path):
    # As the kernel's OOM killer would: the run says so and fails (exit 1); the table keeps its version.
    import psutil

    err = tmp_path / "stderr.txt"
    with held_store(s3_endpoint, holds=f"/{TABLE}/_delta_log/00000000000000000001.json") as held:
        proc = start_cli(env=held_env(api, out, raw, s3, held.url, RANDOM_USER_TABLE_FORMAT="delta", RANDOM_USER_TIMEOUT=HELD), log=err)
        try:
            wait_until(lambda: held.held.is_set() or proc.poll() is not None, what="the batch's commit held")
            (commit,) = psutil.Process(proc.pid).children()
            assert "_random_user_etl.own_process" in commit.cmdline()
            commit.kill()
            code = proc.wait(timeout=HELD)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 1
    assert_one_error_line(err.read_text(), rf"^{PREFIX}cannot commit to {s3.url()}/{TABLE}: the commit's process ended with status -9 and no answer$")
    lake = DeltaTable(f"{s3.url()}/{TABLE}", storage_options={"allow_http": "true"})
    assert lake.version() == 0 and len(lake.file_uris()) == 0


def test_a_picked_seed_whose_rows_are_in_a_table_on_s3_is_refused_and_the_table_untouched(api, s3, tmp_path):
    # In processes of their own: some of deltalake's calls hold the GIL while they wait on the store,
    # which this process serves (moto) on a thread. The look for the seed's rows is a scan of the table.
    api.picks = PICKED_SEED
    env = fast_env(api.url, s3.url(), tmp_path / "raw", RANDOM_USER_TABLE_FORMAT="delta")
    assert run_cli("--n", 5, env=env).returncode == 0  # the table holds no row of the picked seed yet: it lands
    result = run_cli("--n", 5, env=env)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"a batch of seed {PICKED_SEED} is already at .*{TABLE}: the service picked it")
    versions = s3.delta_log(f"lake/{TABLE}")
    assert len(versions) == 2  # its creation, and the one batch: none after the refusal
