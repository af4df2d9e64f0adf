"""Object storage: each call bounded by --timeout, the write check, a batch's upload in a process of its own."""

from __future__ import annotations

import datetime as dt
import errno
import os
import threading
from pathlib import Path
import polars as pl
import random_user_config as config
from _random_user_etl.errors import StorageError, write_error
from _random_user_etl.own_process import in_own_process
from _random_user_etl.stop import Stop


# The object each run writes beside the batches before its first request, to prove the store takes
# writes. Polars can write an object but not delete one, so it has one fixed name: each run
# overwrites it, and it is never more than one small object. Readers skip it (it is no batch).
WRITE_CHECK = ".random_user_etl-write-check"


# Set when some way of signing in is: without one, Polars asks the instance's metadata service.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def upload(path: Path, destination: str, sink: dict, storage_options: dict, stop: Stop) -> int:
    """Stream a finished batch file to an object key through Polars' cloud writer, in a process of its own, then remove the file; the object's size in bytes."""
    # Polars takes credentials, region and endpoint from the standard
    # AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    # AWS_ENDPOINT_URL). A PUT, or a multipart upload that is only completed after its last part,
    # replaces the key in one step: readers see the old batch or the new one, never part of one.
    # Polars cannot cancel an upload, and on a thread of this process one a stop left behind would go on
    # trying (--retries), and landing the batch, after the run said it stopped: a killed process cannot.
    job = {"kind": "upload", "path": str(path), "destination": destination, "sink": {**sink, "storage_options": storage_options}}
    try:
        answer = in_own_process(job, stop)
    finally:
        path.unlink(missing_ok=True)
    if "bytes" in answer:
        return answer["bytes"]
    if answer["timeout"]:
        raise timed_out(storage_options)
    raise OSError(errno.EIO, answer["said"])


def store_options(settings: config.Settings) -> dict:
    """Polars' storage_options bounding each request to object storage by --timeout, retried at most --retries times."""
    # Without them an upload the store accepts and never answers holds the run for good.
    deadline = f"{max(1, round(settings.timeout * 1000))}ms"
    return {"timeout": deadline, "connect_timeout": deadline, "max_retries": settings.retries}


def to_store(call, storage_options: dict, stop: Stop):
    """call(), one Polars call to object storage, on a thread of its own; its result; a timeout said in words; ended by `stop`."""
    # Polars holds its calling thread until the store answers, and Python runs a signal's handler only
    # on the main thread, between bytecodes: waiting here instead, a stop leaves at once. The call left
    # behind goes on until it ends or the process does: only the write check is made so, whose object
    # each run overwrites and no reader reads (the batch's upload is a process a stop kills: upload).
    outcome, done = {}, threading.Event()

    def work() -> None:
        """Run the call, keeping what it returned or raised."""
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread as it is: a panic too
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name="object-store", daemon=True)
    worker.start()
    with stop.cutting(done.set):  # the run's Stop, asked from any thread, ends this wait too
        done.wait()  # a stop signal's handler raises Stopped here
    if not outcome:  # woken by the run's end while the call goes on
        raise stop.reason()
    error = outcome.get("error")
    if isinstance(error, TimeoutError) and "timeout" in storage_options:
        raise timed_out(storage_options) from error
    if error is not None:
        raise error
    return outcome["value"]


def timed_out(storage_options: dict) -> TimeoutError:
    """A store's silence past --timeout, in words."""
    seconds = int(storage_options["timeout"].removesuffix("ms")) / 1000
    return TimeoutError(errno.ETIMEDOUT, f"no answer from the object store within {seconds:g}s (--timeout)")


def check_writable(output_dir: str, storage_options: dict, stop: Stop) -> None:
    """Before a run's first request: write the write-check object beside the batches, or raise StorageError saying why not."""
    key = f"{output_dir.rstrip('/')}/{WRITE_CHECK}"
    # Through Polars' own cloud writer, as the batch goes: the same credentials, region and endpoint.
    check = pl.LazyFrame({"checked_at": [dt.datetime.now(dt.UTC)]})
    try:
        to_store(lambda: check.sink_parquet(key, storage_options=storage_options), storage_options, stop)
    except Exception as exc:  # Polars' credential provider (boto3's, where installed) raises errors of its own too
        raise StorageError(store_refusal(exc), path=output_dir, doing="cannot write to") from exc


def store_refusal(exc: BaseException) -> str:
    """Why the store took no write, in one line; credentials missing said as such."""
    # With no credentials set, Polars asks the instance's metadata service (paths under /latest/) for them.
    if "/latest/" in str(exc) and not any(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        return "no AWS credentials are set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role), and the instance's metadata service gave none"
    return write_error(exc)


def object_exists(key: str, storage_options: dict, stop: Stop) -> bool:
    """True when an object is at `key`; StorageError when the store cannot tell."""
    try:
        # A GET of the footer: the key's HEAD, through Polars' cloud I/O, bounded as every call to the store.
        to_store(lambda: pl.read_parquet_metadata(key, storage_options=storage_options), storage_options, stop)
    except FileNotFoundError:
        return False
    except Exception as exc:  # refused, unreachable, or not a parquet file: something may be there
        raise StorageError(write_error(exc), path=key, doing="cannot tell whether a batch is at") from exc
    return True
