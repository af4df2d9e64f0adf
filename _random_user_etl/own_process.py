"""Work run in a process of its own (python -m _random_user_etl.own_process), which a stop kills: a job on stdin, its outcome on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from _random_user_etl.stop import Stop

# The jobs run on one CPU: delta-rs writes the blocks of one stream on as many tasks at once as the
# process may use CPUs, so on two or more a file's rows land out of their key order.
ONE_CPU = {"commit", "compact"}


def in_own_process(job: dict, stop: Stop) -> dict:
    """Run `job` (its "kind" one job_function knows) in a child process and give its outcome; a stop (a signal, or the run's Stop) kills it first."""
    root = str(Path(__file__).resolve().parent.parent)  # where _random_user_etl is, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    # -P: no module of the working folder is imported in place of Polars' or the job's.
    child = subprocess.Popen(
        [sys.executable, "-P", "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None  # both asked for as pipes
    said = None
    try:
        # The job goes as one line and stdin stays open: the child leaves at once when it closes, so
        # a job killed by SIGKILL, which runs no handler, takes its child with it.
        stdin.write(json.dumps(job).encode() + b"\n")
        stdin.flush()
        # A stop signal's handler raises Stopped in the read; the run's Stop, asked from any thread, kills the child.
        with stop.cutting(child.kill):
            said = stdout.read()
    finally:
        if said is None:
            child.kill()  # stopped: the job ends now, and no try of it reaches the store after
        stdin.close()
        child.wait()
    # Its answer whatever its status: a stop that killed it after it answered (the commit made) is no failure.
    lines = said.decode(errors="replace").strip().splitlines()
    with contextlib.suppress(ValueError, IndexError):
        return json.loads(lines[-1])
    if stop.ending:  # killed by the stop before it answered: the run's end, not the job's failure
        raise stop.reason()
    return {"timeout": False, "said": f"the {job['kind']}'s process ended with status {child.returncode} and no answer"}


def leave_when_orphaned() -> None:
    """Leave at once when stdin closes: the job that started this one is gone, stopped or killed."""
    sys.stdin.read()
    os._exit(1)  # no try of the job may reach the store once its run has ended


def on_one_cpu() -> None:
    """Keep this process, and every thread it starts from now on, to one of the CPUs it may use (where the OS can say so)."""
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere delta-rs may interleave a file's rows
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[os.getpid() % len(allowed)]})  # jobs at once spread over the CPUs


def job_function(kind: str) -> Callable[[dict], dict]:
    """The function that does a job of `kind`, imported only in the child that does it."""
    if kind == "upload":
        from _random_user_etl.upload import send

        return send
    from _random_user_etl import delta  # here, after on_one_cpu (it imports deltalake only when called)

    return {"commit": delta.commit_file, "compact": delta.compact_table}[kind]


def do(job: dict) -> dict:
    """Do the job in this process: its outcome."""
    if job["kind"] in ONE_CPU:
        try:
            on_one_cpu()  # before deltalake is imported or called: it sizes its pools of threads once
        except OSError as exc:  # a sandbox that refuses it: no table file is written out of order
            return {"said": f"the {job['kind']}'s process could not keep to one CPU ({exc.strerror or type(exc).__name__})"}
    return job_function(job["kind"])(job)


if __name__ == "__main__":
    work = json.loads(sys.stdin.readline())
    threading.Thread(target=leave_when_orphaned, daemon=True).start()
    print(json.dumps(do(work)), flush=True)
