"""Stopping: SIGTERM is handled like Ctrl-C, also when the job is PID 1 of its container,
and a stop is prompt whatever the job waits on: a request in flight, a backoff, the rate-limit pause,
a connection being opened; a stop while the batch is written lands nothing.

Each case runs the CLI in a subprocess against a fake that holds it in one kind of wait far longer
than the bound (30 s), signals it once it is there, and times the exit from the signal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
from support import HELD, assert_stopped, delivered, digests, fast_env, landed, raw_key, served_users, signalled_exit, start_cli, wait_until
from fake_api import hang, normal, rate_limited, status

import random_user_etl as etl
from _random_user_etl import store
from schemas import SORT_KEY

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]  # the job as PID 1 of a new PID namespace, as in a pod
PAGES = ["--seed", "paged", "--n", "40", "--page-size", "10", "--concurrency", "2"]

# Where the job is held: (arguments, script, what shows it is there: requests seen, a stderr line, pages staged).
WAITS = {
    # Two pages are answered and staged; the other two hang at the service, within the --timeout.
    "requests-in-flight": (PAGES + ["--timeout", str(2 * HELD)], [normal(), normal(), hang(HELD), hang(HELD)], (4, None, 2)),
    "backoff": (["--seed", "pura", "--backoff", str(HELD)], [status(503)], (1, "retry 1 of 3", 0)),
    # The first request is refused; the other worker's first one may go before the gate shuts (and is
    # served) or wait behind it for the probe, so only the refused one is sure to be seen.
    "rate-limit-pause": (PAGES + ["--rate-limit-wait", str(HELD)], [rate_limited()], (1, "pausing all requests", 0)),
}


def staged(out: Path, seed: str = "paged") -> list[str]:
    """The page parts staged for a seed."""
    return sorted(p.name for p in (out / ".staging" / seed).glob("part-*.parquet"))


def job_pid(proc: subprocess.Popen, in_namespace: bool) -> int:
    """The job's process id: unshare's only child when it runs in its own PID namespace."""
    if not in_namespace:
        return proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_until(lambda: children.read_text().split(), 10, "unshare's child")
    (child,) = children.read_text().split()
    return int(child)


def namespace_pid(pid: int) -> int:
    """The process id a process has inside its own PID namespace (the last NSpid field)."""
    status_ = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^NSpid:\s+(.*)$", status_, re.M)[1].split()[-1])


def stop_held_job(api, out, raw, tmp_path, wait: str, signum: int, in_namespace: bool = False, then: int | None = None):
    """Start the CLI, let the fake hold it in `wait`, signal it (and again with `then`); its result, stderr and seconds to exit."""
    args, script, (requests, line, parts) = WAITS[wait]
    api.script(*script)
    err = tmp_path / "stderr.txt"
    proc = start_cli(*args, env=fast_env(api.url, out, raw), log=err, prefix=UNSHARE if in_namespace else ())
    try:
        pid = job_pid(proc, in_namespace)
        wait_until(lambda: len(api.requests) >= requests, what=f"{requests} requests")
        wait_until(lambda: line is None or line in err.read_text(), what=repr(line))
        wait_until(lambda: len(staged(out)) >= parts, what=f"{parts} pages staged")
        if in_namespace:
            assert namespace_pid(pid) == 1, "the job is not PID 1 of its namespace"
        time.sleep(0.1)  # let it settle into the wait
        os.kill(pid, signum)
        signalled = time.monotonic()
        if then is not None:
            # Once the first is taken, not a fixed time later: two signals pending at once are run by
            # Python in signal-number order (SIGINT first), not in the order they came.
            wait_until(lambda: delivered(pid, signum), what=f"{signal.Signals(signum).name} taken")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, then)
        try:
            code = proc.wait(timeout=HELD)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {HELD}s after {signal.Signals(signum).name}")
        return code, err.read_text(), time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("wait", WAITS)
def test_a_stop_is_prompt_whatever_the_job_waits_on(api, out, raw, tmp_path, wait, signum):
    code, stderr, seconds = stop_held_job(api, out, raw, tmp_path, wait, signum)
    assert_stopped(code, stderr, seconds, signum)
    assert list(out.glob(store.BATCH_GLOB)) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_run_keeps_its_staged_pages_and_the_next_run_fetches_only_the_rest(api, out, raw, tmp_path, settings, signum):
    code, stderr, seconds = stop_held_job(api, out, raw, tmp_path, "requests-in-flight", signum)
    assert_stopped(code, stderr, seconds, signum)
    kept = {int(name[5:10]) for name in staged(out)}
    assert len(kept) == 2
    api.clear()
    batch = etl.run(settings(n=40, seed="paged", page_size=10, concurrency=2))
    assert (batch.pages_fetched, batch.pages_reused) == (2, 2)
    assert sorted(int(r.params["page"]) for r in api.requests) == sorted({1, 2, 3, 4} - kept)


@pytest.mark.parametrize("wait", ["requests-in-flight", "backoff"])
def test_sigterm_stops_the_job_when_it_is_pid_1_as_in_its_container(api, out, raw, tmp_path, wait):
    # PID 1 gets no signal it has no handler for: with none, SIGTERM would be dropped and the pod killed.
    code, stderr, seconds = stop_held_job(api, out, raw, tmp_path, wait, signal.SIGTERM, in_namespace=True)
    assert_stopped(code, stderr, seconds, signal.SIGTERM)
    if wait == "requests-in-flight":
        assert len(staged(out)) == 2


@pytest.mark.parametrize("first, then", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)], ids=["TERM-then-INT", "INT-then-TERM"])
def test_a_second_signal_during_a_stop_changes_neither_the_status_nor_the_line(api, out, raw, tmp_path, first, then):
    code, stderr, seconds = stop_held_job(api, out, raw, tmp_path, "rate-limit-pause", first, then=then)
    assert_stopped(code, stderr, seconds, first)


@contextlib.contextmanager
def connects_that_hang():
    """A loopback address whose connects hang: a listener that never accepts, its queue filled by us."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # more than the queue holds: the kernel drops later SYNs, so a connect waits
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api/1.4/"
    finally:
        for sock in (*fillers, listener):
            sock.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_is_prompt_while_a_connection_is_being_opened(out, raw, tmp_path, signum):
    # No socket to shut yet: the deadline's timer cannot cut a connect, so the stop must not wait for it.
    err = tmp_path / "stderr.txt"
    with connects_that_hang() as url:
        proc = start_cli(env=fast_env(url, out, raw, RANDOM_USER_TIMEOUT=str(2 * HELD), RANDOM_USER_SEED="pura"), log=err)
        try:
            wait_until(lambda: any(c.status == psutil.CONN_SYN_SENT for c in psutil.Process(proc.pid).net_connections()), what="a connect under way")
            time.sleep(0.1)
            proc.send_signal(signum)
            signalled = time.monotonic()
            code = proc.wait(timeout=HELD)
            seconds = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_stopped(code, err.read_text(), seconds, signum)


# ---------------------------------------------------------------- a stop while the batch is written

# The CLI with the first key range of the batch's write held on the Polars thread that logs it: the
# main thread is then inside the sink, one Polars call, where Python runs no signal handler. argv:
# the file whose arrival lets the range go (".held" beside it says it is held), the job's arguments.
HELD_IN_THE_SINK = f"""
import logging, os, sys, time
import random_user_etl as etl
release = sys.argv[1]

class Hold(logging.Filter):
    def filter(self, record):
        if record.getMessage().startswith("writing key range 1 of"):
            open(release + ".held", "w").close()
            deadline = time.monotonic() + {HELD}
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.002)
        return True

logging.getLogger("random_user_etl").addFilter(Hold())
etl.exit_now(etl.main(sys.argv[2:]))
"""

LARGE = ["--seed", "held", "--n", "25000"]  # five pages of 5,000: three key ranges, one group split while fetching


def lake(files: dict[str, str]) -> dict[str, str]:
    """The files of an output folder that are not the job's staging."""
    return {name: digest for name, digest in files.items() if not name.startswith(".staging/")}


def test_a_stop_while_the_batch_is_written_lands_nothing_and_the_next_run_lands_it_whole(api, out, raw, tmp_path, cli):
    env = fast_env(api.url, out, raw)
    assert cli(*LARGE, env=env).returncode == 0  # an earlier batch of the seed: the stopped run must leave it as it is
    before, kept = digests(landed(out)), digests(landed(raw))
    earlier = pl.read_parquet(out / "random_users_held.parquet")
    served = served_users("held", 25000, 5000)
    assert earlier.select(SORT_KEY).rows() == sorted(map(raw_key, served))

    release, err = tmp_path / "release", tmp_path / "stderr.txt"
    proc = start_cli("-v", *LARGE, env=env, log=err, via=(HELD_IN_THE_SINK, release))
    try:
        wait_until(lambda: Path(f"{release}.held").exists() or proc.poll() is not None, what="the batch's write under way")
        assert proc.poll() is None, err.read_text()

        def let_go():
            wait_until(lambda: delivered(proc.pid, signal.SIGTERM), what="SIGTERM taken")
            release.touch()  # the write goes on, with the stop already noted

        code, seconds = signalled_exit(proc, signal.SIGTERM, let_go)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert_stopped(code, stderr, seconds, signal.SIGTERM)
    # The write stops at the next key range, not once the sink is done (check_stop).
    assert "writing key range 1 of 3" in stderr and "writing key range 2 of" not in stderr, stderr
    # The signal came before the batch was moved into place, so it never was: the earlier batch and
    # the raw answers replay reads for it stand byte for byte, no temp file is left, and every staged
    # page is kept for the next run.
    after = digests(landed(out))
    assert lake(after) == lake(before), stderr
    assert {k: v for k, v in digests(landed(raw)).items() if k in kept} == kept
    assert not [name for name in after if name.endswith(".tmp")], stderr
    assert staged(out, "held") == [f"part-{page:05d}.parquet" for page in range(1, 6)]
    assert list((out / ".staging" / "held" / "sort").glob("group-*")), "the sort's scratch, left for the next run to clear"

    api.clear()
    rerun = cli(*LARGE, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert api.requests == [], "the next run fetched pages the stopped one had staged"
    batch = pl.read_parquet(out / "random_users_held.parquet")
    assert batch.drop("ingested_at").equals(earlier.drop("ingested_at"))
    assert batch["ingested_at"].n_unique() == 1 and batch["ingested_at"][0] > earlier["ingested_at"][0]
    assert not (out / ".staging" / "held").exists()


def test_a_signal_once_a_failed_page_wound_the_run_down_is_not_taken_for_a_stop():
    # The failure is the run's: a stop signal while its workers wind down must not turn exit 1 into 143.
    stop = etl.Stop()
    with etl.stop_on_signals(stop):
        stop.wind_down()
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line, in this thread
        assert not stop.asked
