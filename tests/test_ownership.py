"""Folders of the job's own that another user owns or may write in are refused, their contents untouched;
the folders the job makes are private, its batches as readable as any new file.

A planted state is enough: as root, os.chown gives a folder to uid 1001 without any real user."""

from __future__ import annotations

import os
import stat

import polars as pl
import pytest
from support import land_sorted, OTHER_UID, OWN_FOLDERS, PURA_ANSWER, assert_one_error_line, batch_files, fast_env, landed, linked, make_bait, plant_folder

import random_user_etl as etl
from _random_user_etl import sort, staging


link_seed_staging = linked("seed-staging")


STRANGERS = {  # (owner, mode, what the refusal says)
    "owned-by-another-user": (OTHER_UID, 0o755, f"owned by uid {OTHER_UID}"),
    "open-to-all": (None, 0o777, "mode 0777"),
    "open-to-the-group": (None, 0o775, "mode 0775"),
}


@pytest.mark.parametrize("stranger", STRANGERS)
@pytest.mark.parametrize("where", OWN_FOLDERS)
def test_a_folder_of_the_job_that_another_user_owns_or_may_write_in_is_refused(where, stranger, api, out, raw, settings):
    uid, mode, says = STRANGERS[stranger]
    folder = plant_folder(OWN_FOLDERS[where](out, raw), os.getuid() if uid is None else uid, mode)
    before = landed(folder)
    with pytest.raises(etl.EtlError, match=f"refusing {folder}: .*{says}") as caught:
        etl.run(settings(seed="pura"))
    assert "\n" not in str(caught.value)
    assert landed(folder) == before and os.lstat(folder).st_uid == (os.getuid() if uid is None else uid)
    assert api.requests == [] and batch_files(out) == []


def foreign_seed_staging(out, raw, bait):
    """<output>/.staging/<seed> belongs to another user, who left it open to all."""
    return plant_folder(out / ".staging" / "pura", OTHER_UID, 0o777)


@pytest.mark.parametrize(
    "plant, says",
    [(link_seed_staging, "a symbolic link"), (foreign_seed_staging, f"owned by uid {OTHER_UID}")],
    ids=["linked", "foreign"],
)
def test_the_cli_refuses_a_seed_staging_folder_not_its_own_in_one_line_and_empties_nothing(plant, says, api, out, raw, tmp_path, cli):
    bait = make_bait(tmp_path)
    planted = plant(out, raw, bait)
    before = landed(bait), landed(planted)
    result = cli("--seed", "pura", env=fast_env(api.url, out, raw))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"refusing {planted}: {says}")
    assert (landed(bait), landed(planted)) == before and api.requests == []


def test_a_forged_part_in_a_staging_folder_someone_else_owns_never_lands(api, out, settings):
    run = settings(seed="pura", raw_dir=None)
    folder = out / ".staging" / "pura"
    folder.mkdir(parents=True)
    # A whole part of the very page the run would fetch, with its identity, but one value forged.
    frame = etl.transform(PURA_ANSWER.read_bytes(), etl.PageRequest("pura", 1, 100))
    forged = frame.with_columns(email=pl.lit("forged@attacker.invalid"))
    staging.stage_part(folder, forged, staging.part_identity(run, "pura", 1, 100))
    plant_folder(folder, OTHER_UID, 0o777)
    with pytest.raises(etl.EtlError, match=f"refusing {folder}: owned by uid {OTHER_UID}"):
        etl.run(run)
    assert batch_files(out) == [] and api.requests == []
    assert (folder / "part-00001.parquet").is_file()  # nothing deleted


def test_a_run_makes_its_own_folders_and_lock_private_and_its_batch_as_readable_as_before(api, out, raw, settings):
    umask = os.umask(0o022)
    os.umask(umask)
    etl.run(settings(seed="pura"))
    mode = lambda path: stat.S_IMODE(os.lstat(path).st_mode)
    assert mode(out / ".staging") == 0o700 and mode(raw / "pura") == 0o700
    assert mode(out / ".staging" / "pura.lock") == 0o600, "any reader could take the lock and stall every run"
    # The lake is for analysts: the batch keeps the mode any new file gets.
    assert mode(out / "random_users_pura.parquet") == 0o666 & ~umask


def test_the_sort_folder_is_made_private(api, out, raw, settings, monkeypatch):
    seen = []
    split = sort.ExternalSort._split

    def spy(self):
        split(self)
        seen.append(stat.S_IMODE(os.lstat(self.work).st_mode))

    monkeypatch.setattr(sort.ExternalSort, "_split", spy)
    # Several key ranges: the sort writes its scratch files.
    land_sorted(settings(seed="paged", n=120, page_size=40, concurrency=1), 40, 40)
    assert seen and set(seen) == {0o700}
