"""Links and odd files planted where the job keeps its own folders, parts and temp files: refused, or removed
as links, never followed; the target (the "bait") is left byte for byte as it was. The folders an operator
names may be links."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import polars as pl
import pytest
from support import OWN_FOLDERS, PURA_ANSWER, batch_files, landed, linked, make_bait, refused_untouched

import random_user_etl as etl
from _random_user_etl import folders, staging
from random_user_config import Settings


def link_lock(out, raw, bait):
    """The seed's lock file is a dangling link into the bait: opening it would create the target."""
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "pura.lock").symlink_to(bait / "planted.lock")
    return out / ".staging" / "pura.lock"


def file_as_seed_staging(out, raw, bait):
    """<output>/.staging/<seed> is a plain file, not a folder."""
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "pura").write_bytes(b"a file")
    return out / ".staging" / "pura"


def fifo_as_lock(out, raw, bait):
    """The seed's lock is a FIFO, not a file."""
    (out / ".staging").mkdir(parents=True)
    os.mkfifo(out / ".staging" / "pura.lock")
    return out / ".staging" / "pura.lock"


link_staging, link_seed_staging, link_sort, link_raw_seed = map(linked, OWN_FOLDERS)


PLANTED = [link_staging, link_seed_staging, link_sort, link_raw_seed, link_lock, file_as_seed_staging, fifo_as_lock]


@pytest.mark.parametrize("plant", PLANTED, ids=lambda plant: plant.__name__)
def test_a_link_or_odd_file_where_the_job_keeps_a_folder_is_refused_and_its_target_untouched(plant, api, out, raw, settings, tmp_path):
    bait = make_bait(tmp_path)
    planted = plant(out, raw, bait)
    refused_untouched(lambda: etl.run(settings(seed="pura")), bait, f"refusing {planted}: (a symbolic link|not a (plain )?(folder|file))")
    assert api.requests == [] and batch_files(out) == []
    assert os.path.lexists(planted)  # refused, not "repaired" behind the operator's back


@pytest.mark.parametrize("plant", [link_staging, link_seed_staging, link_lock], ids=lambda plant: plant.__name__)
def test_replay_refuses_a_planted_link_too(plant, out, raw, tmp_path):
    bait = make_bait(tmp_path)
    planted = plant(out, raw, bait)
    refused_untouched(lambda: etl.replay(PURA_ANSWER, output_dir=str(out), raw_dir=None), bait, f"refusing {planted}")
    assert batch_files(out) == []


def test_operator_named_top_folders_may_be_links(api, tmp_path, settings):
    real_out, real_raw = tmp_path / "real-out", tmp_path / "real-raw"
    real_out.mkdir(), real_raw.mkdir()
    (tmp_path / "out-link").symlink_to(real_out, target_is_directory=True)
    (tmp_path / "raw-link").symlink_to(real_raw, target_is_directory=True)
    etl.run(settings(seed="pura", output_dir=str(tmp_path / "out-link"), raw_dir=str(tmp_path / "raw-link")))
    assert batch_files(real_out) == ["random_users_pura.parquet"]
    assert sorted(landed(real_raw)) == ["pura/page-00001.json.gz"]


def leftover_links(folder: Path, bait: Path) -> list[Path]:
    """Links a dead run (or anyone) left in a staging folder: to a folder, to a file, as a part, as a temp file."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = {
        "junk": bait,
        "part-00009.parquet": bait / "precious.txt",
        ".part-00001.parquet.1.2.tmp": bait / "precious.txt",
        "part-00001.parquet": bait / "precious.txt",
    }
    for name, target in planted.items():
        (folder / name).symlink_to(target)
    return [folder / name for name in planted]


def test_links_left_inside_the_staging_folder_are_removed_as_links_never_followed(api, out, raw, settings, tmp_path):
    bait = make_bait(tmp_path)
    before = landed(bait)
    leftover_links(out / ".staging" / "pura", bait)
    leftover_links(raw / "pura", bait)  # and in the raw seed folder: swept or replaced, never followed
    (raw / "pura" / "page-00001.json.gz").symlink_to(bait / "precious.txt")
    (raw / "pura" / "unchecked-page-00002.json.gz").symlink_to(bait / "precious.txt")
    etl.run(settings(seed="pura"))
    assert landed(bait) == before
    assert not (out / ".staging" / "pura").exists()
    assert (raw / "pura" / "page-00001.json.gz").is_file() and not (raw / "pura" / "page-00001.json.gz").is_symlink()
    assert not os.path.lexists(raw / "pura" / "unchecked-page-00002.json.gz")


def test_a_staged_part_that_is_a_link_is_not_trusted(api, out, settings, tmp_path):
    run = settings(seed="pura", raw_dir=None)
    # A whole part of this very page, as a killed run would have staged it, but reached through a link.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    frame = etl.transform(PURA_ANSWER.read_bytes(), etl.PageRequest("pura", 1, 100))
    real = staging.stage_part(elsewhere, frame, staging.part_identity(run, "pura", 1, 100))
    before = landed(elsewhere)
    (out / ".staging" / "pura").mkdir(parents=True)
    (out / ".staging" / "pura" / real.name).symlink_to(real)
    etl.run(run)
    assert len(api.requests) == 1, "the linked part was reused instead of fetched"
    assert landed(elsewhere) == before


def test_a_temp_file_is_never_written_through_a_link_planted_at_its_name(tmp_path):
    folder = tmp_path / "staging"
    folder.mkdir(mode=0o700)
    bait = make_bait(tmp_path)
    before = landed(bait)
    # A name anyone could predict from the process and thread ids.
    planted = folder / f".part-00001.parquet.{os.getpid()}.{threading.get_ident()}.tmp"
    planted.symlink_to(bait / "precious.txt")
    settings = Settings(output_dir=str(tmp_path / "out"), raw_dir=None)
    frame = etl.transform(PURA_ANSWER.read_bytes(), etl.PageRequest("pura", 1, 100))
    part = staging.stage_part(folder, frame, staging.part_identity(settings, "pura", 1, 100))
    assert landed(bait) == before
    assert stat.S_ISREG(os.lstat(part).st_mode) and pl.read_parquet(part).height == 100


def test_a_temp_file_is_created_exclusively_private_and_at_an_unpredictable_name(tmp_path):
    seen = []

    def write(file):
        temp = Path(os.readlink(f"/proc/self/fd/{file.fileno()}"))  # the file the writer was given
        info = os.lstat(temp)  # made before the writer is called: nobody else's file can be there
        seen.append((temp.name, stat.S_ISREG(info.st_mode), stat.S_IMODE(info.st_mode), info.st_size))
        file.write(b"done")

    for _ in range(2):
        folders.write_atomically(tmp_path / "part-00001.parquet", write)
    assert [found[1:] for found in seen] == [(True, 0o600, 0)] * 2
    names = [found[0] for found in seen]
    predictable = f".part-00001.parquet.{os.getpid()}.{threading.get_ident()}.tmp"  # predictable: anyone could plant it
    assert names[0] != names[1] and predictable not in names
    assert (tmp_path / "part-00001.parquet").read_bytes() == b"done"
    assert sorted(os.listdir(tmp_path)) == ["part-00001.parquet"]
