"""The lake: where a batch lands, writing it sorted, locally or to object storage, and listing what landed."""

from __future__ import annotations

import datetime as dt
import errno
import fnmatch
import json
import os
from pathlib import Path
import polars as pl
import random_user_config as config
from random_user_config import is_remote, shorten
from schemas import QUALITY_METADATA_KEY, UTC_INSTANT
from _random_user_etl.errors import StorageError, write_error
from _random_user_etl.folders import temp_file, write_atomically
from _random_user_etl import sort
from _random_user_etl.sort import SORT_RUN_ROWS
from _random_user_etl.staging import quality_report, sort_folder


BATCH_GLOB = "random_users_*.parquet"


def batch_path(output_dir: str, seed: str) -> str:
    """Where a seed's batch lands; the seed is checked, so the path never leaves the folder."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise StorageError(f"seed {shorten(seed)!r} is not safe as a file name: it {config.seed_rule()}")
    return f"{output_dir.rstrip('/')}/random_users_{seed}.parquet"


def batch_exists(destination: str) -> bool:
    """True when something is at a batch's path or key; StorageError when the store cannot tell."""
    if not is_remote(destination):
        return os.path.lexists(destination)  # a link, even a dangling one, is something there
    try:
        pl.read_parquet_metadata(destination)  # a GET of the footer: the key's HEAD, through Polars' cloud I/O
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
            batch.sink_parquet(temp, **sink)  # read straight back: no need to wait for the disk
            return report, upload(temp, destination, sink)
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    write = lambda temp: batch.sink_parquet(temp, sync_on_close="all", **sink)
    write_atomically(final, write, temp_dir=parts[0].parent, mode=0o666)  # analysts read the lake
    return report, final.stat().st_size


def upload(path: Path, destination: str, sink: dict) -> int:
    """Stream a finished batch file to an object key through Polars' cloud writer; the object's size in bytes."""
    # Polars takes credentials, region and endpoint from the standard
    # AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    # AWS_ENDPOINT_URL). A PUT, or a multipart upload that is only completed after its last part,
    # replaces the key in one step: readers see the old batch or the new one, never part of one.
    sinked = []
    pl.scan_parquet(path).sink_parquet(destination, sinked_paths_callback=sinked.append, **sink)
    return sum(path.num_bytes for args in sinked for path in args.paths)


def lake_batches(folder: Path) -> list[str]:
    """The batch files of a local lake, sorted; a folder that cannot be listed, or an odd thing named like a batch, raises."""
    batches = []
    with os.scandir(folder) as entries:  # PermissionError naming the folder: pathlib's glob would skip it
        for entry in entries:
            if fnmatch.fnmatchcase(entry.name, BATCH_GLOB):
                # Followed, so a link to a batch reads as the batch; a FIFO would hang the reader, and
                # a folder or device is not a batch the job landed: something odd is in the lake.
                if not entry.is_file(follow_symlinks=True):
                    raise StorageError("named like a batch but not a regular file; move it out of the lake", path=entry.path)
                batches.append(entry.path)
    return sorted(batches)


def lake_folder(output_dir: str) -> Path:
    """A local lake's folder; FileNotFoundError or NotADirectoryError naming it (a typo is not an empty lake)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder of batches", output_dir)
        raise FileNotFoundError(errno.ENOENT, "no such folder of batches (a typo, or no batch has landed there yet?)", output_dir)
    return folder

