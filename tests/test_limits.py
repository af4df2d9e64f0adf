"""Issue 11, memory and settings: every number has a range, every path is clean text, memory is bounded.

Ranges and texts are checked in-process through load_settings and Settings (Python callers get the
same refusals), and once per kind of refusal through the CLI. Peak memory is measured on the job in
its own process, fed by the fake over loopback.
"""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from conftest import assert_one_error_line, batch_files, fast_env, run_cli
from fake_api import mutate, status
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from test_hostile import run_measured
from urllib3.exceptions import ProtocolError

import random_user_etl as etl
from random_user_config import SETTINGS, Settings, SettingsError, load_settings

LARGEST_N = 5000 * 10_000  # 10,000 pages of the default 5,000 users

# name: (lowest accepted, highest accepted, just below, just above); timeout and the size bound take any value above 0.
ABOVE_ZERO = ("timeout", "max_response_mb")
RANGES = {
    "n": (1, LARGEST_N, 0, LARGEST_N + 1),
    "page_size": (1, 5000, 0, 5001),
    "concurrency": (1, 64, 0, 65),
    "retries": (0, 100, -1, 101),
    "timeout": (1e-6, 3600, 0, 3600.001),
    "backoff": (0, 100, -0.001, 100.001),
    "rate_limit_wait": (0, 3600, -0.001, 3600.001),
    "max_response_mb": (1e-6, 1000, 0, 1000.001),
}
# The values that crashed the job before they had a range, and a rate-limit pause of 3e300 years.
CRASHED = {"timeout": "1e10", "backoff": "1e308", "max_response_mb": "1e20", "retries": "1000", "rate_limit_wait": "1e308"}

FLAG = {s.name: s.flag for s in SETTINGS}
ENV = {s.name: s.env for s in SETTINGS}


def load(name: str, text: str) -> Settings:
    """Settings from one flag's text, with no environment."""
    return load_settings({name: text}, environ={})


# ------------------------------------------------------------------ memory

FAT_BYTES = 40_000_000


def fat_first_name(doc):
    """The first user's name.first made 40 MB long: a page far under the 64 MB bound, all in one field."""
    doc["results"][0]["name"]["first"] = "a" * FAT_BYTES
    return doc


def test_four_answers_each_with_a_40_mb_name_stay_within_the_pods_memory(api, out, raw):
    # Four pages in flight at the default concurrency (4) and size bound (64 MB); the CronJob's limit is 1 GiB.
    api.script(*[mutate(fat_first_name)] * 4)
    proc, peak_mb, stderr = run_measured(api, out, raw, "--seed", "fat", "--n", "40", "--page-size", "10", "--timeout", "30")
    assert [r.answer for r in api.requests] == ["mutate"] * 4
    assert max(len(body) for body in api.sent) > FAT_BYTES  # the 40 MB names did cross the wire
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == 1, stderr
    assert_one_error_line(stderr, r"page [1-4]: 1 contract check\(s\) failed: name\.first is longer than 1,000 bytes in 1 records$")
    assert batch_files(out) == []


LONGEST = "\u00e9" * 500  # 1,000 bytes of UTF-8, 500 characters


@pytest.mark.parametrize("path", ["name.first", "location.timezone.description"])
def test_a_field_of_1000_bytes_lands_as_sent(api, settings, path):
    head, *rest = path.split(".")

    def longest(doc):
        target = doc["results"][3][head]
        for key in rest[:-1]:
            target = target[key]
        target[rest[-1]] = LONGEST
        return doc

    api.script(mutate(longest))
    batch = etl.run(settings(seed="pura"))
    sent = json.loads(api.sent[0])["results"][3]
    frame = pl.read_parquet(batch.path).filter(pl.col("user_id") == sent["login"]["uuid"])
    column = {"name.first": "first_name", "location.timezone.description": "timezone_description"}[path]
    assert frame[column].to_list() == [LONGEST]
    assert len(LONGEST.encode()) == 1000


def test_a_field_of_1001_bytes_is_refused_naming_the_field(api, out, settings):
    api.script(mutate(lambda doc: doc["results"][7]["location"]["street"].update(name=LONGEST + "x")))
    with pytest.raises(etl.EtlError, match=r"^page 1: 1 contract check\(s\) failed: location\.street\.name is longer than 1,000 bytes in 1 records$"):
        etl.run(settings(seed="pura", retries=0))
    assert batch_files(out) == []
