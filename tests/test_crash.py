"""Crash safety: kill -9 mid-fetch and mid-write, two runs of one seed at once, an
output folder that cannot be written, a full disk.

The invariant everywhere: every visible random_users_*.parquet opens and is whole, and the next
run cleans up what a dead run left and lands the right data.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from support import FAST, SCRIPT, CasePool, assert_one_error_line, batch_files, digests, fast_env, landed, run_cli, served_users, start_cli, wait_until
from fake_api import FakeRandomUser, hang, mutate, normal

import random_user_etl as etl
from _random_user_etl import store
from random_user_config import Settings
from schemas import OUTPUT_SCHEMA

PAGED = ["--seed", "paged", "--n", "200", "--page-size", "40"]


# ------------------------------------------------------------------ helpers


def expected_ids(seed: str, n: int, page_size: int) -> list[str]:
    """The user ids the fake serves a run of (seed, n, page_size), sorted."""
    return sorted(u["login"]["uuid"] for u in served_users(seed, n, page_size))


def kill9(proc: subprocess.Popen) -> int:
    """SIGKILL, and reap: the process gets no chance to clean up."""
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=10)


def assert_visible_batches_whole(out: Path, rows: dict[str, int]) -> None:
    """Every visible batch opens, holds the rows of its seed once each; read_processed sees just those."""
    total = 0
    for path in sorted(out.glob(store.BATCH_GLOB)):
        seed = path.name[len("random_users_") : -len(".parquet")]
        frame = pl.read_parquet(path)  # raises on a torn or foreign file
        assert frame.height == rows[seed] and frame["user_id"].n_unique() == rows[seed], path.name
        assert frame.schema == OUTPUT_SCHEMA
        total += frame.height
    lake = etl.read_processed(str(out)).collect()
    assert lake.height == total and lake["user_id"].n_unique() == total


def leftovers(*folders: Path) -> list[str]:
    """Temp files a run left behind (write_atomically's *.tmp) anywhere under these folders."""
    return sorted(str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ kill -9


def test_kill_9_mid_fetch_shows_no_torn_batch_and_the_next_run_resumes(api, out, raw, settings, cli, tmp_path):
    etl.run(settings(seed="pura"))
    before = digests(landed(out))  # the pura batch and its seed's (empty) lock file
    api.clear()
    api.script(normal(), normal(), hang(30))  # page 3 never comes: the run is killed while it waits
    args = [*PAGED, "--concurrency", "1"]
    env = fast_env(api.url, out, raw)

    proc = start_cli(*args, env=env, log=tmp_path / "killed.txt")
    staging = out / ".staging" / "paged"
    # Page 3 is asked for while page 2 is still being staged: wait for both.
    wait_until(
        lambda: (len(api.requests) >= 3 and len(list(staging.glob("part-*.parquet"))) == 2) or proc.poll() is not None,
        15,
        "pages 1 and 2 staged, page 3 asked for",
    )
    assert kill9(proc) == -signal.SIGKILL

    assert batch_files(out) == ["random_users_pura.parquet"]
    assert_visible_batches_whole(out, {"pura": 100})
    assert {k: v for k, v in digests(landed(out)).items() if k in before} == before
    staged = sorted(p.name for p in (out / ".staging" / "paged").iterdir())
    assert staged == ["part-00001.parquet", "part-00002.parquet"]  # whole pages kept for the next run

    api.clear()
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(int(r.params["page"]) for r in api.requests) == [3, 4, 5]  # resumed: staged pages trusted
    frame = pl.read_parquet(out / "random_users_paged.parquet")
    assert sorted(frame["user_id"]) == expected_ids("paged", 200, 40)
    assert_visible_batches_whole(out, {"pura": 100, "paged": 200})
    assert not (out / ".staging" / "paged").exists() and leftovers(out, raw) == []


def test_kill_9_mid_write_never_shows_a_torn_batch_and_the_next_run_cleans_up(api, out, raw, settings, cli, tmp_path):
    n = 10_000
    etl.run(settings(seed="big", n=n, raw_dir=None))  # an earlier whole batch: a killed rerun must not tear it
    etl.run(settings(seed="pura", raw_dir=None))
    pura = digests(landed(out))["random_users_pura.parquet"]
    env = fast_env(api.url, out, raw, RANDOM_USER_RAW_DIR="off")
    args = ["--seed", "big", "--n", n]

    def writing() -> bool:  # the batch's temp file exists: the write has begun and not yet been moved into place
        return any("random_users_big" in p.name and p.name != "random_users_big.parquet" for p in out.rglob("*"))

    hits = []
    for attempt, delay in enumerate((0.0, 0.003, 0.008, 0.02)):
        proc = start_cli(*args, env=env, log=tmp_path / f"killed-{attempt}.txt")
        wait_until(lambda proc=proc: writing() or proc.poll() is not None, 30, "the batch's write begun", step=0.0005)
        seen = writing()
        time.sleep(delay)
        code = kill9(proc)
        hits.append(seen and code == -signal.SIGKILL)
        assert_visible_batches_whole(out, {"big": n, "pura": 100})
        assert digests(landed(out))["random_users_pura.parquet"] == pura
    assert any(hits), "no kill landed while the batch was being written"

    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    frame = pl.read_parquet(out / "random_users_big.parquet")
    assert sorted(frame["user_id"]) == expected_ids("big", 10_000, 5000)
    assert_visible_batches_whole(out, {"big": n, "pura": 100})
    assert not (out / ".staging" / "big").exists()
    assert leftovers(out) == [], f"the killed runs' temp files are still in the output folder (kills mid-write: {hits})"


# ------------------------------------------------------------------ two runs of one seed


def test_two_runs_of_one_seed_at_once_end_with_one_whole_copy(api, out, raw, tmp_path):
    release = threading.Event()

    def held(doc):  # run A's first answer waits until run B is seen waiting for the seed's lock
        release.wait(15)
        return doc

    api.script(mutate(held))
    env = fast_env(api.url, out, raw)
    args = [*PAGED, "--concurrency", "2"]
    first = start_cli(*args, env=env, log=tmp_path / "a.txt")
    wait_until(lambda: len(api.requests) >= 1, 15, "run A's first request")
    second = start_cli(*args, env=env, log=tmp_path / "b.txt")
    b_waits = "another run of seed paged is under way"
    wait_until(lambda: b_waits in (tmp_path / "b.txt").read_text(), 15, f"run B saying {b_waits!r}")
    release.set()
    assert first.wait(30) == 0, (tmp_path / "a.txt").read_text()
    assert second.wait(30) == 0, (tmp_path / "b.txt").read_text()
    assert b_waits in (tmp_path / "b.txt").read_text()

    assert batch_files(out) == ["random_users_paged.parquet"]
    frame = pl.read_parquet(out / "random_users_paged.parquet")
    assert frame.height == 200 and frame["user_id"].n_unique() == 200
    assert sorted(frame["user_id"]) == expected_ids("paged", 200, 40)
    assert_visible_batches_whole(out, {"paged": 200})
    assert leftovers(out, raw) == [] and not (out / ".staging" / "paged").exists()


# ------------------------------------------------------------------ unwritable output, full disk

LIMITED = (
    "import os, resource, signal, sys;"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"  # a write past the limit fails with EFBIG instead of killing
    "limit = int(sys.argv[1]);"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit));"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"  # limits and ignored signals survive exec
)

# id: (seed, n, page size, raw kept?, file size limit in bytes, the error line)
DISK_FULL = {
    "keeping-the-raw-answer": ("pura", 100, 5000, True, 10_000, r"cannot keep the raw answer in .*: File too large"),
    "staging-a-page": ("pura", 100, 5000, False, 10_000, r"page 1: cannot (write|stage).*(File too large|os error 27)"),
    "writing-the-batch": ("paged", 200, 40, False, 40_000, r"cannot write .*random_users_paged\.parquet"),
}


def run_unwritable(name: str, folder: Path, cli) -> SimpleNamespace:
    """One unwritable-output case in its own folder, against its own fake, the CLI run in-process."""
    out, raw = folder / "out", folder / "raw"
    with FakeRandomUser() as api:
        env = fast_env(api.url, out, raw)
        blocker = folder / "not-a-folder"
        blocker.write_text("a regular file where the output folder should be\n")
        if name == "under-a-file":
            env["RANDOM_USER_OUTPUT_DIR"] = str(blocker / "out")
        else:  # the batch's own path is taken by a folder (with a file in it)
            (out / "random_users_pura.parquet").mkdir(parents=True)
            (out / "random_users_pura.parquet" / "keep.txt").write_text("mine\n")
        before = landed(folder)
        result = cli("--seed", "pura", env=env)
        return SimpleNamespace(result=result, before=digests(before), after=digests(landed(folder)), requests=len(api.requests), leftovers=leftovers(folder))


def run_case(case: str, folder: Path) -> SimpleNamespace:
    """One full-disk case in its own folder, against its own fake: the CLI under a file-size limit."""
    name = case.split(":")[1]
    out, raw = folder / "out", folder / "raw"
    with FakeRandomUser() as api:
        env = fast_env(api.url, out, raw)
        seed, n, page_size, keep_raw, limit, _ = DISK_FULL[name]
        values = dict(FAST, api_url=api.url, output_dir=str(out), raw_dir=str(raw), seed=seed, n=n, page_size=page_size)
        etl.run(Settings(**values))  # an earlier batch of the same seed, and its raw answers
        visible = lambda: {k: v for k, v in digests(landed(out)).items() if not k.startswith(".staging/")}  # noqa: E731
        before, raw_before = visible(), digests(landed(raw))
        if not keep_raw:
            env["RANDOM_USER_RAW_DIR"] = "off"
        api.clear()
        args = ["--seed", seed, "--n", n, "--page-size", page_size]
        result = run_cli(*args, env=env, via=(LIMITED, limit, SCRIPT))
        after, raw_after, stray = visible(), digests(landed(raw)), leftovers(out, raw)
        staged = sorted((out / ".staging").rglob("part-*.parquet"))
        staged_whole = all(pl.scan_parquet(p).select(pl.len()).collect().item() > 0 for p in staged)
        rerun = etl.run(Settings(**values))  # the disk has room again: the next run lands the right data
        rerun_ids = sorted(pl.read_parquet(rerun.path)["user_id"])
        return SimpleNamespace(
            result=result,
            before=before,
            after=after,
            raw_before=raw_before,
            raw_after=raw_after,
            leftovers=stray,
            staged_whole=staged_whole,
            rerun_ok=rerun_ids == expected_ids(seed, n, page_size),
        )


@pytest.fixture(scope="module")
def cases(request, tmp_path_factory):
    with CasePool(request, "case", run_case, tmp_path_factory) as pool:
        yield pool


@pytest.mark.parametrize("case", ["unwritable:under-a-file", "unwritable:batch-path-is-a-folder"])
def test_an_output_folder_that_cannot_be_written_fails_cleanly(case, cli, tmp_path):
    # Tests may run as root, which ignores permission bits: the folder is made unusable another way.
    outcome = run_unwritable(case.split(":")[1], tmp_path, cli)
    assert outcome.result.returncode == 1, outcome.result.stderr
    if case.endswith("under-a-file"):
        assert_one_error_line(outcome.result.stderr, r"cannot write to .*not-a-folder/out: Not a directory")
        assert outcome.requests == 0  # refused before a single request
    else:
        assert_one_error_line(outcome.result.stderr, r"cannot write .*random_users_pura\.parquet: Is a directory")
    changed = {k for k in set(outcome.before) | set(outcome.after) if outcome.before.get(k) != outcome.after.get(k)}
    # Only the job's own bookkeeping may appear: the seed's lock, a staged page and its raw answer.
    assert all(k.startswith(("out/.staging/", "raw/")) for k in changed), changed
    assert outcome.leftovers == []


@pytest.mark.parametrize("case", [f"disk-full:{name}" for name in DISK_FULL])
def test_a_full_disk_fails_cleanly_and_leaves_nothing_half_written(cases, case):
    outcome = cases.result(case)
    assert outcome.result.returncode == 1, outcome.result.stderr
    assert_one_error_line(outcome.result.stderr, DISK_FULL[case.split(":")[1]][-1])
    assert outcome.after == outcome.before  # earlier batches byte for byte; staged pages aside (kept to resume)
    assert outcome.raw_after == outcome.raw_before
    assert outcome.leftovers == []
    assert outcome.staged_whole
    assert outcome.rerun_ok
