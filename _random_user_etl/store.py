"""The lake: where a batch lands, writing it sorted, locally or to object storage, and listing what landed."""

from __future__ import annotations

import datetime as dt
import errno
import fnmatch
import json
import os
from pathlib import Path
import polars as pl
from polars.io.plugins import register_io_source
import random_user_config as config
from random_user_config import is_remote, shorten
from schemas import OUTPUT_SCHEMA, QUALITY_METADATA_KEY, UTC_INSTANT
from _random_user_etl.errors import StorageError
from _random_user_etl.folders import temp_file, write_atomically, write_to
from _random_user_etl import sort
from _random_user_etl.sort import SORT_RUN_ROWS
from _random_user_etl.staging import quality_report, sort_folder


BATCH_GLOB = "random_users_*.parquet"


def batch_path(output_dir: str, seed: str) -> str:
    """Where a seed's batch lands; the seed is checked, so the path never leaves the folder."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise StorageError(f"seed '{shorten(seed)}' is not safe as a file name: it {config.seed_rule()}")
    return f"{output_dir.rstrip('/')}/random_users_{seed}.parquet"


def write_batch(
    parts: list[Path],
    destination: str,
    ingested_at: dt.datetime,
    expected_rows: int,
    run_rows: int = SORT_RUN_ROWS,
    sorter: sort.ExternalSort | None = None,
    part_rows: list[int] | None = None,
) -> tuple[dict, int]:
    """Assemble staged parts into the sorted batch file with the streaming engine, atomically: its quality report and size in bytes."""
    # `sorter` is the run's ExternalSort if it already split some parts; `part_rows`, each part's
    # rows where known, so the sort need not open a part to count them.
    report = quality_report(parts)
    if report["rows"] != expected_rows:
        raise StorageError(f"staged parts hold {report['rows']} rows, expected {expected_rows}")
    if report["unique_user_ids"] != report["rows"]:
        raise StorageError(f"login.uuid repeats across pages in {report['rows'] - report['unique_user_ids']} records")
    sorter = sorter or sort.ExternalSort(sort_folder(parts[0].parent), report["rows"], run_rows)
    ordered = sorter.ordered(parts, part_rows)
    batch = ordered.with_columns(ingested_at=pl.lit(ingested_at, UTC_INSTANT))
    sink = dict(
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
        with temp_file(parts[0].parent, "batch.parquet") as temp:
            write_to(temp, lambda file: batch.sink_parquet(file, **sink))  # read straight back: not fsynced
            return report, upload(temp, destination, sink)
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    write = lambda file: batch.sink_parquet(file, **sink)
    write_atomically(final, write, temp_dir=parts[0].parent, mode=0o666, sync=True)  # analysts read the lake
    return report, final.stat().st_size


def upload(path: Path, destination: str, sink: dict) -> int:
    """Stream a finished batch file to an object key through Polars' cloud writer; the object's size in bytes."""
    # Polars takes credentials, region and endpoint from the standard
    # AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    # AWS_ENDPOINT_URL). A PUT, or a multipart upload that is only completed after its last part,
    # replaces the key in one step: readers see the old batch or the new one, never part of one.
    sinked = []
    pl.scan_parquet(path, glob=False).sink_parquet(destination, sinked_paths_callback=sinked.append, **sink)
    return sum(path.num_bytes for args in sinked for path in args.paths)


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
LAKE_SCAN = dict(schema=OUTPUT_SCHEMA, missing_columns="insert", extra_columns="ignore")


def scan_batches(batches: list[str]) -> pl.LazyFrame:
    """A local lake's checked batches as one lazy frame; a file that fails as it is read raises naming it (read_failure)."""
    # A footer read whole says nothing of the pages under it: a rotted one fails only at collect,
    # where Polars names no file, or panics (PanicException, not an Exception). The rows are still
    # one scan of every file, the query's columns, filter and limit pushed into it.

    def rows(with_columns, predicate, n_rows, batch_size):
        """The batches' rows as the query asks for them (Polars' io-source protocol)."""
        try:
            yield from lake_query(batches, with_columns, predicate, n_rows).collect_batches(chunk_size=batch_size)
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
            unreadable = first_unreadable(batches, with_columns, predicate)
            if unreadable is None:
                raise
            raise StorageError("a page of it cannot be read (the file is corrupt); move it out of the lake", path=unreadable) from exc

    return register_io_source(rows, schema=OUTPUT_SCHEMA)


def lake_query(batches: list[str], with_columns, predicate, n_rows) -> pl.LazyFrame:
    """The scan of `batches` with a query's columns, filter and row limit."""
    frame = pl.scan_parquet(batches, glob=False, **LAKE_SCAN)
    if predicate is not None:
        frame = frame.filter(predicate)
    if with_columns is not None:
        frame = frame.select(with_columns)
    return frame.head(n_rows) if n_rows is not None else frame


def first_unreadable(batches: list[str], with_columns, predicate) -> str | None:
    """The first batch that fails the query read alone; None if none does."""
    # Only after a failure: each file is read again alone, with the query's columns, to find it.
    for batch in batches:
        try:
            for _ in lake_query([batch], with_columns, predicate, None).collect_batches():
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

