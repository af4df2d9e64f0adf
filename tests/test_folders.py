"""The job's files and folders: never lose what we kept, never touch what is not ours.

A link planted where the job keeps its own folders is refused, and its target (the "bait") is
left byte for byte as it was; object-storage runs stage in a private folder; a run that does not
land never deletes the kept answers behind the batch in the lake; overlapping folders are refused
at start; replay reads only regular files; read_processed names a folder that is not there.

A folder of the job's own that another user owns or may write in is refused too (a planted state
is enough: as root, os.chown gives a folder to uid 1001 without any real user). Cases that need a
user who cannot read a folder run in a forked child that became uid 65534 (nobody): root reads
everything, and that user cannot start the interpreter, which lives under /root.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from conftest import PAGED, ROOT, assert_one_error_line, assert_rows_are, batch_files, fast_env, landed, raw_key, raw_users, record_sorts, run_cli, served_users
from fake_api import mutate, normal, status

import random_user_etl as etl
from _random_user_etl import folders, places, sort, staging
from random_user_config import Settings, SettingsError
from schemas import OUTPUT_SCHEMA, SORT_KEY

PURA_ANSWER = ROOT / "tests/fixtures/default_seed-pura_results-100.json"
PAGE_2_ANSWER = ROOT / "tests/fixtures" / PAGED[1]


def make_bait(tmp_path: Path) -> Path:
    """A folder that is not the job's, holding a file and a kept-answer look-alike, for a link to point at."""
    bait = tmp_path / "bait"
    bait.mkdir()
    (bait / "precious.txt").write_bytes(b"not the job's to touch\n")
    (bait / "page-00009.json.gz").write_bytes(gzip.compress(b"{}"))
    (bait / "unchecked-page-00001.json.gz").write_bytes(b"looks like a kept answer")
    return bait


def refused_untouched(run, bait: Path, says: str) -> None:
    """run() fails with EtlError matching `says`, and the bait holds the same files with the same bytes."""
    before = landed(bait)
    with pytest.raises(etl.EtlError, match=says) as caught:
        run()
    assert "\n" not in str(caught.value)
    assert landed(bait) == before and sorted(os.listdir(bait)) == sorted(before)


# ---------------------------------------------------------------- links where the job keeps its folders


OWN_FOLDERS = {  # the folders the job makes its own, and where each lies
    "staging": lambda out, raw: out / ".staging",
    "seed-staging": lambda out, raw: out / ".staging" / "pura",
    "sort": lambda out, raw: out / ".staging" / "pura" / "sort",
    "raw-seed": lambda out, raw: raw / "pura",
}


def linked(where: str):
    """A planting that makes the job's own folder `where` (OWN_FOLDERS) a link to the bait."""

    def plant(out, raw, bait):
        path = OWN_FOLDERS[where](out, raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(bait, target_is_directory=True)
        return path

    plant.__name__ = "link_" + where.replace("-", "_")
    return plant


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


# ---------------------------------------------------------------- object storage stages privately


def test_object_storage_runs_stage_in_a_folder_only_this_user_can_enter(api, settings, s3):
    private = s3.staged().parent
    assert str(private).startswith(str(Path(tempfile.gettempdir())))
    api.script(normal(), status(500))
    with pytest.raises(etl.EtlError, match="HTTP 500"):
        etl.run(settings(output_dir=s3.url(), seed="paged", n=80, page_size=40, retries=0, concurrency=1))
    info = os.lstat(private)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{private} is open to others: {oct(info.st_mode)}"
    assert [p.name for p in (s3.staged() / "paged").glob("part-*")] == ["part-00001.parquet"]
    # The next run of the same user resumes from it: only page 2 is fetched again.
    etl.run(settings(output_dir=s3.url(), seed="paged", n=80, page_size=40))
    assert sorted(int(r.params["page"]) for r in api.requests) == [1, 2, 2]
    assert_rows_are(etl.read_processed(s3.url()).collect(), raw_users(*PAGED[:2]))


def pre_create_link(private: Path, bait: Path) -> None:
    """Another user made the private folder's name a link to their own folder."""
    private.symlink_to(bait, target_is_directory=True)


def pre_create_foreign(private: Path, bait: Path) -> None:
    """Another user made the folder, and owns it."""
    private.mkdir(mode=0o700)
    os.chown(private, 12345, 12345)


def pre_create_open(private: Path, bait: Path) -> None:
    """The folder is ours, but anyone may enter and write in it."""
    private.mkdir()
    os.chmod(private, 0o777)


@pytest.mark.parametrize("pre_create", [pre_create_link, pre_create_foreign, pre_create_open], ids=lambda f: f.__name__)
def test_a_private_staging_folder_made_by_someone_else_is_refused(pre_create, api, settings, s3, tmp_path):
    bait = make_bait(tmp_path)
    private = s3.staged().parent
    pre_create(private, bait)
    if not private.is_symlink():
        (private / "theirs.txt").write_bytes(b"left alone")
    before = landed(private), landed(bait)
    refused_untouched(lambda: etl.run(settings(output_dir=s3.url(), seed="pura")), bait, f"refusing {private}: ")
    assert (landed(private), landed(bait)) == before
    assert api.requests == [] and s3.keys() == []


# ---------------------------------------------------------------- kept answers behind a landed batch


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


# ---------------------------------------------------------------- overlapping folders


def overlaps(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """(output_dir, raw_dir) pairs that overlap, some only once paths are resolved."""
    out = tmp_path / "out"
    (tmp_path / "link-to-out").symlink_to(out, target_is_directory=True)
    return {
        "same": (str(out), str(out)),
        "raw-is-staging": (str(out), str(out / ".staging")),
        "raw-inside-output": (str(out), str(out / "raw")),
        "raw-holds-output": (str(out / "lake"), str(out)),
        "same-through-a-link": (str(out), str(tmp_path / "link-to-out")),
        "staging-through-a-link": (str(tmp_path / "link-to-out"), str(out / ".staging")),
        "same-spelled-relative": (str(out), "out/./"),
        "same-with-dot-dot": (str(out), str(out / "x" / "..")),
    }


OVERLAPS = [
    "same",
    "raw-is-staging",
    "raw-inside-output",
    "raw-holds-output",
    "same-through-a-link",
    "staging-through-a-link",
    "same-spelled-relative",
    "same-with-dot-dot",
]


@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_output_and_raw_folders_are_refused_by_the_settings(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    output_dir, raw_dir = overlaps(tmp_path)[case]
    with pytest.raises(SettingsError, match=r"--raw-dir \(RANDOM_USER_RAW_DIR\).*--output-dir \(RANDOM_USER_OUTPUT_DIR\)"):
        Settings(output_dir=output_dir, raw_dir=raw_dir)


def test_neighbouring_folders_do_not_overlap(tmp_path):
    Settings(output_dir=str(tmp_path / "out"), raw_dir=str(tmp_path / "out2"))
    Settings(output_dir=str(tmp_path / "data" / "out"), raw_dir=str(tmp_path / "data" / "raw"))
    Settings(output_dir=str(tmp_path / "out"), raw_dir=None)


def test_a_raw_folder_in_the_staging_folder_of_object_storage_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = "s3://bucket/lake"
    private = places.staging_root(url).parent
    for raw_dir in (private, places.staging_root(url), places.staging_root(url) / "x", tmp_path):
        with pytest.raises(SettingsError, match="--raw-dir .*--output-dir"):
            Settings(output_dir=url, raw_dir=str(raw_dir))
    Settings(output_dir=url, raw_dir=str(tmp_path.parent / "raw"))


@pytest.mark.parametrize("login", ["ana", "j.doe@CORP/x", None])
def test_object_storage_settings_are_made_where_there_is_no_uid(login, tmp_path, monkeypatch):
    # As on Windows: no os.getuid, so the private staging folder is named after the login name,
    # as a single plain name whatever that name holds, or without one if none is known.
    monkeypatch.delattr(os, "getuid")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(variable, raising=False)
    if login is not None:
        monkeypatch.setenv("USERNAME", login)
    url = "s3://bucket/lake"
    assert Settings(output_dir=url).output_dir == url
    private = places.staging_root(url).parent
    assert private.parent == tmp_path and private.name.startswith("random_user_etl-")
    if login == "ana":
        assert private.name == "random_user_etl-ana"
    with pytest.raises(SettingsError, match="--raw-dir .*--output-dir"):
        Settings(output_dir=url, raw_dir=str(private))


def test_the_cli_refuses_a_raw_folder_in_staging_at_start_and_keeps_every_kept_answer(api, out, raw, settings, cli):
    etl.run(settings(seed="pura"))
    before = landed(out)
    result = cli("--seed", "pura", "--raw-dir", out / ".staging", env=fast_env(api.url, out, raw))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--raw-dir .* --output-dir")
    assert landed(out) == before and len(api.requests) == 1


# ---------------------------------------------------------------- replay reads regular files only


# In a subprocess: only a process boundary bounds a job that would block opening the FIFO.
def test_replay_of_a_fifo_page_fails_in_one_line_instead_of_hanging(raw, out, tmp_path):
    folder = tmp_path / "kept" / "paged"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "page-00001.json.gz")
    result = run_cli("--replay", folder, "--output-dir", out, timeout=30)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{folder / 'page-00001.json.gz'}: not a regular file")
    assert batch_files(out) == [] and not (out / ".staging" / "paged").exists()


def test_replay_of_a_fifo_as_one_saved_answer_fails_in_one_line(out, tmp_path):
    fifo = tmp_path / "answer.json"
    os.mkfifo(fifo)
    result = run_cli("--replay", fifo, "--output-dir", out, timeout=30)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"{fifo}: not a regular file")
    assert not out.exists()


def test_replay_of_a_device_is_refused(out, tmp_path):
    folder = tmp_path / "kept" / "pura"
    folder.mkdir(parents=True)
    (folder / "page-00001.json.gz").symlink_to("/dev/null")
    (tmp_path / "answer.json").symlink_to("/dev/null")
    for source in (folder, tmp_path / "answer.json"):
        with pytest.raises(etl.EtlError, match="not a regular file"):
            etl.replay(source, output_dir=str(out), raw_dir=None)
    assert batch_files(out) == [] and not (out / ".staging" / "pura").exists()


def test_replay_of_a_single_page_2_answer_says_why_and_leaves_nothing_behind(out, cli):
    result = cli("--replay", PAGE_2_ANSWER, "--output-dir", out)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"cannot replay {PAGE_2_ANSWER}: it is page 2 of seed 'paged', and a batch starts at page 1")
    assert batch_files(out) == [] and landed(out) == {}
    assert not (out / ".staging" / "paged").exists()


# ---------------------------------------------------------------- read_processed names a folder that is not there


def test_read_processed_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        etl.read_processed(str(missing))


def test_read_processed_of_a_file_says_it_is_not_a_folder(tmp_path):
    path = tmp_path / "a-file"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=str(path)):
        etl.read_processed(str(path))


def test_read_processed_of_an_empty_folder_is_an_empty_contract_frame(tmp_path):
    frame = etl.read_processed(str(tmp_path))
    assert isinstance(frame, pl.LazyFrame)
    assert frame.collect_schema() == OUTPUT_SCHEMA and frame.collect().height == 0


NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
import random_user_etl
frame = random_user_etl.read_processed(sys.argv[1]).collect()
print(frame.height, sorted(set(frame["user_id"])) == sorted(sys.argv[2].split(",")))
"""


def test_an_analyst_without_fcntl_imports_the_job_and_reads_the_lake(settings, out):
    # A fresh interpreter: the job's modules are imported with fcntl blocked, as on Windows.
    etl.run(settings(seed="paged", n=120, page_size=40))
    ids = ",".join(u["login"]["uuid"] for u in raw_users(*PAGED))
    result = subprocess.run([sys.executable, "-c", NO_FCNTL, str(out), ids], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["120", "True"]


def test_read_processed_with_no_folder_named_and_no_default_folder_yet_names_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("RANDOM_USER_OUTPUT_DIR", raising=False)
    default = tmp_path / "processed_data"
    monkeypatch.chdir(tmp_path)  # the default lake is processed_data in the working folder
    with pytest.raises(FileNotFoundError, match=str(default)):
        etl.read_processed()
    default.mkdir()
    assert etl.read_processed().collect().height == 0


# ---------------------------------------------------------------- folders someone else owns or may write in

OTHER_UID = 1001  # no such user is needed: os.chown takes any number


def plant_folder(path: Path, uid: int, mode: int) -> Path:
    """A folder at `path`, holding a file of its owner's, with this owner and mode (os.chmod: no umask)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "theirs.txt").write_bytes(b"left alone")
    os.chmod(path, mode)
    os.chown(path, uid, -1)
    return path


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
    etl.fetch_and_land(settings(seed="paged", n=120, page_size=40, concurrency=1), run_rows=40, group_rows=40)
    assert seen and set(seen) == {0o700}


# ---------------------------------------------------------------- temp files: made afresh, never through a link


def test_a_temp_file_is_never_written_through_a_link_planted_at_its_name(tmp_path):
    folder = tmp_path / "staging"
    folder.mkdir(mode=0o700)
    bait = make_bait(tmp_path)
    before = landed(bait)
    # The name the old job wrote its temp file at, predictable from the process and thread ids.
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
    old_name = f".part-00001.parquet.{os.getpid()}.{threading.get_ident()}.tmp"  # predictable: anyone could plant it
    assert names[0] != names[1] and old_name not in names
    assert (tmp_path / "part-00001.parquet").read_bytes() == b"done"
    assert sorted(os.listdir(tmp_path)) == ["part-00001.parquet"]


# ---------------------------------------------------------------- the seed lock


def test_a_lock_owned_by_another_user_is_refused(api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.chown(lock, OTHER_UID, -1)
    with pytest.raises(etl.EtlError, match=f"refusing {lock}: owned by uid {OTHER_UID}"):
        etl.run(settings(seed="pura"))
    assert api.requests == [] and os.lstat(lock).st_uid == OTHER_UID


def test_a_lock_left_readable_by_an_older_run_is_closed_to_others(api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.chmod(lock, 0o644)
    etl.run(settings(seed="pura"))
    assert stat.S_IMODE(os.lstat(lock).st_mode) == 0o600


def folder_as_lock(lock: Path) -> None:
    """A folder at the lock's name."""
    lock.mkdir()


def socket_as_lock(lock: Path) -> None:
    """A listening socket at the lock's name (bound by a relative name: socket paths are short)."""
    with socket.socket(socket.AF_UNIX) as sock:
        here = os.getcwd()
        os.chdir(lock.parent)
        try:
            sock.bind(lock.name)
        finally:
            os.chdir(here)


@pytest.mark.parametrize("plant", [folder_as_lock, socket_as_lock], ids=lambda plant: plant.__name__)
def test_something_odd_at_the_lock_name_is_named(plant, api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    plant(lock)
    with pytest.raises(etl.EtlError, match=f"refusing {lock}: not a plain file"):
        etl.run(settings(seed="pura"))
    assert os.path.lexists(lock) and api.requests == []


# ---------------------------------------------------------------- messages name the path


def test_a_folder_at_a_kept_answers_name_is_named_not_the_output_folder(api, out, raw, settings):
    planted = raw / "pura" / "accepted-page-00001.json.gz"
    planted.mkdir(parents=True)
    (planted / "theirs.txt").write_bytes(b"left alone")
    with pytest.raises(etl.EtlError, match=f"{planted}: Is a directory") as caught:
        etl.run(settings(seed="pura"))
    assert str(out) + ":" not in str(caught.value)
    assert (planted / "theirs.txt").read_bytes() == b"left alone"


def as_nobody(folder: Path, call) -> str:
    """What call() raised ("Type: text"), or "returned", in a forked child that entered `folder`, then became uid 65534.

    Forked, not started: the interpreter lives under /root, which uid 65534 cannot enter. The
    child only lists a folder before answering, so no lock another thread held is ever needed.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.chdir(folder)  # entered as root: the child needs no way in through /tmp's pytest folders
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                call()
                outcome = "returned"
            except BaseException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child as uid 65534 did not answer within 30 s")
        with open(read, "rb", closefd=False) as pipe:
            return pipe.read().decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_lake_this_user_cannot_list_raises_permission_error_naming_it(tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    OUTPUT_SCHEMA.to_frame().write_parquet(lake / "random_users_pura.parquet")
    os.chmod(lake, 0o700)  # root's alone
    os.chmod(tmp_path, 0o711)  # others may pass through the test's folder to find that out
    outcome = as_nobody(tmp_path, lambda: etl.read_processed("lake"))
    assert outcome.startswith("PermissionError: ") and "'lake'" in outcome, outcome


def test_replay_of_a_folder_this_user_cannot_list_names_it(tmp_path):
    kept = tmp_path / "kept" / "pura"
    kept.mkdir(parents=True)
    (kept / "page-00001.json.gz").write_bytes(gzip.compress(PURA_ANSWER.read_bytes()))
    os.chmod(kept, 0o700)
    os.chmod(tmp_path, 0o711)
    os.chmod(tmp_path / "kept", 0o711)
    run = Settings(output_dir=str(tmp_path / "out"), raw_dir=None)
    outcome = as_nobody(tmp_path, lambda: etl.replay(Path("kept/pura"), run))
    assert outcome.startswith("StorageError: cannot replay kept/pura: ") and "Permission denied" in outcome, outcome
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- object storage is s3://, a local folder a plain path


@pytest.mark.parametrize("name", ["output_dir", "raw_dir"])
def test_a_file_url_for_a_folder_is_refused_as_a_setting(name, tmp_path):
    with pytest.raises(SettingsError, match=f"--{name.replace('_', '-')} .*file:// .*use a plain path"):
        Settings(**{"output_dir": str(tmp_path / "out"), "raw_dir": str(tmp_path / "raw"), name: f"file://{tmp_path}/x"})


def test_the_cli_refuses_a_file_url_output_folder_before_writing_anything(tmp_path, cli):
    raw = tmp_path / "x" / "raw"  # overlaps the file:// folder once read as a plain path
    result = cli("--output-dir", f"file://{tmp_path}/x", "--raw-dir", raw, "--replay", PURA_ANSWER)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--output-dir .*use a plain path")
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------- the lake holds regular files only


def read_lake_in_a_child(lake: Path) -> subprocess.CompletedProcess:
    """read_processed(lake).collect() in a new interpreter, bounded: a hang fails the test instead of stalling it."""
    code = "import sys, random_user_etl as etl; print(etl.read_processed(sys.argv[1]).collect().height)"
    return subprocess.run([sys.executable, "-c", code, str(lake)], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_a_fifo_named_like_a_batch_is_named_instead_of_hanging_the_reader(api, out, settings):
    etl.run(settings(seed="pura"))
    fifo = out / "random_users_zz.parquet"
    os.mkfifo(fifo)
    result = read_lake_in_a_child(out)
    assert result.returncode == 1
    assert f"{fifo}: named like a batch but not a regular file" in result.stderr.strip().splitlines()[-1]


def test_a_folder_named_like_a_batch_is_named(api, out, settings):
    etl.run(settings(seed="pura"))
    folder = out / "random_users_zz.parquet"
    folder.mkdir()
    with pytest.raises(etl.EtlError, match=f"{folder}: named like a batch but not a regular file"):
        etl.read_processed(str(out))


def test_a_link_to_a_batch_is_read_as_the_batch(api, out, settings, tmp_path):
    etl.run(settings(seed="pura"))
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "random_users_pura.parquet").symlink_to(out / "random_users_pura.parquet")
    assert_rows_are(etl.read_processed(str(lake)).collect(), raw_users(PURA_ANSWER.name))


# ---------------------------------------------------------------- replay never deletes its source


@pytest.mark.parametrize("spelling", ["plain", "dotted", "through-a-link"])
def test_replay_of_a_folder_in_the_output_staging_is_refused_and_the_folder_kept(spelling, out, tmp_path, cli):
    source = out / ".staging" / "pura"
    source.mkdir(parents=True)
    (source / "page-00001.json.gz").write_bytes(gzip.compress(PURA_ANSWER.read_bytes()))
    before = landed(out)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pura").symlink_to(source, target_is_directory=True)  # named as the seed it holds
    given = {"plain": source, "dotted": out / ".staging" / ".." / ".staging" / "pura", "through-a-link": tmp_path / "elsewhere" / "pura"}
    result = cli("--replay", given[spelling], "--output-dir", out)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"cannot replay {given[spelling]}: it lies in the staging folder {out / '.staging'}")
    assert landed(out) == before and batch_files(out) == []


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


# ---------------------------------------------------------------- paths are literal
# A folder name may hold glob characters: every path the job hands Polars is read as the one file
# it names, never as a pattern that would match a sibling's files (lake[1] matches lake1).

GLOB_NAMES = ["lake[1]", "lake*", "lake?"]


def decoy_staging(sibling: Path, seed: str, settings) -> None:
    """Staged parts of `seed` in the output folder `sibling` that hold another seed's users: a run whose landing failed."""
    (sibling / "random_users_decoy.parquet").mkdir(parents=True)  # the decoy run cannot land, so its parts stay
    with pytest.raises(etl.EtlError):
        etl.run(settings(output_dir=str(sibling), seed="decoy", n=120, page_size=40))
    (sibling / ".staging" / "decoy").rename(sibling / ".staging" / seed)


def read_batch(path) -> pl.DataFrame:
    """One landed file, read by Polars as the one file it names."""
    return pl.read_parquet(path, glob=False)


def test_a_run_into_a_folder_named_like_a_pattern_lands_the_served_users_not_a_siblings(api, settings, tmp_path):
    decoy_staging(tmp_path / "lake1", "paged", settings)
    lake = tmp_path / "lake[1]"
    batch = etl.run(settings(output_dir=str(lake), seed="paged", n=120, page_size=40))
    assert batch.path == f"{lake}/random_users_paged.parquet"
    assert_rows_are(read_batch(batch.path), served_users("paged", 120, 40))
    assert not (tmp_path / "lake1" / "random_users_paged.parquet").exists() and (tmp_path / "lake1" / ".staging" / "paged").is_dir()


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_run_sorted_in_many_key_ranges_in_a_folder_named_like_a_pattern(api, settings, tmp_path, monkeypatch, name):
    decoy_staging(tmp_path / "lake1", "paged", settings)
    sorts = record_sorts(monkeypatch)
    lake = tmp_path / name
    batch = etl.fetch_and_land(settings(output_dir=str(lake), seed="paged", n=120, page_size=40, concurrency=2), run_rows=17, group_rows=40)
    assert sorts[-1].runs == 8 and sorts[-1].groups >= 1, "split into key ranges while the run went on"
    frame, users = read_batch(batch.path), served_users("paged", 120, 40)
    assert_rows_are(frame, users)
    assert frame.select(SORT_KEY).rows() == sorted(map(raw_key, users))


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_read_processed_of_a_folder_named_like_a_pattern_reads_that_folder_alone(api, settings, tmp_path, name):
    for sibling in ("lake1", "lakeX", "lake]"):
        if sibling != name:
            etl.run(settings(output_dir=str(tmp_path / sibling), seed="pura"))  # the same file name as the lake's
    lake = tmp_path / name
    etl.run(settings(output_dir=str(lake), seed="pura"))
    assert_rows_are(etl.read_processed(str(lake)).collect(), raw_users(PURA_ANSWER.name))


def test_raw_and_replay_folders_named_like_patterns_replay_the_kept_answers(api, settings, tmp_path):
    decoy_staging(tmp_path / "again1", "paged", settings)
    raw = tmp_path / "raw[1]"
    etl.run(settings(output_dir=str(tmp_path / "lake"), raw_dir=str(raw), seed="paged", n=120, page_size=40))
    api.clear()
    batch = etl.replay(raw / "paged", settings(output_dir=str(tmp_path / "again[1]"), raw_dir=None))
    assert api.requests == []
    assert_rows_are(read_batch(batch.path), served_users("paged", 120, 40))


def test_an_output_folder_starting_with_a_tilde_is_the_folder_named_not_the_home_folder(api, settings, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    batch = etl.run(settings(output_dir="~/lake", seed="pura"))
    assert_rows_are(read_batch(tmp_path / "~" / "lake" / "random_users_pura.parquet"), raw_users(PURA_ANSWER.name))
    assert_rows_are(etl.read_processed("~/lake").collect(), raw_users(PURA_ANSWER.name))
    assert batch.path == "~/lake/random_users_pura.parquet" and list(home.iterdir()) == []


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.text(alphabet="ab1[]*?", min_size=1, max_size=6))
def test_read_processed_reads_the_folder_named_whatever_glob_characters_it_holds(tmp_path_factory, name):
    base = tmp_path_factory.mktemp("names")
    (base / name).mkdir()
    pl.DataFrame({"user_id": ["in-the-lake"]}).write_parquet(base / name / "random_users_s.parquet")
    # A sibling the name matches as a pattern, holding a batch of the same file name.
    for sibling in {"a", "b", "1", "ab1", "a1", "ab", "[", "]", "[1]"} - {name}:
        if fnmatch.fnmatchcase(sibling, name):
            (base / sibling).mkdir(exist_ok=True)
            pl.DataFrame({"user_id": ["a-sibling's"]}).write_parquet(base / sibling / "random_users_s.parquet")
    assert etl.read_processed(str(base / name)).select("user_id").collect().to_series().to_list() == ["in-the-lake"]
