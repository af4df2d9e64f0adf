"""The service's own rules: 18-character seeds, one person in two batches, names
that do not resolve, and the gender filter the job never sends.

Every case drives the real job against the loopback fake (`fake_api.py`), which models the
generator's seed rules; values are checked against the fake's answers read by the standard library.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import polars as pl
import pytest
from support import assert_one_error_line, batch_files, assert_rows_are, fast_env, served_users

import random_user_etl as etl
from random_user_config import Settings, SettingsError, load_settings
from schemas import OUTPUT_SCHEMA

RETRY_LINE = re.compile(r"\S+ \S+ WARNING retry (\d+) of (\d+) for ")


# ---------------------------------------------------------------- 18-character seeds


@pytest.mark.parametrize("seed", ["a" * 18, "daily-etl-20261130"])
def test_a_seed_of_18_characters_is_refused(seed):
    with pytest.raises(SettingsError, match=r"--seed .*18 characters.*nationality.*longer or shorter") as refused:
        Settings(seed=seed)
    assert seed in str(refused.value)


@pytest.mark.parametrize("seed", ["a" * 17, "a" * 19, "a" * 16])
def test_seeds_of_other_lengths_are_kept(seed):
    assert Settings(seed=seed).seed == seed


def test_a_dated_seed_is_refused_when_the_date_makes_it_18_characters():
    # 'daily-etl-{date}' is 16 characters as typed and 18 once the date is in: refused every day.
    for today in (dt.date(2026, 11, 30), dt.date(2027, 1, 1)):
        with pytest.raises(SettingsError, match=rf"--seed .*daily-etl-{today:%Y%m%d}"):
            load_settings({"seed": "daily-etl-{date}"}, environ={}, today=today)
    assert load_settings({"seed": "daily-{date}"}, environ={}, today=dt.date(2026, 11, 30)).seed == "daily-20261130"


def test_the_cli_refuses_an_18_character_seed_before_any_request(api, out, raw, cli):
    done = cli("--seed", "daily-etl-{date}", env=fast_env(api.url, out, raw))
    assert done.returncode == 2, done.stderr
    line = assert_one_error_line(done.stderr, r"--seed .*18 characters.*longer or shorter")
    assert re.search(r"daily-etl-\d{8}", line)
    assert api.requests == [] and not out.exists()


# ---------------------------------------------------------------- one person in two batches


def land_repeated_batch(settings, **where) -> None:
    """Land seed 'demo' (two pages of 10) and then 'demo2' (one page of 10): demo's page 2 is demo2's page 1."""
    etl.run(settings(seed="demo", n=20, page_size=10, **where))
    etl.run(settings(seed="demo2", n=10, page_size=10, **where))


def test_two_batches_can_hold_the_same_people(api, settings, out):
    land_repeated_batch(settings)
    lake = etl.read_processed(str(out)).collect()
    assert lake.height == 30 and lake["user_id"].n_unique() == 20


def test_unique_users_gives_each_user_once_the_most_recently_ingested(api, settings, out, monkeypatch):
    land_repeated_batch(settings)
    with monkeypatch.context() as patched:  # lazily: nothing is read until the caller collects
        patched.setattr(pl.LazyFrame, "collect", lambda *a, **k: pytest.fail("read_processed collected"))
        lazy = etl.read_processed(str(out), unique_users=True)
    assert isinstance(lazy, pl.LazyFrame) and lazy.collect_schema() == OUTPUT_SCHEMA
    frame = lazy.collect()
    demo, demo2 = served_users("demo", 20, 10), served_users("demo2", 10, 10)
    assert {u["login"]["uuid"] for u in demo[10:]} == {u["login"]["uuid"] for u in demo2}  # the fake's rule, from its JSON
    assert_rows_are(frame, demo)  # each user once, with the raw values
    # The repeated people come from the later batch, demo2; the others from demo's page 1.
    assert frame.group_by("seed", "page").len().sort("seed").rows() == [("demo", 1, 10), ("demo2", 1, 10)]
    # Land demo again: now its page 2 is the most recent reading of those people.
    etl.run(settings(seed="demo", n=20, page_size=10))
    again = etl.read_processed(str(out), unique_users=True).collect()
    assert_rows_are(again, demo)
    assert again.group_by("seed", "page").len().sort("page").rows() == [("demo", 1, 10), ("demo", 2, 10)]


def test_unique_users_breaks_a_tie_in_ingested_at_by_seed_then_page(api, settings, out, tmp_path):
    land_repeated_batch(settings)
    # The same instant on both batches, and demo2's file read first (the lake is read in name
    # order, which alone would let demo's rows win): the larger seed wins.
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for name, renamed in (("random_users_demo.parquet", None), ("random_users_demo2.parquet", "random_users_0.parquet")):
        path = out / name
        pl.read_parquet(path).with_columns(ingested_at=pl.lit(when, OUTPUT_SCHEMA["ingested_at"])).write_parquet(out / (renamed or name))
        if renamed:
            path.unlink()
    frame = etl.read_processed(str(out), unique_users=True).collect()
    assert frame.height == 20
    assert frame.group_by("seed", "page").len().sort("seed").rows() == [("demo", 1, 10), ("demo2", 1, 10)]


def test_unique_users_of_an_empty_lake_is_empty_with_the_schema(tmp_path):
    frame = etl.read_processed(str(tmp_path), unique_users=True)
    assert frame.collect_schema() == OUTPUT_SCHEMA and frame.collect().height == 0


def test_unique_users_reads_object_storage_too(api, settings, s3):
    land_repeated_batch(settings, output_dir=s3.url())
    frame = etl.read_processed(s3.url(), unique_users=True).collect()
    assert_rows_are(frame, served_users("demo", 20, 10))
    assert frame.group_by("seed").len().sort("seed").rows() == [("demo", 10), ("demo2", 10)]


# ---------------------------------------------------------------- names that do not resolve


def test_a_name_that_does_not_resolve_is_retried_once_then_the_run_stops(out, raw, cli):
    url = "http://random-user.invalid/api/1.4/"  # RFC 6761: .invalid never resolves, so no internet is needed
    started = time.monotonic()
    done = cli("--seed", "demo", "--allow-http", "--retries", "5", "--backoff", "0.01", env=fast_env(url, out, raw))
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert_one_error_line(done.stderr, r"^random_user_etl\.py: error: page 1: cannot resolve random-user\.invalid: ")
    assert [m.groups() for m in map(RETRY_LINE.match, done.stderr.splitlines()) if m] == [("1", "1")]
    assert elapsed < 20  # a CLI start is a few seconds at most on a busy machine; five backoffs are not waited
    assert batch_files(out) == [] and not any(raw.rglob("*.gz"))


# ---------------------------------------------------------------- gender


def test_gender_is_not_a_setting_and_never_sent(api, settings, cli, out, raw):
    etl.run(settings(seed="demo", n=20, page_size=10))
    etl.run(settings(n=10))  # the first page without a seed too
    assert api.requests and all("gender" not in r.params for r in api.requests)
    assert not hasattr(Settings(), "gender")
    done = cli("--gender", "female", env=fast_env(api.url, out, raw))
    assert done.returncode == 2 and "--gender" in done.stderr
