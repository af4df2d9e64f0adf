"""The batch's upload, run as a process of its own (python -m _random_user_etl.upload): a job on stdin, its outcome on stdout."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import TYPE_CHECKING
import polars as pl
from _random_user_etl.errors import write_error
from _random_user_etl.pii import with_field_classes

if TYPE_CHECKING:
    from polars.io.partition import SinkedPathsCallbackArgs


def send(job: dict) -> dict:
    """Upload the finished batch file `job["path"]` to `job["destination"]`: the object's size in bytes, or why not."""
    sinked: list[SinkedPathsCallbackArgs] = []
    try:
        rows = pl.scan_parquet(job["path"], glob=False)
        # A scan loses the fields' metadata: each field's class is set again from the file's own.
        options = with_field_classes(job["sink"], rows.collect_schema())
        rows.sink_parquet(job["destination"], sinked_paths_callback=sinked.append, **options)
    except BaseException as exc:  # a panic inside Polars too: the run that started this says it in its one line
        return {"timeout": isinstance(exc, TimeoutError), "said": write_error(exc)}
    return {"bytes": sum(path.num_bytes for args in sinked for path in args.paths)}


def leave_when_orphaned() -> None:
    """Leave at once when stdin closes: the job that started this upload is gone, stopped or killed."""
    sys.stdin.read()
    os._exit(1)  # no try of the upload may reach the store once its run has ended


if __name__ == "__main__":
    work = json.loads(sys.stdin.readline())
    threading.Thread(target=leave_when_orphaned, daemon=True).start()
    print(json.dumps(send(work)), flush=True)
