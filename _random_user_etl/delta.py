"""The lake as one Delta table: each batch one commit replacing its seed's rows, kept at the protocol plain readers handle."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
from typing import Any
import polars as pl
import random_user_config as config
from random_user_config import Settings
from schemas import OUTPUT_SCHEMA, pii_field_metadata
from _random_user_etl import __version__
from _random_user_etl.arrow import with_field_metadata
from _random_user_etl.errors import StorageError, write_error
from _random_user_etl.lake import listed
from _random_user_etl.objects import check_writable
from _random_user_etl.places import is_remote
from _random_user_etl.shown import shorten
from _random_user_etl.stop import Stop
from _random_user_etl.own_process import in_own_process
from _random_user_etl.store import SortedBatch, finished_file

TABLE = "random_users"  # the table's folder (or prefix) in --output-dir, beside where the files format lands

# The commit metadata each batch's commit carries, beside delta-rs' own (operation, predicate, metrics).
SEED_KEY, VERSION_KEY = "random_user_etl.seed", "random_user_etl.version"

# Set when the table is created: deletion vectors and column mapping would raise the protocol past
# what readers of plain Parquet files (and older engines) handle; delta-rs turns neither on unless asked.
PLAIN_READERS = {"delta.enableDeletionVectors": "false"}


def table_address(output_dir: str, name: str = TABLE) -> str:
    """Where a table of `name` is in a folder or prefix: the lake's, random_users/, unless told."""
    return f"{output_dir.rstrip('/')}/{name}"


def delta_options(storage_options: dict | None, address: str) -> dict[str, str]:
    """deltalake's storage options for `address`: Polars' bounds on each request as text, and plain http only to an endpoint given as http://."""
    return {key: str(value) for key, value in scan_options(storage_options, address).items()}


def scan_options(storage_options: dict | None, address: str) -> dict[str, Any]:
    """Polars' storage options for a scan of the table at `address`: its own, typed (max_retries a number), and plain http as for deltalake."""
    # pl.scan_delta hands them to deltalake and to its own parquet reader, which refuses max_retries as text.
    options = dict(storage_options or {})
    # Polars' client allows the endpoint of AWS_ENDPOINT_URL as given; delta-rs refuses http:// unless told.
    if is_remote(address) and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        options.setdefault("allow_http", "true")
    return options


def seed_predicate(seed: str) -> str:
    """The predicate of one seed's rows; the seed is checked, so it cannot close the quote."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise StorageError(f"seed '{shorten(seed)}' is not safe in a predicate: it {config.seed_rule()}")
    return f"seed = '{seed}'"


@contextlib.contextmanager
def failing_on_table(doing: str, address: str):
    """A deltalake failure inside as one StorageError line naming the table (its first line only: a preview of rows may follow)."""
    from deltalake.exceptions import DeltaError

    try:
        yield
    except (DeltaError, OSError) as exc:  # deltalake raises OSError for a store's refusal
        raise StorageError(write_error(exc), path=address, doing=doing) from exc


def is_table(address: str, options: dict[str, str]) -> bool:
    """True when a Delta table is at `address`."""
    from deltalake import DeltaTable

    with failing_on_table("cannot read", address):
        return DeltaTable.is_deltatable(address, options)


def has_table(address: str, storage_options: dict | None, options: dict[str, str]) -> bool:
    """True when a Delta table is at `address`; in object storage, told by Polars' listing of its log."""
    # deltalake holds the GIL while it waits on the store, Polars does not: a lake of files in object
    # storage is read without a call of deltalake's (and a stop signal is handled while its log is listed).
    if is_remote(address):
        return bool(listed(f"{address}/_delta_log/*", storage_options))
    return is_table(address, options)


def check_no_stranger(address: str, options: dict[str, str]) -> None:
    """Refuse a local path at the table's place that holds something other than a Delta table."""
    if not is_remote(address) and os.path.lexists(address) and not is_table(address, options):
        raise StorageError("something is there that is not a Delta table; move it away, or land elsewhere", path=address, doing="cannot land into")


def pii_schema() -> Any:
    """The output contract as an Arrow schema whose fields carry their PII classes: the table's at its creation."""
    return with_field_metadata(OUTPUT_SCHEMA, pii_field_metadata())


def file_stream(path: str, field_metadata: dict[str, dict[str, str]], group_rows: int) -> Any:
    """A finished batch file's rows as the Arrow stream deltalake pulls, a key range at a time, in the schema that carries the PII classes."""
    # arro3 is deltalake's own Arrow library. Polars exports its own field types but no field metadata.
    from arro3.core import RecordBatchReader

    rows = pl.scan_parquet(path, glob=False)
    schema = with_field_metadata(rows.collect_schema(), field_metadata)
    records = (record.with_schema(schema) for frame in rows.collect_batches(chunk_size=group_rows) for record in RecordBatchReader.from_stream(frame))
    return RecordBatchReader.from_batches(schema, records)


def commit_file(job: dict) -> dict:
    """A child's job: the finished batch file at job["path"] committed into the table at job["address"], replacing the rows of job["predicate"]; {} or why not."""
    from deltalake import CommitProperties, WriterProperties, write_deltalake

    try:
        write_deltalake(
            job["address"],
            file_stream(job["path"], job["field_metadata"], job["group_rows"]),
            mode="overwrite",
            predicate=job["predicate"],  # delta-rs checks every incoming row against it
            schema_mode="merge",  # a column the contract gained joins the table; older rows read it as null
            storage_options=job["options"],
            writer_properties=writer_properties(WriterProperties, job["group_rows"]),
            commit_properties=CommitProperties(custom_metadata=job["metadata"]),
        )
    except BaseException as exc:  # a panic too: the run says it in its one line
        return {"said": write_error(exc)}
    return {}


class DeltaTable:
    """One Delta table of every seed at <output-dir>/random_users: a batch lands as one commit that overwrites its seed's rows."""

    name = TABLE  # the table's folder in output_dir

    def __init__(self, output_dir: str, storage_options: dict | None = None, stop: Stop | None = None):
        self.output_dir, self.address = output_dir, table_address(output_dir, self.name)
        self.options = delta_options(storage_options, self.address)
        self.storage_options = storage_options or {}
        self.stop = stop or Stop()  # the run's: it ends the write check from any thread

    def check(self) -> None:
        """Object storage: the write check; anywhere, refuse something other than a table at its place."""
        if is_remote(self.output_dir):
            check_writable(self.output_dir, self.storage_options, self.stop)
        check_no_stranger(self.address, self.options)

    def where(self, seed: str) -> str:
        """The table (every seed lands into it)."""
        return self.address

    def holds(self, seed: str) -> bool:
        """True when the table holds rows of the seed."""
        if not is_table(self.address, self.options):
            return False
        with failing_on_table("cannot read", self.address):
            found = (
                pl.scan_delta(self.address, storage_options=scan_options(self.storage_options, self.address))
                .filter(pl.col("seed") == seed)
                .select("seed")
                .head(1)
                .collect()
            )
        return found.height > 0

    def land(self, batch: SortedBatch) -> int:
        """Commit the batch in one step, its seed's earlier rows replaced; the bytes of the files it added."""
        # In a process of its own, as an upload: deltalake's write cannot be cancelled, and a stop
        # signal's handler runs only once the main thread's call returns (the store may never answer),
        # so a stop kills the process, and the commit (one write of the log) is made or not.
        job = {
            "kind": "commit",
            "address": self.address,
            "options": self.options,
            "predicate": seed_predicate(batch.seed),
            "group_rows": batch.group_rows,
            "field_metadata": batch.field_metadata(),
            "metadata": self.commit_metadata(batch),
        }
        finished = None
        try:
            finished = finished_file(batch)  # first: a stop while it is written leaves the table as it was
            self.create()
            before = self.files()
            answer = in_own_process({**job, "path": str(finished)}, self.stop)
        finally:
            if finished is not None:
                finished.unlink(missing_ok=True)
        if "said" in answer:
            raise StorageError(answer["said"], path=self.address, doing="cannot commit to")
        return sum(size for path, size in self.files().items() if path not in before)

    def schema(self) -> Any:
        """The table's Arrow schema at its creation, its fields carrying their PII classes."""
        return pii_schema()

    def commit_metadata(self, batch: SortedBatch) -> dict[str, str]:
        """What a batch's commit records beside delta-rs' own: its seed and the job's version."""
        return {SEED_KEY: batch.seed, VERSION_KEY: __version__}

    def commits(self) -> list[dict[str, Any]]:
        """The table's commits, newest first (none before it exists)."""
        from deltalake import DeltaTable as Table

        if not is_table(self.address, self.options):
            return []
        with failing_on_table("cannot read", self.address):
            return sorted(Table(self.address, storage_options=self.options).history(), key=lambda commit: -commit["version"])

    def create(self) -> None:
        """Make the table, empty, in a commit of its own, unless it is there: runs landing at once then race only on their rows."""
        # Were the first batch to create it, every run starting on an absent table would create it too,
        # and all but one fail on the protocol the winner set.
        from deltalake import CommitProperties, DeltaTable as Table
        from deltalake.exceptions import CommitFailedError

        if is_table(self.address, self.options):
            return
        with failing_on_table("cannot create", self.address):
            try:
                # Not retried: a create retried after another's won would commit a second CREATE TABLE on top of it.
                once = CommitProperties(max_commit_retries=0)
                Table.create(self.address, self.schema(), mode="ignore", configuration=PLAIN_READERS, storage_options=self.options, commit_properties=once)
            except CommitFailedError:
                if not is_table(self.address, self.options):  # another run's create won: the table is there all the same
                    raise

    def files(self) -> dict[str, int]:
        """The table's current files and their sizes (none before it exists)."""
        from deltalake import DeltaTable as Table

        if not is_table(self.address, self.options):
            return {}
        with failing_on_table("cannot read", self.address):
            actions = pl.DataFrame(Table(self.address, storage_options=self.options).get_add_actions(flatten=True))
        return dict(zip(actions["path"].to_list(), actions["size_bytes"].to_list(), strict=True))


def scan_table(output_dir: str, storage_options: dict | None, version: int | str | dt.datetime | None) -> pl.LazyFrame | None:
    """The lake's table (at `version`, a number or a time, else its latest) as a lazy frame of the output schema; None if there is no table."""
    return scan_schema(table_address(output_dir), storage_options, version, OUTPUT_SCHEMA)


def scan_schema(address: str, storage_options: dict | None, version: int | str | dt.datetime | None, schema: pl.Schema) -> pl.LazyFrame | None:
    """The table at `address` (at `version`, else its latest) as a lazy frame of `schema`; None if there is no table."""
    options = delta_options(storage_options, address)
    if not has_table(address, storage_options, options):
        return None
    with failing_on_table("cannot read", address):
        table = pl.scan_delta(address, version=version, storage_options=scan_options(storage_options, address))
        columns = table.collect_schema()  # the log's schema: reading it reads no rows
    # A column the contract gained after the table's last batch reads as null; one it lost is not read.
    return table.select(pl.col(name).cast(dtype) if name in columns else pl.lit(None, dtype).alias(name) for name, dtype in schema.items())


def landed_seeds(output_dir: str, storage_options: dict | None) -> dict[str, str] | None:
    """Each seed the lake's table holds and the identity of its rows (the table's id, their last ingested_at, their count); None if there is no table."""
    from deltalake import DeltaTable as Table

    # Not the version that last wrote a seed: commit info goes with the log's old entries, and a
    # compaction rewrites files, not rows; the last instant a seed's rows landed, to the microsecond, stays.
    table, address = scan_table(output_dir, storage_options, None), table_address(output_dir)
    if table is None:
        return None
    with failing_on_table("cannot read", address):
        table_id = Table(address, storage_options=delta_options(storage_options, address)).metadata().id
        landed = table.group_by("seed").agg(pl.col("ingested_at").max().cast(pl.String).alias("landed"), pl.len().alias("rows")).sort("seed").collect()
    return {row["seed"]: json.dumps({"table": table_id, **row}, sort_keys=True) for row in landed.iter_rows(named=True)}


def writer_properties(properties: Any, group_rows: int) -> Any:
    """How the table's files are written: zstd at level 1 as the files format's, row groups of one key range."""
    return properties(compression="ZSTD", compression_level=1, max_row_group_size=group_rows)


@dataclasses.dataclass(frozen=True)
class Compacted:
    """What a compaction did: files before and after, the version it left, the files vacuumed."""

    files_before: int
    files_after: int
    version: int
    vacuumed: int


def compact(settings: Settings, storage_options: dict | None = None, stop: Stop | None = None) -> Compacted:
    """Merge the table's small files in one commit, then remove the files no version within --retain-hours needs."""
    address = table_address(settings.output_dir)
    options = delta_options(storage_options, address)
    if not is_table(address, options):
        raise StorageError("no Delta table is there (land a batch with --table-format delta first)", path=address, doing="cannot compact")
    stop = stop or Stop()
    stop.begin()  # a caller may keep one Stop for its jobs: a run's wind-down would kill this compaction at once
    # In a process of its own on one CPU, as a commit: its files keep each batch's rows in key order.
    answer = in_own_process({"kind": "compact", "address": address, "options": options, "retain_hours": settings.retain_hours}, stop)
    if "said" in answer:
        raise StorageError(answer["said"], path=address, doing="cannot compact")
    return Compacted(**answer)


def compact_table(job: dict) -> dict:
    """A child's job: the table at job["address"] compacted, then vacuumed of what no version within job["retain_hours"] needs; the counts, or why not."""
    from deltalake import DeltaTable as Table, WriterProperties

    try:
        table = Table(job["address"], storage_options=job["options"])
        before = len(table.file_uris())
        table.optimize.compact(writer_properties=writer_properties(WriterProperties, 1_000_000))
        # Retention below the table's own (a week) is the operator's choice: versions older than it stop being readable.
        removed = table.vacuum(retention_hours=job["retain_hours"], dry_run=False, enforce_retention_duration=False)
        table = Table(job["address"], storage_options=job["options"])
        return dataclasses.asdict(Compacted(before, len(table.file_uris()), table.version(), len(removed)))
    except BaseException as exc:  # a panic too: the run says it in its one line
        return {"said": write_error(exc)}
