"""Where a batch lands: a sink makes one sorted batch visible in one step, as a local file or an object."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Protocol
import polars as pl
import random_user_config as config
from _random_user_etl.places import is_remote
from _random_user_etl.shown import shorten
from random_user_config import Settings
from schemas import PII_CLASSES, PII_METADATA_KEY, QUALITY_METADATA_KEY, pii_field_metadata
from _random_user_etl.arrow import with_field_metadata
from _random_user_etl.errors import StorageError
from _random_user_etl.folders import fresh_temp, write_atomically, write_to
from _random_user_etl.lake import BATCH_GLOB
from _random_user_etl.objects import WRITE_CHECK, check_writable, object_exists, store_options, upload
from _random_user_etl.stop import Stop

__all__ = ["BATCH_GLOB", "WRITE_CHECK", "LocalFiles", "ObjectStore", "SortedBatch", "Sink", "batch_path", "sink_for"]


def batch_path(output_dir: str, seed: str) -> str:
    """Where a seed's batch lands; the seed is checked, so the path never leaves the folder."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise StorageError(f"seed '{shorten(seed)}' is not safe as a file name: it {config.seed_rule()}")
    return f"{output_dir.rstrip('/')}/random_users_{seed}.parquet"


@dataclasses.dataclass(frozen=True)
class SortedBatch:
    """One batch ready to land: its rows in key order (lazy), its seed and quality report, the scratch folder beside its staging, its row groups' size."""

    rows: pl.LazyFrame
    seed: str
    report: dict
    scratch: Path
    group_rows: int

    def parquet_options(self) -> dict[str, Any]:
        """How a batch file is written: zstd, its quality report and the columns' PII classes in the footer, row groups of one key range."""
        return dict(
            compression="zstd",
            compression_level=1,  # faster than the default level, and no larger (benchmarks/README.md)
            metadata={QUALITY_METADATA_KEY: json.dumps(self.report), PII_METADATA_KEY: json.dumps(PII_CLASSES)},
            engine="streaming",
            row_group_size=self.group_rows,
        )

    def field_metadata(self) -> dict[str, dict[str, str]]:
        """Each column's Arrow field metadata: its PII class."""
        return pii_field_metadata()

    def write(self, file) -> None:
        """Write the batch as parquet into an open file, through the streaming engine."""
        # A stop signal during the sink ends it at the next key range (ExternalSort.ordered), or else is
        # raised by its handler as the sink returns: the caller's temp file is removed, never moved into place.
        self.rows.sink_parquet(file, arrow_schema=with_field_metadata(self.rows.collect_schema(), self.field_metadata()), **self.parquet_options())


class Sink(Protocol):
    """What lands a batch: checked before the first request, asked whether a seed has landed, and given the sorted batch."""

    def check(self) -> None:
        """Refuse now, before any request, a destination that cannot take the batch."""

    def where(self, seed: str) -> str:
        """Where the seed's batch lands, as said in lines."""

    def holds(self, seed: str) -> bool:
        """True when a batch of the seed has landed (or something is where it would)."""

    def land(self, batch: SortedBatch) -> int:
        """Make the batch visible in one step, replacing the seed's earlier one; its size in bytes."""


class LocalFiles:
    """A folder of one parquet file per seed: each written beside the staging, synced, and moved into place."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def check(self) -> None:
        """Nothing to check before the run: the staging folder's lock proves the folder writable first."""

    def where(self, seed: str) -> str:
        """The seed's file."""
        return batch_path(self.output_dir, seed)

    def holds(self, seed: str) -> bool:
        """True when anything is at the seed's file (a link, even a dangling one, is something there)."""
        return os.path.lexists(self.where(seed))

    def land(self, batch: SortedBatch) -> int:
        """Write the file atomically, readable by the analysts; its size."""
        final = Path(self.where(batch.seed))
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(final, batch.write, temp_dir=batch.scratch, mode=0o666, sync=True)
        return final.stat().st_size


class ObjectStore:
    """A prefix of an S3 bucket holding one object per seed: each written whole locally, then uploaded in one PUT or multipart upload."""

    def __init__(self, output_dir: str, storage_options: dict, stop: Stop | None = None):
        self.output_dir, self.storage_options = output_dir, storage_options
        self.stop = stop or Stop()  # the run's: it ends a call to the store, or the upload, from any thread

    def check(self) -> None:
        """Write the write-check object: missing credentials or bucket fail before the first request."""
        check_writable(self.output_dir, self.storage_options, self.stop)

    def where(self, seed: str) -> str:
        """The seed's key."""
        return batch_path(self.output_dir, seed)

    def holds(self, seed: str) -> bool:
        """True when an object is at the seed's key."""
        return object_exists(self.where(seed), self.storage_options, self.stop)

    def land(self, batch: SortedBatch) -> int:
        """Write the batch to a local file, then upload it; the object's size."""
        # Polars completes an upload whose source failed, with the rows sent so far at the key (2.1):
        # the batch is written whole to a local file first, and only a finished file is uploaded.
        return upload(
            finished_file(batch), self.where(batch.seed), {**batch.parquet_options(), "field_metadata": batch.field_metadata()}, self.storage_options, self.stop
        )


def finished_file(batch: SortedBatch) -> Path:
    """The batch written whole, in key order, to a new file beside its staging, for a process of its own to send on."""
    temp = fresh_temp(batch.scratch, "batch.parquet", 0o600)
    try:
        write_to(temp, batch.write)  # read straight back: not fsynced
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def sink_for(settings: Settings, stop: Stop) -> Sink:
    """The sink of the settings' --table-format and --output-dir, ended by `stop`: one Delta table, else object storage for s3://, else local files."""
    remote = is_remote(settings.output_dir)
    if settings.table_format == config.DELTA:
        from _random_user_etl.delta import DeltaTable  # here: the delta module lands a SortedBatch of this one

        return DeltaTable(settings.output_dir, store_options(settings) if remote else None, stop)
    if remote:
        return ObjectStore(settings.output_dir, store_options(settings), stop)
    return LocalFiles(settings.output_dir)
