"""Where runs into object storage stage their pages: a folder in the temp folder that this user alone may
enter, named after the uid (or the login name where there is none); one made by someone else is refused."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from support import PAGED, assert_rows_are, landed, make_bait, raw_users, refused_untouched
from fake_api import normal, status

from _random_user_etl import places
import random_user_etl as etl
from random_user_config import Settings, SettingsError


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
