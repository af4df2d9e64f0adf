"""Output and raw folders that overlap, spelled plainly, through a link or relatively, or a raw folder in
object storage's staging folder: refused by the settings, before any request."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from support import assert_one_error_line, fast_env, landed

from _random_user_etl import places
import random_user_etl as etl
from random_user_config import Settings, SettingsError


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


def test_the_cli_refuses_a_raw_folder_in_staging_at_start_and_keeps_every_kept_answer(api, out, raw, settings, cli):
    etl.run(settings(seed="pura"))
    before = landed(out)
    result = cli("--seed", "pura", "--raw-dir", out / ".staging", env=fast_env(api.url, out, raw))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--raw-dir .* --output-dir")
    assert landed(out) == before and len(api.requests) == 1
