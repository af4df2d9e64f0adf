"""Large pulls: the external sort, output independent of concurrency, resume after the rate limit, progress on a terminal."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading

import polars as pl
import pytest
from support import (
    land_sorted,
    PAGED,
    assert_null_counts,
    assert_rows_are,
    batch_files,
    duplicate_first_id,
    fast_env,
    fixture_bytes,
    raw_key,
    raw_users,
    record_sorts,
    run_cli,
    served_users,
    users,
)
from fake_api import mutate, normal, rate_limited

import random_user_etl as etl
from _random_user_etl import run, sort, staging
from _random_user_etl.stop import Stop
from _random_user_etl.store import LocalFiles
from random_user_config import Settings
from schemas import SORT_KEY


def stage_recorded_pages(folder) -> list:
    """Stage the three recorded 40-user pages of seed "paged" as part files."""
    folder.mkdir()
    parts = []
    for page, name in enumerate(PAGED, start=1):
        frame = etl.transform(fixture_bytes(name), etl.PageRequest("paged", page, 40))
        parts.append(staging.stage_part(folder, frame, {"page": page}))
    return parts


@pytest.mark.parametrize("run_rows", [17, sort.SORT_RUN_ROWS], ids=["key-ranges", "one-range"])
def test_the_batch_is_sorted_as_one_sort_of_the_raw_users(tmp_path, monkeypatch, run_rows):
    users = raw_users(*PAGED)
    parts = stage_recorded_pages(tmp_path / "stage")
    sorts = record_sorts(monkeypatch)
    sorter = sort.ExternalSort(tmp_path / "stage" / "sort", 120, run_rows)
    sorted_batch = run.sorted_batch(parts, [40, 40, 40], sorter, "paged")
    LocalFiles(str(tmp_path)).land(sorted_batch)
    report = sorted_batch.report
    assert sorts[0].runs == -(-120 // run_rows), "the batch was sorted in this many key ranges"
    batch = pl.read_parquet(tmp_path / "random_users_paged.parquet")
    assert batch.select(SORT_KEY).rows() == sorted(raw_key(u) for u in users)
    assert report["rows"] == 120 and report["unique_user_ids"] == 120
    assert_null_counts(report, users)  # counted per page as it is staged, then summed


def test_a_part_staged_before_nulls_were_counted_is_fetched_again(tmp_path):
    parts = stage_recorded_pages(tmp_path / "stage")
    # Page 2 staged with its identity but no null counts: not trusted. Staging is scratch.
    identity = staging.part_identity(Settings(), "paged", 2, 40)
    pl.read_parquet(parts[1]).write_parquet(parts[1], metadata={staging.PART_METADATA_KEY: json.dumps(identity, sort_keys=True)})
    assert not staging.trusted_part(parts[1], identity), "a part with no null counts is not trusted: it is fetched again"
    today = staging.part_identity(Settings(), "paged", 1, 40)
    assert staging.trusted_part(staging.stage_part(parts[0].parent, pl.read_parquet(parts[0]), today), today)


def test_parts_are_split_into_key_ranges_while_the_run_goes_on(tmp_path):
    users = raw_users(*PAGED)
    parts = stage_recorded_pages(tmp_path / "stage")
    sorter = sort.ExternalSort(tmp_path / "sort", rows=120, run_rows=17, group_rows=40)
    sorter.add(parts[2], 40)  # pages finish out of order at concurrency > 1
    pieces = list((tmp_path / "sort").glob("group-*/__run=*/*.parquet"))
    assert len({piece.parent.name for piece in pieces}) > 3, "a group's worth of rows is split at once, before the batch is landed"
    assert pl.scan_parquet(pieces, hive_partitioning=False).select(pl.len()).collect().item() == 40
    sorter.add(parts[0], 40)
    ordered = sorter.ordered(parts).collect()  # page 2 was never added: ordered() splits it too
    assert ordered.select(SORT_KEY).rows() == sorted(raw_key(u) for u in users)


def test_the_sort_key_orders_as_the_columns_do_even_with_nul_characters(tmp_path):
    # A NUL inside a name must not let a row land in the wrong key range: compare with Python's tuple order.
    names = ["", "A", "A\x00", "A\x00B", "A\x01", "AB", "\x00", "\x00\x00", "\x01", "é", "Z"]
    rows = [(nat, last, first, f"id-{i:04d}") for i, (nat, last, first) in enumerate(itertools.product(["", "A", "A\x00"], names, names))]
    frame = pl.DataFrame(rows, schema=list(SORT_KEY), orient="row")
    assert frame.sort(sort.sort_key()).rows() == sorted(rows)
    folder = tmp_path / "stage"
    folder.mkdir()
    half = len(rows) // 2
    parts = [frame[:half].write_parquet(folder / "a.parquet") or folder / "a.parquet", frame[half:].write_parquet(folder / "b.parquet") or folder / "b.parquet"]
    ordered = sort.ExternalSort(tmp_path / "sort", rows=len(rows), run_rows=25, group_rows=25).ordered(parts)
    assert ordered.collect().rows() == sorted(rows)


def test_the_users_landed_do_not_depend_on_concurrency(api, tmp_path, settings):
    one = etl.run(settings(n=95, seed="paged", page_size=10, concurrency=1, output_dir=str(tmp_path / "c1")))
    four = etl.run(settings(n=95, seed="paged", page_size=10, concurrency=4, output_dir=str(tmp_path / "c4")))
    a, b = pl.read_parquet(one.path), pl.read_parquet(four.path)
    users = served_users("paged", 95, 10)
    assert_rows_are(a, users)
    assert a.select(SORT_KEY).rows() == sorted(map(raw_key, users))
    assert a.drop("ingested_at").equals(b.drop("ingested_at"))


def test_a_run_stopped_by_the_rate_limit_resumes_with_only_the_missing_pages(api, out, settings):
    api.script(*[rate_limited()] * 20)  # page 1 is refused for longer than --max-wait
    with pytest.raises(etl.EtlError, match="HTTP 429, rate limited for"):
        etl.run(settings(n=30, seed="paged", page_size=10, concurrency=1, max_wait=0.2))
    api.clear()
    etl.run(settings(n=30, seed="paged", page_size=10, concurrency=1))
    assert sorted(int(r.params["page"]) for r in api.requests) == [1, 2, 3]
    api.clear()
    # Now stop it at page 2: page 1 stays staged, and the next run asks for 2 and 3 only.
    (out / "random_users_paged.parquet").unlink()
    api.script(normal(), *[rate_limited()] * 20)
    with pytest.raises(etl.EtlError, match="page 2"):
        etl.run(settings(n=30, seed="paged", page_size=10, concurrency=1, max_wait=0.2))
    api.clear()
    batch = etl.run(settings(n=30, seed="paged", page_size=10, concurrency=1))
    assert sorted(int(r.params["page"]) for r in api.requests) == [2, 3]
    assert (batch.pages_fetched, batch.pages_reused) == (2, 1)
    assert pl.read_parquet(out / "random_users_paged.parquet")["user_id"].n_unique() == 30


def test_the_rate_limit_pauses_every_worker(api, settings, caplog):
    wait = 0.5
    api.script(rate_limited())
    with caplog.at_level("WARNING", logger="random_user_etl"):
        batch = etl.run(settings(n=80, seed="paged", page_size=10, concurrency=4, rate_limit_wait=wait))
    assert batch.rows == 80
    arrivals = [r.at for r in api.requests]
    limited = next(r.at for r in api.requests if r.answer == "status")
    # The other three workers may each have had a request on the wire when the 429 came (on a loaded
    # machine they can land well after it); no new one starts during the pause.
    during = [t for t in arrivals if limited < t < limited + wait - 0.05]
    assert len(during) <= 3, f"requests sent during the pause at {[round(t - limited, 3) for t in during]}"
    assert any("rate limited" in r.message and "pausing all requests" in r.message for r in caplog.records)


def test_progress_is_one_line_per_page_off_a_terminal(api, out, raw, cli):
    result = cli("--n", 30, "--seed", "paged", "--page-size", 10, env=fast_env(api.url, out, raw))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " done: " in line]
    assert len(lines) == 3
    assert all("users/s" in line and "left" in line for line in lines)
    assert "30/30 users (100%)" in lines[-1]


def test_progress_is_a_bar_on_a_terminal(api, out, raw):
    import pty

    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a size
    job = run_cli("--n", "30", "--seed", "paged", "--page-size", "10", env=fast_env(api.url, out, raw), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert job.returncode == 0
    assert b"30.0/30.0" in shown and b"users" in shown and b"\r" in shown, shown  # tqdm redraws in place
    assert b" done: " not in shown


def test_staged_parts_are_never_read_as_data(api, out, settings):
    etl.run(settings(seed="pura"))
    # Page 1 of "paged" lands in staging, page 2 is refused: a batch half fetched.
    api.script(normal(), *[rate_limited()] * 10)
    with pytest.raises(etl.EtlError):
        etl.run(settings(n=30, seed="paged", page_size=10, concurrency=1, retries=0, max_wait=0.2))
    assert list((out / ".staging" / "paged").glob("part-*.parquet"))
    assert batch_files(out) == ["random_users_pura.parquet"]
    lake = etl.read_processed(str(out)).collect()
    assert set(lake["seed"]) == {"pura"} and lake.height == 100


def test_a_bad_page_at_concurrency_4_stops_the_run_and_the_rerun_fetches_only_what_is_missing(api, out, settings, monkeypatch):
    # Ranges and groups of one page, so every good page is split into key ranges as soon as it is staged.
    sorts = record_sorts(monkeypatch)
    api.script(normal(), normal(), mutate(users(duplicate_first_id)))  # the third answer to arrive breaks the contract
    with pytest.raises(etl.EtlError, match=r"^page \d+: 1 contract check\(s\) failed: login\.uuid repeats in 1 records$"):
        land_sorted(settings(n=100, seed="paged", page_size=10, concurrency=4), 10, 10)
    assert batch_files(out) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("page")] == [], "fetch and staging threads are all joined"
    assert sorts[0].groups >= 1 and not (out / ".staging" / "paged" / "sort").exists(), "the failed run's key ranges are cleared"
    staged = sorted(p.name for p in (out / ".staging" / "paged").glob("part-*.parquet"))
    assert len(staged) < 10, staged  # which pages got staged first depends on the threads
    first = len(api.requests)
    again = land_sorted(settings(n=100, seed="paged", page_size=10, concurrency=4), 10, 10)
    assert again.rows == 100 and again.pages_reused == len(staged)
    asked = sorted(int(r.params["page"]) for r in api.requests[first:])
    assert asked == sorted(set(range(1, 11)) - {int(name[5:10]) for name in staged}), "staged pages are not asked for again"
    landed, served = pl.read_parquet(again.path), served_users("paged", 100, 10)
    assert_rows_are(landed, served)
    assert landed.select(SORT_KEY).rows() == sorted(map(raw_key, served))


def test_a_batch_is_refused_when_the_key_ranges_lose_a_piece(tmp_path):
    parts = stage_recorded_pages(tmp_path / "stage")
    sorter = sort.ExternalSort(tmp_path / "stage" / "sort", rows=120, run_rows=17, group_rows=40)
    for part in parts:
        sorter.add(part, 40)
    next((tmp_path / "stage" / "sort").glob("group-*/__run=*/*.parquet")).unlink()
    with pytest.raises(etl.EtlError, match=r"the sort's key ranges hold \d+ rows, expected 120"):
        LocalFiles(str(tmp_path)).land(run.sorted_batch(parts, [40, 40, 40], sorter, "paged"))
    assert not (tmp_path / "random_users_paged.parquet").exists()


def test_in_parallel_raises_a_failure_before_taking_more_work():
    taken = []

    def items():
        for item in range(10):
            taken.append(item)
            yield item

    def work(item):
        if item == 0:
            raise ValueError("page 0 is bad")
        return item

    with pytest.raises(ValueError, match="page 0 is bad"):
        list(run.in_parallel(work, items(), 2, Stop()))
    assert taken == [0, 1], "nothing more is fetched once a result has failed"
