"""Trust at landing: staged pages belong to the request that made them, a refused batch does not
poison its seed, a user served twice lands once, a picked seed never replaces a batch, and landing
memory does not grow with the number of pages."""

from __future__ import annotations

import json
import uuid

import polars as pl
import pytest
from support import assert_null_counts, assert_one_error_line, assert_rows_are, batch_files, digests, fast_env, landed, run_cli, served_users, users
from fake_api import PICKED_SEED, FakeRandomUser, mutate, normal, page_body, rate_limited

import random_user_etl as etl
from _random_user_etl import staging
from random_user_config import Settings

PAGED = dict(seed="paged", n=30, page_size=10, concurrency=1)


def other_people(results):
    """Every user of the page made someone else: a new id and first name."""
    for user in results:
        user["login"]["uuid"] = str(uuid.uuid4())
        user["name"]["first"] = "Staged"


def stage_two_pages_and_fail(fake: FakeRandomUser, settings, api_url: str) -> None:
    """A run of PAGED against `api_url` that stages pages 1 and 2 (other people than the fake's) and fails on page 3."""
    fake.script(mutate(users(other_people)), mutate(users(other_people)), *[rate_limited()] * 20)
    with pytest.raises(etl.EtlError, match="page 3"):
        etl.run(settings(api_url=api_url, retries=0, max_wait=0.2, **PAGED))
    fake.clear()


def asked_pages(fake: FakeRandomUser) -> list[int]:
    """The pages a fake was asked for, sorted."""
    return sorted(int(r.params["page"]) for r in fake.requests)


# ------------------------------------------------------------------ a staged page's identity


def test_pages_staged_from_another_server_are_fetched_again(api, settings):
    with FakeRandomUser() as test_server:
        stage_two_pages_and_fail(test_server, settings, test_server.url)
    batch = etl.run(settings(**PAGED))  # the same seed, against the production fake
    assert asked_pages(api) == [1, 2, 3], "no page staged from another address stands in for this one's"
    assert_rows_are(pl.read_parquet(batch.path), served_users("paged", 30, 10))


def test_pages_staged_from_another_api_path_are_fetched_again(api, settings):
    # The fake serves /api/ as well as /api/1.4/: the address's path holds the API version.
    stage_two_pages_and_fail(api, settings, api.url.replace("/api/1.4/", "/api/"))
    batch = etl.run(settings(**PAGED))
    assert asked_pages(api) == [1, 2, 3]
    assert {r.path for r in api.requests} == {"/api/1.4/"}
    assert_rows_are(pl.read_parquet(batch.path), served_users("paged", 30, 10))


def test_a_part_never_holds_the_credentials_of_its_address(api, out, settings):
    secret = "s3cret-pass"
    with_password = api.url.replace("http://", f"http://reader:{secret}@")
    stage_two_pages_and_fail(api, settings, with_password)
    parts = sorted((out / ".staging" / "paged").glob("part-*.parquet"))
    assert len(parts) == 2
    for part in parts:
        assert secret.encode() not in part.read_bytes() and b"reader" not in part.read_bytes()
    etl.run(settings(api_url=with_password, **PAGED))
    assert asked_pages(api) == [3], "the same address, credentials and all, resumes its own pages"


# ------------------------------------------------------------------ a user served twice


def page_1s_users(count: int):
    """A mutate fn that puts page 1's first `count` users (as served) in place of the page's first `count`."""

    def fn(doc):
        doc["results"][:count] = json.loads(page_body("paged", 1, 10))["results"][:count]
        return doc

    return fn


def test_a_refused_batch_drops_the_pages_involved_and_the_next_run_fetches_them_again(api, out, raw, cli):
    def someone_else_with_page_1s_first_id(doc):
        doc["results"][4]["login"]["uuid"] = served_users("paged", 30, 10)[0]["login"]["uuid"]
        return doc

    args = ("--seed", "paged", "--n", 30, "--page-size", 10, "--concurrency", 1)
    api.script(normal(), mutate(someone_else_with_page_1s_first_id))
    first = cli(*args, env=fast_env(api.url, out, raw))
    assert first.returncode == 1
    assert_one_error_line(first.stderr, r"login\.uuid repeats across pages 1 and 2 with different records \(1 id\); those pages are dropped from staging")
    assert batch_files(out) == []
    staged = sorted(p.name for p in (out / ".staging" / "paged").glob("part-*.parquet"))
    assert staged == ["part-00003.parquet"], "the pages involved are dropped from staging"
    api.clear()
    again = cli(*args, env=fast_env(api.url, out, raw))
    assert again.returncode == 0, again.stderr
    assert sorted(int(r.params["page"]) for r in api.requests) == [1, 2]
    assert_rows_are(pl.read_parquet(out / "random_users_paged.parquet"), served_users("paged", 30, 10))


def test_pages_served_by_another_api_version_are_refused_and_fetched_again(api, out, raw, cli):
    # An address without a version (/api/) is answered by whatever version the service runs: a batch
    # that met a new one halfway would mix two contracts under one seed.
    args = ("--seed", "paged", "--n", 30, "--page-size", 10, "--concurrency", 1)
    api.script(normal(), mutate(lambda doc: {**doc, "info": {**doc["info"], "version": "1.5"}}))
    first = cli(*args, env=fast_env(api.url, out, raw))
    assert first.returncode == 1
    assert_one_error_line(first.stderr, r"page 2 was served by API version 1\.5, the others by 1\.4; it is dropped from staging")
    assert batch_files(out) == []
    api.clear()
    again = cli(*args, env=fast_env(api.url, out, raw))
    assert again.returncode == 0, again.stderr
    assert [int(r.params["page"]) for r in api.requests] == [2]
    assert_rows_are(pl.read_parquet(out / "random_users_paged.parquet"), served_users("paged", 30, 10))


@pytest.mark.parametrize("count", [10, 4], ids=["whole-page", "part-of-a-page"])
def test_a_user_served_twice_identically_lands_once_from_the_first_page(api, settings, count):
    api.script(normal(), mutate(page_1s_users(count)))  # page 2 holds `count` of page 1's people, as served
    batch = etl.run(settings(**PAGED))
    served = [json.loads(body)["results"] for body in api.sent]
    assert served[1][:count] == served[0][:count], "the same people were served twice"
    landed = pl.read_parquet(batch.path)
    once = served[0] + served[1][count:] + served[2]
    assert_rows_are(landed, once)
    assert batch.rows == 30 - count and batch.report["rows"] == batch.report["unique_user_ids"] == 30 - count
    assert batch.report["duplicate_users_dropped"] == count
    repeated = {u["login"]["uuid"] for u in served[0][:count]}
    assert set(landed.filter(pl.col("user_id").is_in(repeated))["page"]) == {1}, "the first page's copy is kept"
    assert_null_counts(batch.report, once)


def test_one_id_with_two_different_records_is_still_refused(api, out, settings):
    def two_served_again_one_renamed(doc):
        page_1s_users(3)(doc)
        doc["results"][0]["name"]["first"] = "Different"  # the same id, someone else's record
        return doc

    api.script(normal(), mutate(two_served_again_one_renamed))
    with pytest.raises(etl.EtlError, match=r"^login\.uuid repeats across pages 1 and 2 with different records \(1 id\)"):
        etl.run(settings(**PAGED))
    assert batch_files(out) == []


# ------------------------------------------------------------------ a seed the service picks


def test_a_picked_seed_whose_batch_has_landed_is_refused_and_nothing_is_touched(api, out, raw, cli):
    api.picks = PICKED_SEED  # the service picks the seed that has landed
    env = fast_env(api.url, out, raw)
    assert cli("--seed", PICKED_SEED, "--n", 5, env=env).returncode == 0
    before_out, before_raw = digests(landed(out)), digests(landed(raw))
    api.clear()
    result = cli("--n", 5, env=env)  # no --seed: the service picks the seed that has landed
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"a batch of seed {PICKED_SEED} is already at .*random_users_{PICKED_SEED}\.parquet: the service picked it")
    assert len(api.requests) == 1, "only page 1 was asked for, which is how the seed was picked"
    assert digests(landed(out)) == before_out and digests(landed(raw)) == before_raw


def test_a_picked_seed_whose_object_has_landed_is_refused_and_the_object_kept(api, raw, s3, cli, tmp_path):
    api.picks = PICKED_SEED  # the service picks the seed that has landed
    env = fast_env(api.url, s3.url(), raw)
    assert cli("--seed", PICKED_SEED, "--n", 5, env=env).returncode == 0
    key = f"lake/random_users_{PICKED_SEED}.parquet"
    before, before_raw = s3.head(key)["ETag"], digests(landed(raw))
    result = cli("--n", 5, env=env)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"a batch of seed {PICKED_SEED} is already at s3://{s3.name}/{key}: the service picked it")
    assert s3.keys() == [key] and s3.head(key)["ETag"] == before and digests(landed(raw)) == before_raw


def test_a_picked_seed_with_no_batch_lands(api, out, raw, cli):
    api.picks = PICKED_SEED  # the service picks the seed that has landed
    result = cli("--n", 5, env=fast_env(api.url, out, raw))
    assert result.returncode == 0, result.stderr
    assert batch_files(out) == [f"random_users_{PICKED_SEED}.parquet"]


def test_a_picked_seed_is_refused_when_the_store_cannot_tell_what_is_at_its_key(api, raw, s3, cli):
    api.picks = PICKED_SEED  # the service picks the seed that has landed
    key = f"lake/random_users_{PICKED_SEED}.parquet"
    s3.client.put_object(Bucket=s3.name, Key=key, Body=b"not a batch")
    result = cli("--n", 5, env=fast_env(api.url, s3.url(), raw))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, rf"cannot tell whether a batch is at s3://{s3.name}/{key}: ")
    assert s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read() == b"not a batch"


# ------------------------------------------------------------------ many tiny pages


def stage_tiny_pages(api, out, pages: int, size: int) -> list[dict]:
    """Stage `pages` pages of `size` users of seed "many", as a stopped run against `api` left them; their raw users."""
    # Typed 1,000 users at a time (answers of the fake's pages 1, 2, ...), then cut into pages: fast.
    bodies = [page_body("many", chunk, 1000) for chunk in range(1, pages * size // 1000 + 1)]
    served = [user for body in bodies for user in json.loads(body)["results"]]
    frame = pl.concat([etl.transform(body) for body in bodies])
    run = Settings(api_url=api.url, output_dir=str(out), seed="many", n=pages * size, page_size=size)
    folder = staging.own_staging_root(str(out)) / "many"
    folder.mkdir(0o700)
    for page in range(1, pages + 1):
        part = frame.slice((page - 1) * size, size).with_columns(page=pl.lit(page, pl.Int32))
        staging.stage_part(folder, part, staging.part_identity(run, "many", page, size))
    return served


@pytest.mark.parametrize("size", [1, 3], ids=["one-key-range", "two-key-ranges"])
def test_landing_many_tiny_pages_takes_no_more_memory_than_their_rows_need(api, out, raw, size):
    # 4,000 staged pages: each file Polars opens at once costs it some 40 kB, whatever its rows.
    served = stage_tiny_pages(api, out, 4000, size)
    proc = run_cli("--seed", "many", "--n", str(4000 * size), "--page-size", str(size), env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    assert proc.returncode == 0, stderr
    assert api.requests == [], "every page was staged: the run only lands"
    assert_rows_are(pl.read_parquet(out / "random_users_many.parquet"), served)
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"


# ------------------------------------------------------------------ when a batch landed


def test_ingested_at_is_when_the_batch_landed_not_when_the_run_started(settings):
    import datetime as dt
    import time

    with FakeRandomUser(latency=0.2) as slow:  # each page takes a while, as under the service's rate limit
        wall_minus_monotonic = time.time() - time.monotonic()
        batch = etl.run(settings(api_url=slow.url, seed="pura", n=3, page_size=1, concurrency=1))
        last_asked = max(r.at for r in slow.requests) + wall_minus_monotonic
    stamps = pl.read_parquet(batch.path)["ingested_at"].unique().to_list()
    assert len(stamps) == 1, "one batch, one landing time"
    # Causal, not a timing bound: the batch cannot have landed before its last page was asked for.
    assert stamps[0] >= dt.datetime.fromtimestamp(last_asked, dt.UTC), (stamps[0], last_asked)
