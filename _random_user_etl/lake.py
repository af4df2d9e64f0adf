"""The lake as it is read: its batches listed and checked, scanned as one lazy frame, a batch that fails named."""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path
from typing import Any
import polars as pl
from polars.io.plugins import register_io_source
from schemas import OUTPUT_SCHEMA
from _random_user_etl.errors import StorageError, panic_text_silenced


BATCH_GLOB = "random_users_*.parquet"


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
