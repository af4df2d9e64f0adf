"""The analyst lake: pseudonymised, k-anonymous files built from a lake landed from the fake service, locally and in object storage."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from fake_api import page_body, status
from support import PREFIX, fast_env, run_cli, served_users

import random_user_etl as etl
from schemas import DIRECT, PII_CLASSES, QUASI

KEY = "correct horse battery staple, long enough for HMAC"
OTHER_KEY = "an unrelated key of the operator's, 32 bytes or more"
KEY_VARIABLE, KEY_FILE_VARIABLE = "RANDOM_USER_PSEUDONYM_KEY", "RANDOM_USER_PSEUDONYM_KEY_FILE"
DEMO = {"demo": 80, "demo2": 40}  # the service's "demo" page 2 is "demo2" page 1: 40 users in both batches


def hmac_hex(key: str, user_id: str) -> str:
    """person_key as the README defines it (HMAC-SHA256 of the id under the key), computed here with the standard library."""
    return hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def lake(settings):
    """A lake of seeds demo (80 users) and demo2 (40), 40 a page, landed from the fake; the settings it was landed with."""
    for seed, n in DEMO.items():
        etl.run(settings(seed=seed, n=n, page_size=40))
    return settings(page_size=40)


def analyst_files(target: Path) -> dict[str, pl.DataFrame]:
    """Each analyst file's name and rows."""
    return {path.name: pl.read_parquet(path) for path in sorted(target.glob("pseudonymised_users_*.parquet"))}


def file_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder with its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def quasi_of(path) -> list[str]:
    """The quasi-identifier columns an analyst file says it holds, read from its fields' own metadata."""
    schema = pq.read_schema(path)
    return [field.name for field in schema if (field.metadata or {}).get(b"pii") == QUASI.encode()]


def assert_k_anonymous(frame: pl.DataFrame, quasi: list[str], k: int) -> None:
    """Every combination of the quasi columns occurs at least k times, rows with all of them null aside."""
    assert quasi, "an analyst file names its quasi-identifiers"
    kept = frame.filter(~pl.all_horizontal(pl.col(quasi).is_null()))
    counts = kept.group_by(quasi).len()
    assert counts.filter(pl.col("len") < k).is_empty(), counts.sort("len").head(5)


def test_person_key_is_the_hmac_sha256_of_the_id_by_a_known_vector():
    from _random_user_etl.pseudonym import PseudonymKey

    # RFC 4231, test case 2.
    assert PseudonymKey(b"Jefe").person_key("what do ya want for nothing?") == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_every_column_has_a_treatment_beside_its_class_and_every_direct_one_is_dropped_or_keyed():
    from schemas import TREATMENTS

    assert list(TREATMENTS) == list(PII_CLASSES)
    for column, kind in PII_CLASSES.items():
        treatment, name = TREATMENTS[column]
        if kind == DIRECT:
            assert treatment in ("drop", "person_key"), column
        if kind == "none":
            assert (treatment, name) == ("keep", column), column


def test_the_analyst_lake_holds_no_direct_value_and_the_hmac_of_every_user(lake, tmp_path, monkeypatch):
    target = tmp_path / "analyst"
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    etl.pseudonymise(str(target), lake)
    files = analyst_files(target)
    assert sorted(files) == ["pseudonymised_users_demo.parquet", "pseudonymised_users_demo2.parquet"]
    landed = etl.read_processed(lake.output_dir).collect()
    direct = {str(value) for column, kind in PII_CLASSES.items() if kind == DIRECT for value in landed[column].drop_nulls() if isinstance(value, str)}
    for name, frame in files.items():
        assert not set(frame.columns) & {column for column, kind in PII_CLASSES.items() if kind == DIRECT}
        cells = {str(value) for column in frame.columns for value in frame[column].drop_nulls()}
        assert not cells & direct, name
        # Each field carries its class, and the file names them all in its key-value metadata.
        schema = pq.read_schema(target / name)
        footer = pq.read_metadata(target / name).metadata
        classes = json.loads(footer[b"random_user_etl.pii"])
        assert {field.name: field.metadata[b"pii"].decode() for field in schema} == classes
        assert classes["person_key"] == DIRECT and "gender" in quasi_of(target / name)
        record = json.loads(footer[b"random_user_etl.pseudonym"])
        assert record["algorithm"] == "HMAC-SHA256" and len(record["key_id"]) == 16 and record["k"] == 5
        assert record["suppressed_rows"] == frame.filter(pl.col("gender").is_null()).height
    # person_key is the HMAC of the id, for every user the fake served each seed.
    for seed, n in DEMO.items():
        served = served_users(seed, n, 40)
        got = files[f"pseudonymised_users_{seed}.parquet"]["person_key"].to_list()
        assert sorted(got) == sorted(hmac_hex(KEY, user["login"]["uuid"]) for user in served)
    # The users both batches hold have one person_key: analysts can count people across batches.
    shared = set(files["pseudonymised_users_demo.parquet"]["person_key"]) & set(files["pseudonymised_users_demo2.parquet"]["person_key"])
    assert shared == {hmac_hex(KEY, user["login"]["uuid"]) for user in served_users("demo2", 40, 40)}
    # read_pseudonymised reads them lazily, as one frame.
    lazy = etl.read_pseudonymised(str(target))
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.select(pl.len()).collect().item() == 120
    assert lazy.select(pl.col("person_key").n_unique()).collect().item() == 80


def test_another_key_gives_unrelated_pseudonyms_and_rebuilds_every_file(lake, tmp_path, monkeypatch):
    target = tmp_path / "analyst"
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    etl.pseudonymise(str(target), lake)
    first = set(etl.read_pseudonymised(str(target)).collect()["person_key"])
    monkeypatch.setenv(KEY_VARIABLE, OTHER_KEY)
    built = etl.pseudonymise(str(target), lake)
    assert sorted(built.values()) == [True, True]
    second = set(etl.read_pseudonymised(str(target)).collect()["person_key"])
    assert len(second) == len(first) == 80 and not first & second
    ids = {json.loads(pl.read_parquet_metadata(path)["random_user_etl.pseudonym"])["key_id"] for path in target.glob("*.parquet")}
    assert len(ids) == 1 and ids != {etl.pseudonym.PseudonymKey(KEY.encode()).id}


def test_every_analyst_file_is_k_anonymous_at_the_k_asked_for(lake, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    for k in (2, 5, 12):
        target = tmp_path / f"k{k}"
        etl.pseudonymise(str(target), lake, k_anonymity=k)
        for name, frame in analyst_files(target).items():
            assert_k_anonymous(frame, quasi_of(target / name), k)
            assert frame.height == DEMO[name.removeprefix("pseudonymised_users_").removesuffix(".parquet")]  # suppressed, never dropped


def test_a_landed_5000_user_batch_keeps_most_of_its_quasi_identifiers_and_every_file_is_k_anonymous(settings, tmp_path, monkeypatch):
    # The small lake above has every row suppressed at k = 5: this one checks k on rows that kept theirs.
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    lake = settings(seed="kbig", n=5000, page_size=5000, output_dir=str(tmp_path / "lake"))
    etl.run(lake)
    target = tmp_path / "analyst"
    etl.pseudonymise(str(target), lake)
    (frame,) = analyst_files(target).values()
    quasi = quasi_of(target / "pseudonymised_users_kbig.parquet")
    kept = frame.filter(~pl.any_horizontal(pl.col(quasi).is_null()))
    assert frame.height == 5000 and kept.height >= 2500, kept.height
    assert_k_anonymous(frame, quasi, 5)


def test_at_least_half_of_a_5000_user_batch_of_all_nationalities_keeps_its_quasi_identifiers_at_k_5():
    from _random_user_etl.pseudonym import PseudonymKey, quasi_columns, suppressed, treated

    batch = etl.transform(page_body("kfigure", 1, 5000))
    # The fake repeats a few hundred people under new ids: shuffled column by column, the quasi
    # columns are as independent as truly random people's, the harder case.
    shuffled = batch.with_columns(pl.col(column).shuffle(seed=index) for index, column in enumerate(batch.columns))
    for frame in (batch, shuffled):
        analyst = suppressed(treated(frame.lazy(), PseudonymKey(KEY.encode())), 5).collect()
        kept = analyst.filter(~pl.any_horizontal(pl.col(quasi_columns()).is_null())).height
        assert kept / 5000 >= 0.5, kept
        assert_k_anonymous(analyst, quasi_columns(), 5)


def test_a_second_run_changes_no_file_and_a_relanded_batch_is_rebuilt(lake, tmp_path, cli, api):
    target = tmp_path / "analyst"
    env = fast_env(api.url, Path(lake.output_dir), Path(lake.raw_dir), RANDOM_USER_PAGE_SIZE=40, **{KEY_VARIABLE: KEY})
    first = cli("--pseudonymise", target, env=env)
    assert first.returncode == 0, first.stderr
    before = file_state(target)
    assert sorted(before) == ["pseudonymised_users_demo.parquet", "pseudonymised_users_demo2.parquet"]
    again = cli("--pseudonymise", target, env=env)
    assert again.returncode == 0, again.stderr
    assert file_state(target) == before
    assert again.stderr.count("is up to date") == 2
    # demo2 landed again since: its analyst file is rebuilt, demo's is left as it is.
    relanded = cli("--seed", "demo2", "--n", "40", env=env)
    assert relanded.returncode == 0, relanded.stderr
    third = cli("--pseudonymise", target, env=env)
    assert third.returncode == 0, third.stderr
    after = file_state(target)
    assert after["pseudonymised_users_demo.parquet"] == before["pseudonymised_users_demo.parquet"]
    assert after["pseudonymised_users_demo2.parquet"] != before["pseudonymised_users_demo2.parquet"]


def test_the_key_is_in_no_file_and_no_log_line_even_with_verbose(lake, tmp_path, cli, api):
    target, key_file = tmp_path / "analyst", tmp_path / "secret" / "key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")  # as `echo` writes it, or a Secret made from a file
    env = fast_env(api.url, Path(lake.output_dir), Path(lake.raw_dir), **{KEY_FILE_VARIABLE: key_file})
    ran = cli("-v", "--pseudonymise", target, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "built" in ran.stderr
    for text in (KEY, KEY.encode().hex(), hashlib.sha256(KEY.encode()).hexdigest()):
        assert text not in ran.stderr + ran.stdout
        for path in target.rglob("*"):
            assert text.encode() not in path.read_bytes(), path
    # The file's key is the text's key: the two give one person_key.
    by_file = set(etl.read_pseudonymised(str(target)).collect()["person_key"])
    assert by_file == {hmac_hex(KEY, user["login"]["uuid"]) for seed, n in DEMO.items() for user in served_users(seed, n, 40)}


@pytest.mark.parametrize(
    ("key_env", "says"),
    [
        ({}, "RANDOM_USER_PSEUDONYM_KEY_FILE"),
        ({KEY_VARIABLE: "x" * 31}, "at least 32"),
        ({KEY_FILE_VARIABLE: "{tmp}/no-such-key"}, "cannot be read"),
        ({KEY_VARIABLE: KEY, KEY_FILE_VARIABLE: "{tmp}/key"}, "set one"),
    ],
    ids=["missing", "short", "unreadable-file", "both"],
)
def test_a_missing_short_or_unreadable_key_is_exit_2_with_the_target_untouched(lake, tmp_path, cli, api, key_env, says):
    target = tmp_path / "analyst"
    target.mkdir()
    (target / "kept.txt").write_text("an analyst's own file")
    before = file_state(target)
    env = fast_env(api.url, Path(lake.output_dir), Path(lake.raw_dir), **{k: v.format(tmp=tmp_path) for k, v in key_env.items()})
    ran = cli("--pseudonymise", target, env=env)
    assert ran.returncode == 2, ran.stderr
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith(PREFIX) and says in line
    assert file_state(target) == before
    assert "x" * 31 not in ran.stderr


def test_an_analyst_lake_inside_the_lake_is_refused(lake, cli, api, tmp_path):
    env = fast_env(api.url, Path(lake.output_dir), Path(lake.raw_dir), **{KEY_VARIABLE: KEY})
    ran = cli("--pseudonymise", Path(lake.output_dir) / "analyst", env=env)
    assert ran.returncode == 2 and "overlaps" in ran.stderr
    assert not (Path(lake.output_dir) / "analyst").exists()


def test_a_failed_build_is_exit_1_in_one_line(tmp_path, cli, api):
    env = fast_env(api.url, tmp_path / "no-lake", tmp_path / "raw", **{KEY_VARIABLE: KEY})
    ran = cli("--pseudonymise", tmp_path / "analyst", env=env)
    assert ran.returncode == 1
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith(PREFIX) and "no-lake" in line and "Traceback" not in ran.stderr


def test_the_analyst_lake_in_object_storage_is_built_read_and_left_alone_by_a_second_run(api, settings, s3, monkeypatch):
    lake = settings(output_dir=s3.url("lake"), page_size=40)
    for seed, n in DEMO.items():
        etl.run(lake, seed=seed, n=n)
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    target = s3.url("analyst")
    built = etl.pseudonymise(target, lake)
    assert sorted(built.values()) == [True, True]
    keys = ["analyst/pseudonymised_users_demo.parquet", "analyst/pseudonymised_users_demo2.parquet"]
    assert s3.all_keys("analyst") == keys
    frame = etl.read_pseudonymised(target).collect()
    assert sorted(frame["person_key"]) == sorted(hmac_hex(KEY, u["login"]["uuid"]) for seed, n in DEMO.items() for u in served_users(seed, n, 40))
    heads = {key: (s3.head(key)["ETag"], s3.head(key)["LastModified"]) for key in keys}
    assert sorted(etl.pseudonymise(target, lake).values()) == [False, False]
    assert {key: (s3.head(key)["ETag"], s3.head(key)["LastModified"]) for key in keys} == heads
    assert s3.all_keys("analyst") == keys
    bodies = [s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read() for key in keys]
    assert not [body for body in bodies if KEY.encode() in body]
    # Uploaded, each field still carries its class.
    uploaded = pq.ParquetFile(pa.BufferReader(bodies[0]))
    classes = json.loads(uploaded.metadata.metadata[b"random_user_etl.pii"])
    assert {field.name: field.metadata[b"pii"].decode() for field in uploaded.schema_arrow} == classes


def key_env(lake, api, **env) -> dict:
    """The CLI's environment for the lake of the `lake` fixture, plus `env`."""
    return fast_env(api.url, Path(lake.output_dir), Path(lake.raw_dir), **env)


@pytest.mark.parametrize("kind", ["fifo", "folder", "huge"])
def test_a_key_file_that_is_no_small_regular_file_is_exit_2_at_once(lake, tmp_path, api, kind):
    path = tmp_path / "key"
    if kind == "fifo":
        os.mkfifo(path)  # read whole, it would hold the job for good: no one writes to it
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"k" * 10_000_000)
    ran = run_cli("--pseudonymise", tmp_path / "analyst", env=key_env(lake, api, **{KEY_FILE_VARIABLE: path}), timeout=20)
    assert ran.returncode == 2, ran.stderr
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith(PREFIX) and KEY_FILE_VARIABLE in line
    assert not (tmp_path / "analyst").exists()


def test_a_key_of_bytes_that_are_not_utf_8_is_taken_as_its_bytes(lake, tmp_path, monkeypatch):
    raw = KEY.encode() + b"\xff\xfe"  # a variable is bytes to the system: Python holds these as surrogates
    monkeypatch.setenv(KEY_VARIABLE, os.fsdecode(raw))
    etl.pseudonymise(str(tmp_path / "analyst"), lake)
    users = served_users("demo2", 40, 40)
    got = set(etl.read_pseudonymised(str(tmp_path / "analyst")).collect()["person_key"])
    assert {hmac.new(raw, user["login"]["uuid"].encode(), hashlib.sha256).hexdigest() for user in users} <= got


@pytest.mark.parametrize("key", ["x" * 31, "é" * 15 + "x"], ids=["31-ascii", "31-bytes-16-characters"])
def test_a_key_of_31_bytes_is_refused_and_one_of_32_bytes_taken(lake, tmp_path, cli, api, key):
    short = cli("--pseudonymise", tmp_path / "analyst", env=key_env(lake, api, **{KEY_VARIABLE: key}))
    assert short.returncode == 2 and "31 bytes" in short.stderr and key not in short.stderr
    taken = cli("--pseudonymise", tmp_path / "analyst", env=key_env(lake, api, **{KEY_VARIABLE: key + "y"}))
    assert taken.returncode == 0, taken.stderr


@pytest.mark.parametrize("where", ["raw", "inside-raw", "holding-raw"])
def test_an_analyst_lake_overlapping_the_raw_answers_is_refused(tmp_path, cli, api, settings, where):
    # The raw answers hold every direct identifier: analysts given the target must not reach them.
    lake = settings(output_dir=str(tmp_path / "lake"), raw_dir=str(tmp_path / "keep" / "raw"))
    etl.run(lake, seed="demo", n=40, page_size=40)
    target = {"raw": tmp_path / "keep" / "raw", "inside-raw": tmp_path / "keep" / "raw" / "analyst", "holding-raw": tmp_path / "keep"}[where]
    before = file_state(tmp_path / "keep")
    ran = cli("--pseudonymise", target, env=key_env(lake, api, **{KEY_VARIABLE: KEY}))
    assert ran.returncode == 2 and "overlaps" in ran.stderr and "--raw-dir" in ran.stderr, ran.stderr
    assert file_state(tmp_path / "keep") == before
    with pytest.raises(etl.config.SettingsError, match="overlaps"):
        etl.pseudonymise(str(target), lake)


def test_a_failed_build_leaves_no_target_behind(tmp_path, cli, api):
    env = fast_env(api.url, tmp_path / "no-lake", tmp_path / "raw", **{KEY_VARIABLE: KEY})
    ran = cli("--pseudonymise", tmp_path / "analyst", env=env)
    assert ran.returncode == 1
    assert not (tmp_path / "analyst").exists()


def test_an_unwritable_target_is_exit_1_in_one_line_naming_it(lake, tmp_path, cli, api, s3):
    for target in ("s3://no-such-bucket-here/analyst", tmp_path / "file" / "analyst"):
        (tmp_path / "file").write_text("a file where a folder would be")
        ran = cli("--pseudonymise", target, env=key_env(lake, api, **{KEY_VARIABLE: KEY}))
        assert ran.returncode == 1, ran.stderr
        (line,) = ran.stderr.strip().splitlines()
        assert line.startswith(PREFIX) and "unexpected" not in line and str(target).split("/")[-2] in line, line


quasi_rows = st.lists(
    st.tuples(st.sampled_from(["female", "male", None]), st.sampled_from([1950, 1960, 1970, None]), st.sampled_from(["GB", "NO", "TR"])),
    max_size=60,
)


@given(rows=quasi_rows, k=st.integers(2, 12))
@hypothesis_settings(max_examples=200, deadline=None)
def test_suppression_makes_any_frame_k_anonymous_dropping_no_row_and_counting_what_it_suppressed(rows, k):
    from _random_user_etl.pseudonym import quasi_columns, rare_rows, suppressed

    quasi = quasi_columns()
    assert sorted(quasi) == ["birth_decade", "gender", "nationality"]
    frame = pl.DataFrame(rows, schema={"gender": pl.String, "birth_decade": pl.Int32, "nationality": pl.String}, orient="row")
    frame = frame.with_row_index("row").select("row", *quasi)
    out = suppressed(frame.lazy(), k).collect()
    assert out["row"].to_list() == frame["row"].to_list()
    assert_k_anonymous(out, quasi, k)
    # A row keeps its values exactly when at least k rows share them; the rest lose all of them, and are counted.
    sizes = frame.group_by(quasi).len()
    expected = frame.join(sizes, on=quasi, how="left", nulls_equal=True)
    kept = expected.filter(pl.col("len") >= k).sort("row")
    assert out.filter(pl.col("row").is_in(kept["row"].to_list())).equals(kept.select(out.columns))
    gone = out.filter(~pl.col("row").is_in(kept["row"].to_list()))
    assert gone.select(pl.col(quasi).is_null().all()).row(0) == (True,) * 3
    assert rare_rows(frame.lazy(), k) == gone.height


HELD_AFTER_THE_FIRST_FILE = """
import logging, os, sys, time
import random_user_etl as etl
release = sys.argv[1]

class Hold(logging.Filter):
    def filter(self, record):
        if record.getMessage().startswith("analyst file") and not os.path.exists(release + ".held"):
            open(release + ".held", "w").close()
            while not os.path.exists(release):
                time.sleep(0.002)
        return True

logging.getLogger("random_user_etl").addFilter(Hold())
etl.exit_now(etl.main(sys.argv[2:]))
"""


def test_a_stop_between_analyst_files_is_143_with_a_line_of_its_own_and_leaves_no_half_file(lake, tmp_path, api):
    from support import delivered, signalled_exit, start_cli, wait_until

    target, release, err = tmp_path / "analyst", tmp_path / "release", tmp_path / "stderr.txt"
    proc = start_cli("--pseudonymise", target, env=key_env(lake, api, **{KEY_VARIABLE: KEY}), log=err, via=(HELD_AFTER_THE_FIRST_FILE, release))
    try:
        wait_until(lambda: Path(f"{release}.held").exists() or proc.poll() is not None, what="the first analyst file built")
        assert proc.poll() is None, err.read_text()
        code, _ = signalled_exit(proc, signal.SIGTERM, lambda: (wait_until(lambda: delivered(proc.pid, signal.SIGTERM)), release.touch()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert code == 143 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "random_user_etl.py: stopped by SIGTERM; the analyst files built so far are kept and the next run builds the rest"
    assert sorted(path.name for path in target.iterdir()) == ["pseudonymised_users_demo.parquet"]


# ---------------------------------------------------------------- a lake landed as a Delta table

DELTA_DEMO = {"kbig": (5000, 5000), "demo2": (40, 40)}  # seed: (n, page size); kbig has rows that survive k = 5
DIRECT_FIELDS = ("name.first", "name.last", "email", "login.username", "phone", "cell", "location.street.name", "location.city", "id.value")


def raw_field(user: dict, dotted: str):
    """A raw user's value at a dotted path of its JSON (None where it has none)."""
    for part in dotted.split("."):
        user = user.get(part) if isinstance(user, dict) else None
    return user


@pytest.fixture
def delta_lake(settings, monkeypatch):
    """A lake landed as one Delta table (seeds kbig and demo2) from the fake, the key set; the delta settings it was landed with."""
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    for seed, (n, page_size) in DELTA_DEMO.items():
        etl.run(settings(table_format="delta", seed=seed, n=n, page_size=page_size))
    return settings(table_format="delta")


def assert_analyst_rows(frame: pl.DataFrame, seed: str, quasi: list[str]) -> None:
    """A seed's analyst rows: the stdlib HMAC of every user the fake served it, no raw direct value in any cell, k = 5 on the quasi columns."""
    served = served_users(seed, *DELTA_DEMO[seed])
    assert sorted(frame["person_key"]) == sorted(hmac_hex(KEY, user["login"]["uuid"]) for user in served)
    direct = {str(raw_field(user, field)) for user in served for field in DIRECT_FIELDS if raw_field(user, field) not in (None, "")}
    direct |= {user["login"]["uuid"] for user in served}
    cells = {str(value) for column in frame.columns for value in frame[column].drop_nulls()}
    assert not cells & direct, seed
    assert_k_anonymous(frame, quasi, 5)
    if seed == "kbig":
        assert frame.filter(~pl.any_horizontal(pl.col(quasi).is_null())).height >= 2500


def test_a_delta_lake_is_pseudonymised_to_one_analyst_file_per_seed(delta_lake, tmp_path):
    target = tmp_path / "analyst"
    etl.pseudonymise(str(target), delta_lake, table_format="files")
    files = analyst_files(target)
    assert sorted(files) == ["pseudonymised_users_demo2.parquet", "pseudonymised_users_kbig.parquet"]
    for seed in DELTA_DEMO:
        assert_analyst_rows(files[f"pseudonymised_users_{seed}.parquet"], seed, quasi_of(target / f"pseudonymised_users_{seed}.parquet"))
    assert etl.read_pseudonymised(str(target)).select(pl.len()).collect().item() == 5040


def analyst_table(target: Path):
    """The analyst lake's Delta table as deltalake opens it."""
    from deltalake import DeltaTable

    return DeltaTable(str(target / "pseudonymised_users"))


def seed_commits(target: Path) -> list[str]:
    """The seed of each commit of the analyst table after its creation, oldest first."""
    history = sorted(analyst_table(target).history(), key=lambda commit: commit["version"])
    assert history[0]["operation"] == "CREATE TABLE"
    return [commit.get("random_user_etl.seed") for commit in history[1:]]


def test_with_table_format_delta_the_analyst_lake_is_a_delta_table_of_one_commit_per_seed(delta_lake, tmp_path):
    target = tmp_path / "analyst"
    etl.pseudonymise(str(target), delta_lake)
    assert not list(target.glob("pseudonymised_users_*.parquet"))
    assert sorted(seed_commits(target)) == sorted(DELTA_DEMO)
    fields = {field.name: field.metadata.get("pii") for field in analyst_table(target).schema().fields}
    from _random_user_etl.pseudonym import analyst_classes

    assert fields == analyst_classes() and fields["person_key"] == DIRECT
    quasi = [name for name, kind in fields.items() if kind == QUASI]
    rows = pl.scan_delta(str(target / "pseudonymised_users")).collect()  # deltalake's reading, not the job's
    for seed in DELTA_DEMO:
        assert_analyst_rows(rows.filter(pl.col("seed") == seed), seed, quasi)
    lazy = etl.read_pseudonymised(str(target))
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.select(pl.len()).collect().item() == 5040


def test_the_analyst_table_is_built_with_the_stop_of_a_run_that_failed(delta_lake, settings, api, tmp_path):
    # A caller may keep one Stop for its jobs one after another: a run's failure winds it down, and
    # that wind-down is the run's alone (Run.land begins it again), not the next job's.
    stop = etl.Stop()
    api.script(*[status(503)] * 4)  # the first try and all three retries
    with pytest.raises(etl.EtlError):
        etl.run(settings(table_format="delta", seed="gamma", n=5, page_size=5), stop)
    target = tmp_path / "analyst"
    built = etl.pseudonymise(str(target), delta_lake, stop)
    assert len(built) == 2 and all(built.values())
    assert sorted(seed_commits(target)) == sorted(DELTA_DEMO)


@pytest.mark.parametrize("table_format", ["files", "delta"])
def test_a_second_run_over_a_delta_lake_changes_nothing_and_a_relanded_seed_is_rebuilt(delta_lake, settings, tmp_path, table_format):
    target = tmp_path / "analyst"
    etl.pseudonymise(str(target), delta_lake, table_format=table_format)
    before = file_state(target)
    again = etl.pseudonymise(str(target), delta_lake, table_format=table_format)
    assert not any(again.values()) and len(again) == 2
    assert file_state(target) == before
    etl.run(settings(table_format="delta", seed="demo2", n=40, page_size=40))
    third = etl.pseudonymise(str(target), delta_lake, table_format=table_format)
    assert sorted(where for where, built in third.items() if built) == [where for where in third if "demo2" in where]
    after = etl.read_pseudonymised(str(target)).collect()
    landed = etl.read_processed(delta_lake.output_dir).filter(pl.col("seed") == "demo2").collect()
    assert sorted(after.filter(pl.col("seed") == "demo2")["ingested_at"].unique()) == sorted(landed["ingested_at"].unique())
    if table_format == "delta":
        assert seed_commits(target)[2:] == ["demo2"]
    else:
        assert after["seed"].value_counts().sort("seed")["count"].to_list() == [40, 5000]
        changed = {name for name in file_state(target) if file_state(target)[name] != before.get(name)}
        assert changed == {"pseudonymised_users_demo2.parquet"}


def test_a_delta_lake_in_object_storage_is_pseudonymised_into_an_analyst_table_there(api, s3, tmp_path):
    # Through the CLI, in processes of their own: some of deltalake's calls hold the GIL while they
    # wait on the store, and this process serves the store (moto) on a thread.
    target = s3.url("analyst")
    env = fast_env(api.url, s3.url("lake"), tmp_path / "raw", RANDOM_USER_TABLE_FORMAT="delta", RANDOM_USER_PAGE_SIZE=40, **{KEY_VARIABLE: KEY})
    for seed, n in DEMO.items():
        landed = run_cli("--seed", seed, "--n", str(n), env=env)
        assert landed.returncode == 0, landed.stderr
    for _ in range(2):  # the second changes nothing
        ran = run_cli("--pseudonymise", target, env=env)
        assert ran.returncode == 0, ran.stderr
    keys = [key for key in s3.all_keys("analyst") if key != "analyst/.random_user_etl-write-check"]
    assert keys and all(key.startswith("analyst/pseudonymised_users/") for key in keys), keys
    versions = s3.delta_log("analyst/pseudonymised_users")
    commits = [next(action["commitInfo"] for action in actions if "commitInfo" in action) for actions in versions[1:]]
    assert sorted(commit.get("random_user_etl.seed") for commit in commits) == sorted(DEMO)  # one commit each, none from the second run
    files = [action["add"]["path"] for actions in versions for action in actions if "add" in action]
    bodies = [s3.client.get_object(Bucket=s3.name, Key=f"analyst/pseudonymised_users/{path}")["Body"].read() for path in files]
    rows = pl.concat([pl.read_parquet(body) for body in bodies])  # the table's files as any parquet reader reads them
    served = [u for seed, n in DEMO.items() for u in served_users(seed, n, 40)]
    assert sorted(rows["person_key"]) == sorted(hmac_hex(KEY, u["login"]["uuid"]) for u in served)
    assert not [key for key in s3.all_keys("") if ".tmp" in key], "nothing left behind"
