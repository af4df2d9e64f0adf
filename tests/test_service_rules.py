"""The service's remaining rules (issue 13): 18-character seeds, one person in two batches, names
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
from conftest import assert_one_error_line, assert_rows_are, fast_env, served_users

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
        with pytest.raises(SettingsError, match=r"--seed .*daily-etl-%s" % today.strftime("%Y%m%d")):
            load_settings({"seed": "daily-etl-{date}"}, environ={}, today=today)
    assert load_settings({"seed": "daily-{date}"}, environ={}, today=dt.date(2026, 11, 30)).seed == "daily-20261130"


def test_the_cli_refuses_an_18_character_seed_before_any_request(api, out, raw, cli):
    done = cli("--seed", "daily-etl-{date}", env=fast_env(api.url, out, raw))
    assert done.returncode == 2, done.stderr
    line = assert_one_error_line(done.stderr, r"--seed .*18 characters.*longer or shorter")
    assert re.search(r"daily-etl-\d{8}", line)
    assert api.requests == [] and not out.exists()
