"""Raw landing and replay: what the service sent is kept, and any batch rebuilds from it offline."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import polars as pl
import pytest
from support import PAGED, ROOT, assert_rows_are, batch_files, fast_env, fixture_json, landed, on_log, raw_users
from fake_api import mutate, status

import random_user_etl as etl
from _random_user_etl import staging

PAGES = ["page-00001.json.gz", "page-00002.json.gz", "page-00003.json.gz"]


def kept(raw, seed="paged") -> list[str]:
    """The kept page files of a seed."""
    return sorted(p.name for p in (raw / seed).glob("*")) if (raw / seed).exists() else []


def test_raw_answers_are_kept_exactly_as_received(api, raw, settings):
    etl.run(settings(n=100, seed="paged", page_size=40))
    assert kept(raw) == PAGES
    by_page = {json.loads(body)["info"]["page"]: body for body in api.sent}
    for page, name in enumerate(PAGES, start=1):
        assert gzip.decompress((raw / "paged" / name).read_bytes()) == by_page[page]


def test_replay_with_the_service_gone_rebuilds_the_same_batch(api, out, raw, settings, cli):
    live = etl.run(settings(n=100, seed="paged", page_size=40))
    before = pl.read_parquet(live.path)
    (out / "random_users_paged.parquet").unlink()
    api.stop()  # from here on, any request would fail
    result = cli("--replay", raw / "paged", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    after = pl.read_parquet(out / "random_users_paged.parquet")
    assert after.drop("ingested_at").equals(before.drop("ingested_at"))
    assert after["ingested_at"].n_unique() == 1 and after["ingested_at"][0] > before["ingested_at"][0]


def test_one_saved_answer_replays_offline_as_the_quick_start_shows(tmp_path, cli):
    out = tmp_path / "out"
    result = cli("--replay", ROOT / "tests/fixtures/default_seed-pura_results-100.json", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    frame = pl.read_parquet(out / "random_users_pura.parquet")
    users = fixture_json("default_seed-pura_results-100.json")["results"]
    assert sorted(frame["user_id"]) == sorted(u["login"]["uuid"] for u in users)
    assert "landed 100 rows, seed pura" in result.stderr


def test_a_rejected_answer_is_kept_aside_where_replay_does_not_read_it(api, raw, settings):
    def break_page(body):
        body["results"][0]["login"]["uuid"] = None

    api.script(mutate(break_page))
    with pytest.raises(etl.EtlError, match="login.uuid is missing or null in 1 records"):
        etl.run(settings(seed="pura", retries=0))
    assert kept(raw, "pura") == ["rejected-page-00001.json.gz"]
    assert gzip.decompress((raw / "pura" / "rejected-page-00001.json.gz").read_bytes()) == api.sent[0]
    with pytest.raises(etl.EtlError, match="no page-NNNNN.json.gz files"):
        etl.replay(raw / "pura", settings())


def test_raw_holds_credentials_and_the_lake_does_not(api, out, raw, settings):
    etl.run(settings(seed="pura"))
    body = json.loads(gzip.decompress((raw / "pura" / "page-00001.json.gz").read_bytes()))
    passwords = {u["login"]["password"] for u in body["results"]}
    assert passwords, "the raw answer should hold what the service sent, credentials included"
    cells = {v for row in etl.read_processed(str(out)).collect().rows() for v in row}
    assert not passwords & cells


def test_raw_data_is_kept_out_of_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to ask git about")
    ignored = subprocess.run(["git", "check-ignore", "-q", "raw_data/x/page-00001.json.gz"], cwd=ROOT)
    assert ignored.returncode == 0


def corrupt(folder):
    """Make a kept page unreadable as gzip."""
    (folder / "page-00002.json.gz").write_bytes(b"\x1f\x8b not really gzip")


def gap(folder):
    """Lose a page in the middle."""
    (folder / "page-00002.json.gz").unlink()


def another_seed(folder):
    """Put another seed's answer under this seed's name."""
    other = fixture_json("default_seed-pura_results-100.json")
    other["info"]["page"] = 2
    (folder / "page-00002.json.gz").write_bytes(gzip.compress(json.dumps(other).encode()))


@pytest.mark.parametrize(
    "damage, says",
    [(corrupt, "cannot read kept answer"), (gap, "page 2 of 3 is missing"), (another_seed, "seed 'paged'")],
)
def test_bad_replay_input_fails_cleanly_and_writes_nothing(damage, says, api, out, raw, settings, cli, tmp_path):
    etl.run(settings(n=100, seed="paged", page_size=40))
    source = tmp_path / "copy" / "paged"
    shutil.copytree(raw / "paged", source)
    damage(source)
    fresh = tmp_path / "fresh"
    result = cli("--replay", source, "--output-dir", fresh)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("random_user_etl.py: error: cannot replay") and says in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert batch_files(fresh) == [] and not (fresh / ".staging" / "paged").exists()


def test_a_missing_replay_folder_fails_cleanly(out, cli, tmp_path):
    before = landed(out)
    result = cli("--replay", tmp_path / "nowhere", "--output-dir", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"random_user_etl.py: error: nothing to replay at {tmp_path / 'nowhere'}: no such folder or file"]
    assert landed(out) == before


def test_raw_keeping_can_be_switched_off(api, out, raw, cli):
    result = cli("--seed", "pura", env=fast_env(api.url, out, raw, RANDOM_USER_RAW_DIR="off"))
    assert result.returncode == 0, result.stderr
    assert not raw.exists() and batch_files(out) == ["random_users_pura.parquet"]


def test_pages_of_an_earlier_larger_run_do_not_leak_into_a_replay(out, raw, settings, cli):
    etl.run(settings(n=120, seed="paged", page_size=40))
    assert kept(raw) == PAGES
    live = etl.run(settings(n=40, seed="paged", page_size=40))
    assert kept(raw) == PAGES[:1], "pages past this run's last belong to the batch it replaced"
    before = pl.read_parquet(live.path)
    (out / "random_users_paged.parquet").unlink()
    assert cli("--replay", raw / "paged", "--output-dir", out).returncode == 0
    replayed = pl.read_parquet(out / "random_users_paged.parquet")
    assert_rows_are(replayed, raw_users(PAGED[0]))  # page 1's 40 users alone
    assert replayed.drop("ingested_at").equals(before.drop("ingested_at"))


def test_a_gzip_damaged_in_the_middle_fails_cleanly(raw, settings, cli, tmp_path):
    etl.run(settings(n=100, seed="paged", page_size=40))
    page = raw / "paged" / "page-00002.json.gz"
    data = bytearray(page.read_bytes())
    data[200:400] = bytes(b ^ 0xFF for b in data[200:400])
    page.write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    result = cli("--replay", raw / "paged", "--output-dir", fresh)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("random_user_etl.py: error: cannot replay")
    assert "cannot read kept answer" in result.stderr and "unexpected" not in result.stderr
    assert batch_files(fresh) == [] and not (fresh / ".staging" / "paged").exists()


def test_a_saved_answer_that_lost_a_user_is_refused(tmp_path, cli):
    answer = fixture_json("default_seed-pura_results-100.json")
    answer["results"].pop()
    saved = tmp_path / "short.json"
    saved.write_text(json.dumps(answer))
    result = cli("--replay", saved, "--output-dir", tmp_path / "out")
    assert result.returncode == 1
    assert "info.results=100 but holds 99 users" in result.stderr.strip().splitlines()[-1]
    assert batch_files(tmp_path / "out") == []


def test_a_kept_answer_past_the_size_bound_is_refused_before_it_is_read(tmp_path, cli, monkeypatch):
    saved = tmp_path / "big.json"
    with open(saved, "wb") as handle:
        handle.truncate(300_000_000)  # 300 MB on paper, sparse on disk
    result = cli("--replay", saved, "--output-dir", tmp_path / "out", "--max-response-mb", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"random_user_etl.py: error: cannot replay {saved}: cannot read kept answer {saved}: answer larger than the 1,000,000-byte limit (--max-response-mb)"
    ]
    assert batch_files(tmp_path / "out") == []

    def never(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(Path, "read_bytes", never)  # the size is refused from the file's length alone
    with pytest.raises(etl.EtlError, match="answer larger than the 1,000,000-byte limit"):
        etl.replay(saved, output_dir=str(tmp_path / "out"), max_response_mb=1)


def test_ctrl_c_stops_a_replay_after_an_earlier_run_in_this_process_failed(api, out, raw, settings, cli, tmp_path):
    # A failed page sets the stop event to wind the other workers down; a later replay in the same
    # process must still hear Ctrl-C, not take it for a second signal of a stop under way.
    etl.run(settings(seed="paged", n=120, page_size=40))
    api.script(status(400))
    with pytest.raises(etl.EtlError, match="HTTP 400"):
        etl.run(settings(seed="other", retries=0))
    fresh = tmp_path / "fresh"
    with on_log("replayed", lambda: os.kill(os.getpid(), signal.SIGINT)):
        result = cli("--replay", str(raw / "paged"), env=fast_env(api.url, fresh, tmp_path / "no-raw"))
    assert result.returncode == 130, result.stderr
    assert "stopped by SIGINT" in result.stderr and batch_files(fresh) == []


def test_a_live_run_never_trusts_a_page_a_replay_staged(api, out, raw, settings):
    # A kept answer does not say which nationalities it was asked for: a page a stopped replay left
    # staged (stamped with the replay's settings) must not stand in for a page of a live run.
    etl.run(settings(seed="paged", n=120, page_size=40, nat=("gb",)))
    run = settings(seed="paged", n=120, page_size=40)
    folder = staging.own_staging_root(str(out)) / "paged"
    folder.mkdir(0o700)
    kept = gzip.decompress((raw / "paged" / "page-00001.json.gz").read_bytes())
    staging.stage_part(folder, etl.transform(kept, etl.PageRequest("paged", 1, None)), staging.part_identity(run, "paged", 1, 40, "replay"))
    assert staging.pending_pages(folder, run, "paged", [40, 40, 40]) == [1, 2, 3]
