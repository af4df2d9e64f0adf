"""The kept raw answers: a run that does not land keeps the answers behind the landed batch; stale pages go
once a smaller batch lands; a seed's raw folder is made with its first answer; kept answers are closed to others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import polars as pl
import pytest
from support import PAGED, assert_rows_are, batch_files, landed, raw_users
from fake_api import mutate, normal, status

import random_user_etl as etl


def replay_into(fresh: Path, raw: Path) -> pl.DataFrame:
    """Replay the kept answers of seed "paged" into a fresh folder and read what landed."""
    batch = etl.replay(raw / "paged", output_dir=str(fresh), raw_dir=None)
    return pl.read_parquet(batch.path)


def kept_pages(raw: Path) -> dict[str, bytes]:
    """The kept pages replay reads (page-NNNNN.json.gz), with their bytes."""
    return {name: data for name, data in landed(raw).items() if "/page-" in name}


def test_a_failed_rerun_with_a_smaller_n_keeps_the_kept_pages_of_the_landed_batch(api, out, raw, settings, tmp_path):
    etl.run(settings(seed="paged", n=120, page_size=40))
    kept = landed(raw)
    api.script(normal(), status(500))  # page 1 answers, page 2 fails: the rerun does not land
    with pytest.raises(etl.EtlError, match="HTTP 500"):
        etl.run(settings(seed="paged", n=80, page_size=40, retries=0, concurrency=1))
    assert kept_pages(raw) == kept
    assert_rows_are(replay_into(tmp_path / "fresh", raw), raw_users(*PAGED))


def test_a_rerun_that_fails_at_landing_does_not_replace_the_kept_pages_of_the_landed_batch(api, out, raw, settings, tmp_path):
    etl.run(settings(seed="paged", n=120, page_size=40))
    kept = landed(raw)
    first_id = raw_users(PAGED[0])[0]["login"]["uuid"]

    def repeat_page_1s_user(doc):
        doc["results"][0]["login"]["uuid"] = first_id

    # Page 3 of this rerun holds 20 users, not 40: accepted alone, refused at landing (a repeated id).
    api.script(normal(), normal(), mutate(repeat_page_1s_user))
    with pytest.raises(etl.EtlError, match="repeats across pages"):
        etl.run(settings(seed="paged", n=100, page_size=40, concurrency=1))
    assert kept_pages(raw) == kept
    assert_rows_are(replay_into(tmp_path / "fresh", raw), raw_users(*PAGED))


def test_stale_pages_are_pruned_once_the_smaller_batch_has_landed(api, out, raw, settings, tmp_path):
    etl.run(settings(seed="paged", n=120, page_size=40))
    etl.run(settings(seed="paged", n=80, page_size=40))
    assert sorted(landed(raw)) == ["paged/page-00001.json.gz", "paged/page-00002.json.gz"]
    assert_rows_are(replay_into(tmp_path / "fresh", raw), raw_users(*PAGED[:2]))


def test_a_folder_at_a_kept_answers_name_is_named_not_the_output_folder(api, out, raw, settings):
    planted = raw / "pura" / "accepted-page-00001.json.gz"
    planted.mkdir(parents=True)
    (planted / "theirs.txt").write_bytes(b"left alone")
    with pytest.raises(etl.EtlError, match=f"{planted}: Is a directory") as caught:
        etl.run(settings(seed="pura"))
    assert str(out) + ":" not in str(caught.value)
    assert (planted / "theirs.txt").read_bytes() == b"left alone"


def test_a_run_that_keeps_no_answer_leaves_no_raw_folder_behind(api, out, raw, settings):
    # The seed's raw folder is checked at the start, but made only when a first answer is kept.
    api.script(status(400))
    with pytest.raises(etl.EtlError, match=r"^page 1: HTTP 400"):
        etl.run(settings(seed="pura", retries=0))
    assert not (raw / "pura").exists() and batch_files(out) == []


def test_kept_raw_answers_are_readable_by_this_user_alone_even_in_an_open_seed_folder(api, raw, settings):
    # They hold the credentials the service sends; a seed folder made 0755 by hand is accepted (no
    # one else can write in it), and the answers in it must still be closed to others.
    (raw / "pura").mkdir(parents=True)
    os.chmod(raw / "pura", 0o755)
    etl.run(settings(seed="pura"))
    kept = sorted((raw / "pura").iterdir())
    assert [path.name for path in kept] == ["page-00001.json.gz"]
    assert all(stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0 for path in kept), [oct(os.lstat(p).st_mode) for p in kept]
