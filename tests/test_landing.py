"""Trust at landing: staged pages belong to the request that made them, a refused batch does not
poison its seed, a user served twice lands once, a picked seed never replaces a batch, and landing
memory does not grow with the number of pages."""

from __future__ import annotations

import uuid

import polars as pl
import pytest
from conftest import assert_rows_are, served_users, users
from fake_api import FakeRandomUser, mutate, rate_limited

import random_user_etl as etl

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
