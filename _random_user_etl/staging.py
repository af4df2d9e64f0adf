"""Staged pages: their identity, which to trust on a rerun, the quality report, the seed's staging folder."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
from pathlib import Path
import polars as pl
from random_user_config import Settings
from schemas import OUTPUT_SCHEMA
from _random_user_etl.errors import StorageError, write_error
from _random_user_etl.folders import found_own_folder, is_plain_file, own_folder, own_staging_root, seed_lock, write_atomically


PART_METADATA_KEY = "random_user_etl.part"


PART_NULLS_KEY = "random_user_etl.nulls"  # a staged page's nulls per column, counted as it was staged


# Staged parts wait on disk for a rerun, so they are compressed, at zstd's fastest level (faster than
# the default level and no larger: see benchmarks/README.md); nothing reads them by predicate, so
# their statistics would go unused.
PART = dict(compression="zstd", compression_level=1, statistics=False)


def part_identity(settings: Settings, seed: str, page: int, rows: int, replayed: bool = False) -> dict:
    """What a staged part must prove about itself before a later run trusts it."""
    # A replayed page says nothing of the nationalities or page size it was asked with: it never
    # stands in for a page of a live run (a stopped replay leaves its staged pages behind).
    origin = "replay" if replayed else "service"
    return {"seed": seed, "page": page, "rows": rows, "page_size": settings.page_size, "nat": ",".join(settings.nat), "from": origin}


def part_path(folder: Path, page: int) -> Path:
    """Where page `page` of a run is staged."""
    return folder / f"part-{page:05d}.parquet"


def sort_folder(folder: Path) -> Path:
    """Where a run's external sort keeps its scratch files: inside the run's staging folder."""
    return folder / "sort"


def stage_part(folder: Path, frame: pl.DataFrame, identity: dict) -> Path:
    """Spill one transformed page to a part file that carries its identity."""
    path = part_path(folder, identity["page"])
    metadata = {
        PART_METADATA_KEY: json.dumps(identity, sort_keys=True),
        PART_NULLS_KEY: json.dumps(frame.null_count().row(0, named=True)),
    }
    write_atomically(path, lambda file: frame.write_parquet(file, metadata=metadata, **PART))
    return path


def trusted_part(path: Path, identity: dict) -> bool:
    """True when a staged part is whole and is the page this run would fetch."""
    try:
        metadata = pl.read_parquet_metadata(path)
        found = json.loads(metadata.get(PART_METADATA_KEY, "null"))
        # Read whole (one page's rows): a whole footer says nothing of a rotted page under it, which
        # would fail every later run as it lands. A page Polars cannot decode can make it panic.
        rows = pl.read_parquet(path, glob=False).height
    except (Exception, pl.exceptions.PanicException):  # a torn, rotted or foreign file is simply not trusted
        return False
    # A part staged by an older version carries no null counts: staging is scratch, so it is fetched again.
    return found == identity and rows == identity["rows"] and PART_NULLS_KEY in metadata


def pending_pages(folder: Path, settings: Settings, seed: str, sizes: list[int]) -> list[int]:
    """The pages still to fetch; staged parts that prove themselves are kept, the rest cleared."""
    todo = []
    for page, rows in enumerate(sizes, start=1):
        path = part_path(folder, page)
        if is_plain_file(path) and trusted_part(path, part_identity(settings, seed, page, rows)):
            continue  # never a link: what lands is what this job staged, nothing reached through one
        todo.append(page)
    wanted = {part_path(folder, page).name for page in range(1, len(sizes) + 1)}
    for leftover in folder.iterdir():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name not in wanted or leftover.name.endswith(".tmp"):
            leftover.unlink(missing_ok=True)
    for page in todo:
        part_path(folder, page).unlink(missing_ok=True)
    return todo


def quality_report(parts: list[Path]) -> dict:
    """What was checked of a batch: rows, unique ids, nulls per contract column."""
    # Nulls were counted from each page as it was staged (trusted_part proves the count is there);
    # only the ids are read again here.
    nulls = dict.fromkeys(OUTPUT_SCHEMA.names(), 0)
    for part in parts:
        for name, count in json.loads(pl.read_parquet_metadata(part)[PART_NULLS_KEY]).items():
            nulls[name] += count
    ids = pl.scan_parquet(parts, glob=False).select("user_id")
    # 8-byte hashes keep the distinct count small in memory; only a suspected repeat is recounted exactly.
    rows, unique = ids.select(pl.len(), pl.col("user_id").hash().n_unique()).collect(engine="streaming").row(0)
    if unique < rows:
        unique = ids.select(pl.col("user_id").n_unique()).collect(engine="streaming").item()
    return {
        "rows": rows,
        "unique_user_ids": unique,
        "nulls": nulls,
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def staging_for(settings: Settings, seed: str):
    """Hold the seed's lock and give its staging folder, refusing an output folder we cannot write."""
    try:
        root = own_staging_root(settings.output_dir)
        with seed_lock(root, seed):
            folder = own_folder(root / seed)
            found_own_folder(sort_folder(folder))  # cleared below: refused now if it is a link or another's
            stopped = False
            try:
                yield folder
            except KeyboardInterrupt:  # a stop (Stopped) leaves the sort's scratch for the next run to clear:
                stopped = True  # a large batch's is many thousand files, longer to delete than the CronJob's grace
                raise
            finally:
                if not stopped:
                    shutil.rmtree(sort_folder(folder), ignore_errors=True)  # derived scratch; the parts stay for a rerun
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a run that staged nothing leaves no folder behind
    except OSError as exc:
        raise StorageError(write_error(exc), path=exc.filename or settings.output_dir, doing="cannot write to") from exc

