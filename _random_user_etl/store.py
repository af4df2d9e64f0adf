"""The lake: where a batch lands, writing it sorted, locally or to object storage, and listing what landed."""

from __future__ import annotations

import datetime as dt
import errno
import fnmatch
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
import polars as pl
from polars.io.plugins import register_io_source
import random_user_config as config
from _random_user_etl.places import is_remote
from _random_user_etl.shown import shorten
from schemas import OUTPUT_SCHEMA, QUALITY_METADATA_KEY, UTC_INSTANT
from _random_user_etl.errors import StorageError, panic_text_silenced, write_error
from _random_user_etl.folders import fresh_temp, write_atomically, write_to
from _random_user_etl import sort, upload as uploader
from _random_user_etl.sort import SORT_RUN_ROWS
from _random_user_etl.staging import quality_report, sort_folder


BATCH_GLOB = "random_users_*.parquet"


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


def batch_path(output_dir: str, seed: str) -> str:
    """Where a seed's batch lands; the seed is checked, so the path never leaves the folder."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise StorageError(f"seed '{shorten(seed)}' is not safe as a file name: it {config.seed_rule()}")
    return f"{output_dir.rstrip('/')}/random_users_{seed}.parquet"


def batch_exists(destination: str, storage_options: dict | None = None) -> bool:
    """True when something is at a batch's path or key; StorageError when the store cannot tell."""
    if not is_remote(destination):
        return os.path.lexists(destination)  # a link, even a dangling one, is something there
    options = storage_options or {}
    try:
        # A GET of the footer: the key's HEAD, through Polars' cloud I/O, bounded as every call to the store.
        to_store(lambda: pl.read_parquet_metadata(destination, storage_options=options), options)
    except FileNotFoundError:
        return False
    except Exception as exc:  # refused, unreachable, or not a parquet file: something may be there
        raise StorageError(write_error(exc), path=destination, doing="cannot tell whether a batch is at") from exc
    return True


def write_batch(
    parts: list[Path],
    destination: str,
    ingested_at: dt.datetime,
    expected_rows: int,
    run_rows: int = SORT_RUN_ROWS,
    sorter: sort.ExternalSort | None = None,
    part_rows: list[int] | None = None,
    storage_options: dict | None = None,
) -> tuple[dict, int]:
    """Assemble staged parts into the sorted batch file with the streaming engine, atomically: its quality report and size in bytes."""
    # `sorter` is the run's ExternalSort if it already split some parts; `part_rows`, each part's
    # rows where known, so the sort need not open a part to count them.
    report, dropped = quality_report(parts)
    staged = report["rows"] + report["duplicate_users_dropped"]
    if staged != expected_rows:
        raise StorageError(f"staged parts hold {staged} rows, expected {expected_rows}")
    sorter = sorter or sort.ExternalSort(sort_folder(parts[0].parent), staged, run_rows)
    ordered = sorter.ordered(parts, part_rows)
    if dropped.height:  # a user served on several pages, identically, lands once: from the first of them
        copies = dropped.select(pl.struct("user_id", "page")).to_series().implode()
        ordered = ordered.filter(~pl.struct("user_id", "page").is_in(copies))
    batch = ordered.with_columns(ingested_at=pl.lit(ingested_at, UTC_INSTANT))
    sink: dict[str, Any] = dict(
        compression="zstd",
        compression_level=1,  # faster than the default level, and no larger (benchmarks/README.md)
        metadata={QUALITY_METADATA_KEY: json.dumps(report)},
        engine="streaming",
        row_group_size=run_rows,
    )
    # A stop signal during the sink ends it at the next key range (ExternalSort.ordered), or else is
    # raised by its handler as the sink returns: the temp file is removed, never moved into place.
    if is_remote(destination):
        # Polars completes an upload whose source failed, with the rows sent so far at the key (2.1):
        # the batch is written whole to a local file first, and only a finished file is uploaded.
        temp = fresh_temp(parts[0].parent, "batch.parquet", 0o600)
        try:
            write_to(temp, lambda file: batch.sink_parquet(file, **sink))  # read straight back: not fsynced
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return report, upload(temp, destination, sink, storage_options or {})
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    write = lambda file: batch.sink_parquet(file, **sink)
    write_atomically(final, write, temp_dir=parts[0].parent, mode=0o666, sync=True)  # analysts read the lake
    return report, final.stat().st_size


def upload(path: Path, destination: str, sink: dict, storage_options: dict) -> int:
    """Stream a finished batch file to an object key through Polars' cloud writer, in a process of its own, then remove the file; the object's size in bytes."""
    # Polars takes credentials, region and endpoint from the standard
    # AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    # AWS_ENDPOINT_URL). A PUT, or a multipart upload that is only completed after its last part,
    # replaces the key in one step: readers see the old batch or the new one, never part of one.
    # Polars cannot cancel an upload, and on a thread of this process one a stop left behind would go on
    # trying (--retries), and landing the batch, after the run said it stopped: a killed process cannot.
    job = {"path": str(path), "destination": destination, "sink": {**sink, "storage_options": storage_options}}
    try:
        answer = in_own_process(job)
    finally:
        path.unlink(missing_ok=True)
    if "bytes" in answer:
        return answer["bytes"]
    if answer["timeout"]:
        raise timed_out(storage_options)
    raise OSError(errno.EIO, answer["said"])


def in_own_process(job: dict) -> dict:
    """Run the upload job in a child process (the uploader module) and give its outcome; a stop kills it first."""
    root = str(Path(__file__).resolve().parent.parent)  # where _random_user_etl is, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    # -P: no module of the working folder is imported in place of Polars' or the job's.
    child = subprocess.Popen(
        [sys.executable, "-P", "-m", uploader.__name__],
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
        # a job killed by SIGKILL, which runs no handler, takes its upload with it.
        stdin.write(json.dumps(job).encode() + b"\n")
        stdin.flush()
        said = stdout.read()  # a stop signal's handler raises Stopped here
    finally:
        if said is None:
            child.kill()  # stopped: the upload ends now, and no try of it reaches the store after
        stdin.close()
        child.wait()
    lines = said.decode(errors="replace").strip().splitlines()
    if child.returncode != 0 or not lines:
        return {"timeout": False, "said": f"the upload's process ended with status {child.returncode} and no answer"}
    return json.loads(lines[-1])


def store_options(settings: config.Settings) -> dict:
    """Polars' storage_options bounding each request to object storage by --timeout, retried at most --retries times."""
    # Without them an upload the store accepts and never answers holds the run for good.
    deadline = f"{max(1, round(settings.timeout * 1000))}ms"
    return {"timeout": deadline, "connect_timeout": deadline, "max_retries": settings.retries}


def to_store(call, storage_options: dict):
    """call(), one Polars call to object storage, on a thread of its own; its result; a timeout said in words."""
    # Polars holds its calling thread until the store answers, and Python runs a signal's handler only
    # on the main thread, between bytecodes: waiting here instead, a stop leaves at once. The call left
    # behind goes on until it ends or the process does: only the write check is made so, whose object
    # each run overwrites and no reader reads (the batch's upload is a process a stop kills: upload).
    outcome = {}

    def work() -> None:
        """Run the call, keeping what it returned or raised."""
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread as it is: a panic too
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="object-store", daemon=True)
    worker.start()
    worker.join()  # a stop signal's handler raises Stopped here
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


def check_writable(output_dir: str, storage_options: dict) -> None:
    """Before a run's first request: for object storage, write the write-check object, or raise StorageError saying why not."""
    if not is_remote(output_dir):
        return
    key = f"{output_dir.rstrip('/')}/{WRITE_CHECK}"
    # Through Polars' own cloud writer, as the batch goes: the same credentials, region and endpoint.
    check = pl.LazyFrame({"checked_at": [dt.datetime.now(dt.UTC)]})
    try:
        to_store(lambda: check.sink_parquet(key, storage_options=storage_options), storage_options)
    except Exception as exc:  # Polars' credential provider (boto3's, where installed) raises errors of its own too
        raise StorageError(store_refusal(exc), path=output_dir, doing="cannot write to") from exc


def store_refusal(exc: BaseException) -> str:
    """Why the store took no write, in one line; credentials missing said as such."""
    # With no credentials set, Polars asks the instance's metadata service (paths under /latest/) for them.
    if "/latest/" in str(exc) and not any(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        return "no AWS credentials are set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role), and the instance's metadata service gave none"
    return write_error(exc)


def lake_batches(folder: Path) -> list[str]:
    """The batch files of a local lake, sorted, each checked (check_batch); a folder that cannot be listed, or an odd thing named like a batch, raises."""
    batches = []
    with os.scandir(folder) as entries:  # PermissionError naming the folder: pathlib's glob would skip it
        for entry in entries:
            if fnmatch.fnmatchcase(entry.name, BATCH_GLOB):
                # Followed, so a link to a batch reads as the batch; a FIFO would hang the reader, and
                # a folder or device is not a batch the job landed: something odd is in the lake.
                if not entry.is_file(follow_symlinks=True):
                    raise StorageError("named like a batch but not a regular file; move it out of the lake", path=entry.path)
                batches.append(str(Path(entry.path).absolute()))  # Polars reads a leading "~" as the home folder
    for batch in batches:
        check_batch(batch)
    return sorted(batches)


def check_batch(path: str) -> None:
    """Read a local batch's footer: a torn file, or one not of the contract's columns and types, raises naming it."""
    # Only the footer is read, so the lake stays a lazy scan; Polars' own words would name no file,
    # and can echo the file's last bytes.
    try:
        schema = pl.scan_parquet(path, glob=False).collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise StorageError("not a whole parquet file (cut short, or not a batch); move it out of the lake", path=path) from exc
    if "user_id" not in schema:  # every batch ever landed has it: a file without is not one (it would read as null rows)
        raise StorageError("holds no user_id column, so it is not a batch; move it out of the lake", path=path)
    for name, dtype in schema.items():
        if name in OUTPUT_SCHEMA and dtype != OUTPUT_SCHEMA[name]:
            raise StorageError(f"column {name} is {dtype}, not {OUTPUT_SCHEMA[name]} as in a batch; move it out of the lake", path=path)


# How every batch is read: a column added to the contract later reads as null in older batches.
LAKE_SCAN: dict[str, Any] = dict(schema=OUTPUT_SCHEMA, missing_columns="insert", extra_columns="ignore")


def scan_batches(batches: list[str] | str, storage_options: dict | None = None) -> pl.LazyFrame:
    """A lake's batches (a local lake's checked files, or an object lake's pattern) as one lazy frame; one that fails as it is read raises naming it."""
    # A footer read whole says nothing of the pages under it: a rotted one fails only at collect,
    # where Polars names no file, or panics (PanicException, not an Exception). The rows are still
    # one scan of every file, the query's columns, filter and limit pushed into it.

    def rows(with_columns, predicate, n_rows, batch_size):
        """The batches' rows as the query asks for them (Polars' io-source protocol)."""
        try:
            yield from lake_query(batches, storage_options, with_columns, predicate, n_rows).collect_batches(chunk_size=batch_size)
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
            unreadable = first_unreadable(listed(batches, storage_options), storage_options, with_columns, predicate)
            if unreadable is None:
                raise
            raise StorageError("it cannot be read whole (torn, corrupt, or not a batch); move it out of the lake", path=unreadable) from exc

    return register_io_source(rows, schema=OUTPUT_SCHEMA)


def lake_query(batches: list[str] | str, storage_options: dict | None, with_columns, predicate, n_rows) -> pl.LazyFrame:
    """The scan of `batches` (files as named, or an object lake's pattern) with a query's columns, filter and row limit."""
    frame = pl.scan_parquet(batches, glob=isinstance(batches, str), storage_options=storage_options, **LAKE_SCAN)
    if predicate is not None:
        frame = frame.filter(predicate)
    if with_columns is not None:
        frame = frame.select(with_columns)
    return frame.head(n_rows) if n_rows is not None else frame


def listed(batches: list[str] | str, storage_options: dict | None) -> list[str]:
    """The objects an object lake's pattern names, for a failure to name the one at fault ([] if they cannot be listed)."""
    if not isinstance(batches, str):
        return batches
    try:
        # Polars lists the pattern as its scan does; only its private module offers the listing alone,
        # so it is used only to name a batch that failed, and a Polars without it names none.
        from polars.io._expand_paths import _expand_paths

        return _expand_paths(batches, storage_options=storage_options).collect()["path"].to_list()
    except Exception:
        return []


def first_unreadable(batches: list[str], storage_options: dict | None, with_columns, predicate) -> str | None:
    """The first batch that fails the query read alone; None if none does."""
    # Only after a failure: each file is read again alone, with the query's columns, to find it.
    for batch in batches:
        try:
            with panic_text_silenced():  # a batch that fails here is named in the error instead
                for _ in lake_query([batch], storage_options, with_columns, predicate, None).collect_batches():
                    pass
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
            return batch
    return None


def lake_folder(output_dir: str) -> Path:
    """A local lake's folder; FileNotFoundError or NotADirectoryError naming it (a typo is not an empty lake)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder of batches", output_dir)
        raise FileNotFoundError(errno.ENOENT, "no such folder of batches (a typo, or no batch has landed there yet?)", output_dir)
    return folder
