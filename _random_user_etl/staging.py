"""Staged pages: their identity, which to trust on a rerun, the quality report, the seed's staging folder."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any
import polars as pl
from _random_user_etl.places import is_remote, staging_root
from _random_user_etl.shown import shorten
from random_user_config import Settings
from schemas import OUTPUT_SCHEMA
from _random_user_etl.errors import RefusedPages, failing_as, panic_text_silenced
from _random_user_etl.folders import found_own_folder, is_plain_file, own_folder, own_staging_root, seed_lock, write_atomically


PART_METADATA_KEY = "random_user_etl.part"


PART_NULLS_KEY = "random_user_etl.nulls"  # a staged page's nulls per column, counted as it was staged


# Staged parts wait on disk for a rerun, so they are compressed, at zstd's fastest level (faster than
# the default level and no larger: see benchmarks/README.md); nothing reads them by predicate, so
# their statistics would go unused.
PART: dict[str, Any] = dict(compression="zstd", compression_level=1, statistics=False)


PART_FORMAT = 2  # the job's own version of a part: a part of another format is fetched again


def part_identity(settings: Settings, seed: str, page: int, rows: int, origin: str = "service") -> dict:
    """What a staged part must prove about itself before a later run trusts it: everything that shaped its answer, and where it came from."""
    # A replayed page says nothing of the nationalities or page size it was asked with: it never
    # stands in for a page of a live run (a stopped replay leaves its staged pages behind).
    # The address (its path holds the API version) only as a hash: it may carry credentials.
    api = hashlib.sha256(settings.api_url.encode()).hexdigest()
    return {
        "seed": seed,
        "page": page,
        "rows": rows,
        "page_size": settings.page_size,
        "nat": ",".join(settings.nat),
        "from": origin,
        "api": api,
        "format": PART_FORMAT,
    }


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
        with panic_text_silenced():
            rows = pl.read_parquet(path, glob=False).height
    except (Exception, pl.exceptions.PanicException):  # a torn, rotted or foreign file is simply not trusted
        return False
    # A part without null counts is not one this job stages: staging is scratch, so it is fetched again.
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


def quality_report(parts: list[Path]) -> tuple[dict, pl.DataFrame]:
    """What was checked of a batch (rows, unique ids, nulls per contract column), and the repeated users to drop."""
    # Nulls were counted from each page as it was staged (trusted_part proves the count is there);
    # only the ids are read again here.
    nulls = dict.fromkeys(OUTPUT_SCHEMA.names(), 0)
    for part in parts:
        for name, count in json.loads(pl.read_parquet_metadata(part)[PART_NULLS_KEY]).items():
            nulls[name] += count
    # One pass: 8-byte hashes keep the distinct count small in memory, and only a suspected repeat, or a
    # second API version, is read again.
    rows, unique, versions = id_counts(parts)
    if versions > 1:
        refuse_other_versions(parts)
    dropped = served_twice(parts) if unique < rows else pl.DataFrame(schema={"user_id": pl.String, "page": pl.Int32})
    for name, count in dropped.null_count().row(0, named=True).items():
        nulls[name] -= count  # counted when its page was staged, but it does not land
    report = {
        "rows": rows - dropped.height,
        "unique_user_ids": rows - dropped.height,
        "duplicate_users_dropped": dropped.height,
        "nulls": nulls,
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return report, dropped


COUNTED_PARTS = 10  # staged parts read together for the id count: a few pages' ids at a time, whatever n


def id_counts(parts: list[Path]) -> tuple[int, int, int]:
    """The rows of the staged parts, their distinct user ids (by 8-byte hash) and API versions, read a few parts at a time."""
    # One streaming query over every part held each file's reader and a hash table per thread: at a
    # million users, more than the rest of the landing. The hashes alone are 8 MB per million rows.
    hashes, versions = [], set()
    for start in range(0, len(parts), COUNTED_PARTS):
        group = pl.scan_parquet(parts[start : start + COUNTED_PARTS], glob=False)
        read = group.select(pl.col("user_id").hash().alias("hash"), pl.col("api_version")).collect()
        hashes.append(read.get_column("hash"))
        versions.update(read.get_column("api_version").unique().to_list())
    every = pl.concat(hashes) if hashes else pl.Series("hash", [], pl.UInt64)
    return every.len(), every.n_unique(), len(versions)


def refuse_other_versions(parts: list[Path]) -> None:
    """RefusedPages for the pages served by another API version than most of the batch's: one batch, one contract."""
    # An address without a version is answered by whatever version the service runs that moment.
    served = pl.scan_parquet(parts, glob=False).select("page", "api_version").unique().collect(engine="streaming")
    counts = served.group_by("api_version").len().sort("len", "api_version", descending=True)
    if counts.height <= 1:
        return
    usual = counts["api_version"][0]
    odd = served.filter(pl.col("api_version").ne_missing(usual))
    pages, versions = odd["page"].unique().sort().to_list(), sorted({shorten(v) for v in odd["api_version"].to_list()})
    said = f"page {pages[0]} was" if len(pages) == 1 else f"pages {page_list(pages)} were"
    raise RefusedPages(
        f"{said} served by API version {', '.join(versions)}, the others by {shorten(usual)}; "
        f"{'it is' if len(pages) == 1 else 'they are'} dropped from staging, so the next run fetches {'it' if len(pages) == 1 else 'them'} again",
        pages,
    )


def served_twice(parts: list[Path]) -> pl.DataFrame:
    """The later copies of users served on more than one page, each identical to its first; RefusedPages if one is not."""
    hashed = pl.scan_parquet(parts, glob=False).with_columns(__hash=pl.col("user_id").hash())
    suspects = hashed.group_by("__hash").len().filter(pl.col("len") > 1).select("__hash").collect(engine="streaming")
    # Only the rows whose id hash repeats are held: a page or two when the service repeats one.
    repeats = hashed.filter(pl.col("__hash").is_in(suspects["__hash"].implode())).drop("__hash").collect(engine="streaming")
    repeats = repeats.filter(pl.len().over("user_id") > 1)
    # The page differs between pages by construction, and ingested_at is when a page was staged (the
    # batch's own instant replaces it as it lands); every other column comes from the user alone, or
    # is the same on every page of a batch (seed, api_version): equal in all of them is the same person.
    record = pl.struct(pl.exclude("user_id", "page", "ingested_at"))
    differing = repeats.filter(record.n_unique().over("user_id") > 1)
    if differing.height:
        pages = differing["page"].unique().sort().to_list()
        raise RefusedPages(
            f"login.uuid repeats across pages {page_list(pages)} with different records ({plural(differing['user_id'].n_unique(), 'id')}); "
            "those pages are dropped from staging, so the next run fetches them again",
            pages,
        )
    return repeats.filter(pl.col("page") != pl.col("page").min().over("user_id"))


def plural(number: int, thing: str) -> str:
    """'1 id', '3 ids'."""
    return f"{number:,} {thing}{'' if number == 1 else 's'}"


def page_list(pages: list[int], most: int = 8) -> str:
    """'1, 4 and 7', or the first `most` of many and how many more."""
    shown = ", ".join(map(str, pages[: most if len(pages) > most else -1]))
    rest = f" and {len(pages) - most} more" if len(pages) > most else f" and {pages[-1]}"
    return shown + rest if len(pages) > 1 else str(pages[0])


@contextlib.contextmanager
def staging_for(settings: Settings, seed: str, resumable: bool, hold):
    """Hold the seed's lock (another run of it waited for by hold(seconds)) and give its staging folder, refusing one we cannot write; cleared once landed."""
    # Not `resumable` (a replay): no part staged before stands in for one, so the folder starts empty,
    # and a failure clears what was staged; a stop leaves it as a live run's, for the next run to clear.
    landed = False
    with failing_as("cannot write to", settings.output_dir, by_filename=True):
        with seed_lock(lambda: own_staging_root(settings.output_dir), seed, hold) as forget:
            folder = own_folder(staging_root(settings.output_dir).absolute() / seed)
            found_own_folder(sort_folder(folder))  # cleared below: refused now if it is a link or another's
            if not resumable:
                shutil.rmtree(folder)
                folder.mkdir(0o700)  # as own_folder makes it: a replay stopped here leaves no folder others may write in
            stopped = False
            try:
                yield folder
                landed = True
            except KeyboardInterrupt:  # a stop (Stopped) leaves the sort's scratch for the next run to clear:
                stopped = True  # a large batch's is many thousand files, longer to delete than the CronJob's grace
                raise
            except BaseException:
                if not resumable:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            finally:
                if landed:
                    shutil.rmtree(folder, ignore_errors=True)  # the batch is in place: its parts are done with
                elif not stopped:
                    shutil.rmtree(sort_folder(folder), ignore_errors=True)  # derived scratch; the parts stay for a rerun
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a run that staged nothing leaves no folder behind
                if landed and is_remote(settings.output_dir):
                    forget()  # object storage stages in the shared temp folder: a run that landed leaves nothing there
        if landed and is_remote(settings.output_dir):
            tidy_private_staging(folder.parent)


def tidy_private_staging(root: Path) -> None:
    """Remove object storage's private staging folders if nothing is left in them (a run of another seed may be)."""
    for folder in (root, root.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone: another run's, or made again by one starting now
            return
