"""The external sort, on Polars' unstable plugin API (register_io_source, PartitionBy; lake reads the lake through the first too)."""

from __future__ import annotations

import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any
import polars as pl
from polars.io.plugins import register_io_source
from schemas import SORT_KEY
from _random_user_etl.errors import StorageError
from _random_user_etl.folders import found_own_folder, full_disk_said, own_folder
from _random_user_etl.stop import Stop

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text

SORT_RUN_ROWS = 10_000  # rows sorted in memory at once: assembly memory stays flat whatever n


SCATTER_ROWS = 20_000  # rows of staged parts split into key ranges together: fewer, larger pieces


# Staged parts read together at most: Polars holds some 40 kB for each file one read opens, whatever
# its rows: memory would follow the number of pages, not the rows (benchmarks/README.md).
GROUP_FILES = 200


# Scratch files of the external sort are read once, soon after: uncompressed parquet is the
# cheapest to write and read back (Arrow IPC and zstd were slower: see benchmarks/README.md).
SCRATCH: dict[str, Any] = dict(compression="uncompressed", statistics=False)


def sort_key() -> pl.Expr:
    """The sort key as one string that orders exactly as the key's columns do, even with NULs in them."""
    # Each field ends in "\x00\x00", which sorts before anything else, so a shorter field orders
    # first, as in a tuple; a NUL inside a field becomes "\x00\x01", after that end and before "\x01".
    fields = [pl.col(name).str.replace_all("\x00", "\x00\x01", literal=True) for name in SORT_KEY]
    return pl.concat_str(fields, separator="\x00\x00")


def read_parts(parts: list[Path]) -> pl.DataFrame:
    """Staged parts in one frame, read GROUP_FILES at a time: memory follows their rows, not how many files hold them."""
    groups = (pl.read_parquet(parts[start : start + GROUP_FILES], glob=False).rechunk() for start in range(0, len(parts), GROUP_FILES))
    return pl.concat(groups, rechunk=True)


def rows_in(files: list[Path]) -> int:
    """The rows of some scratch or staged files, read together (at most GROUP_FILES of them: Polars holds some 40 kB per file a read opens)."""
    return pl.scan_parquet(files, hive_partitioning=False, glob=False).select(pl.len()).collect().item()


class ExternalSort:
    """The batch in key order, sorting at most about `run_rows` rows in memory at once."""

    # Staged parts are split into key ranges in groups as they arrive (add), while the run still
    # waits on the network; at the end (ordered) each range is sorted alone, in key order.

    def __init__(self, work: Path, rows: int, run_rows: int = SORT_RUN_ROWS, group_rows: int = SCATTER_ROWS, stop: Stop | None = None):
        self.work, self.rows, self.run_rows, self.runs = work, rows, run_rows, math.ceil(rows / run_rows)
        self.stop = stop or Stop()  # the run's: its stop ends the batch's write at the next key range
        if found_own_folder(work):
            shutil.rmtree(work)  # a killed run's ranges: this run splits its parts afresh
        # Parts are split a group at a time, so each split writes one piece per range, not thousands of slivers.
        self.group_rows = max(run_rows, group_rows)
        self.bounds: pl.Series | None = None
        self.waiting: list[Path] = []
        self.waiting_rows, self.groups = 0, 0
        self.taken: set[Path] = set()
        self.lock = threading.Lock()

    def add(self, part: Path, rows: int) -> None:
        """Take one staged part; once a group's worth has come, split the group into key ranges."""
        if self.runs <= 1:
            return  # one range: ordered() sorts the parts directly
        with self.lock:
            self.taken.add(part)
            self.waiting.append(part)
            self.waiting_rows += rows
            # What is left short of a group when the run ends, ordered() splits as it starts.
            if self.waiting_rows >= self.group_rows or len(self.waiting) >= GROUP_FILES:
                self._split()

    def _keyed(self, group: list[Path]) -> pl.LazyFrame:
        """A group's rows with their sort key and key range; the first group's keys set the ranges."""
        # The key is kept in the pieces: one string column sorts three times faster than the four it is made of.
        rows = pl.scan_parquet(group, glob=False).with_columns(sort_key().alias("__key"))
        if self.bounds is None:
            # Bounds only balance the ranges' sizes: any bounds give the same order.
            keys = rows.select("__key").collect().get_column("__key").sort()
            self.bounds = pl.Series([keys[len(keys) * i // self.runs] for i in range(1, self.runs)], dtype=pl.String)
        return rows.with_columns(pl.lit(self.bounds).search_sorted(pl.col("__key"), side="right").alias("__run"))

    def _split(self) -> None:
        """Write the waiting parts' rows to one file per key range (under the lock)."""
        group, self.waiting, self.waiting_rows = self.waiting, [], 0
        own_folder(self.work)  # made when first needed (0700): a run that never splits leaves none behind
        # Streamed into group-N/__run=R/ by Polars: the group is never held in memory whole.
        target = pl.PartitionBy(self.work / f"group-{self.groups:05d}", key="__run", include_key=False)
        with full_disk_said(self.work):
            self._keyed(group).sink_parquet(target, engine="streaming", **SCRATCH)
        self.groups += 1

    def ordered(self, parts: list[Path], rows: list[int] | None = None) -> pl.LazyFrame:
        """All of `parts` in key order, each key range sorted alone (a stop signal ends it early); `rows`, each part's rows if known."""
        if self.runs <= 1:
            return read_parts(parts).lazy().sort(sort_key())  # at most run_rows rows
        known_rows: list[int | None] = list(rows) if rows else [None] * len(parts)
        for part, known in zip(parts, known_rows, strict=True):
            if part not in self.taken:  # a part the run did not add: one resumed, or staged by replay
                self.add(part, pl.scan_parquet(part, glob=False).select(pl.len()).collect().item() if known is None else known)
        with self.lock:
            # The last group is split to disk as the others were: held in memory with its key column, it
            # was the landing's peak, above the rest of the run's.
            if self.waiting:
                self._split()
        ranges: list[list[Path]] = [[] for _ in range(self.runs)]
        by_folder = {f"__run={run}": pieces for run, pieces in enumerate(ranges)}
        for piece in sorted(self.work.glob("group-*/__run=*/*.parquet")):  # one walk, not one per range
            by_folder.get(piece.parent.name, []).append(piece)  # anything else is not a range's piece
        pieces = [piece for run in ranges for piece in run]
        held = sum(rows_in(pieces[start : start + GROUP_FILES]) for start in range(0, len(pieces), GROUP_FILES))
        if held != self.rows:  # the batch is built from these pieces, so they must hold every row, once
            raise StorageError(f"the sort's key ranges hold {held} rows, expected {self.rows}")

        def ranges_in_order(with_columns, predicate, n_rows, batch_size):
            """Each key range read, sorted and handed on, in key order (Polars' io-source protocol)."""
            for run, pieces in enumerate(ranges):
                # On a thread of Polars', while the main thread waits in the sink and runs no signal handler:
                # a stop ends the write here, and Polars raises it in the main thread (nothing is moved into place).
                self.stop.check()
                log.debug("writing key range %d of %d", run + 1, self.runs)  # with -v, how far the write is
                if not pieces:
                    continue
                frame = pl.read_parquet(pieces, hive_partitioning=False, glob=False).sort("__key").drop("__key")
                if predicate is not None:
                    frame = frame.filter(predicate)
                yield frame.select(with_columns) if with_columns is not None else frame

        # One pass: each range is read, sorted and handed straight to the sink, never written back.
        # (register_io_source and PartitionBy are marked unstable in Polars 2; requirements pin
        # polars <3 and test_large.py checks the order they give against the raw JSON.)
        return register_io_source(ranges_in_order, schema=pl.scan_parquet(parts[0], glob=False).collect_schema())  # read_parquet_schema globs
