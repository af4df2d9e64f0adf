"""The analyst lake: the operator's key and its id, person_key, each column's treatment, k-anonymity suppression, one analyst file (or table commit) per batch."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any
import polars as pl
import random_user_config as config
from random_user_config import SettingsError
from schemas import DECADE, KEEP, OUTPUT_SCHEMA, PERSON_KEY, PII_CLASSES, PII_METADATA_KEY, QUASI, TREATMENTS, Dtype
from _random_user_etl.arrow import with_field_metadata
from _random_user_etl.delta import SEED_KEY, DeltaTable, landed_seeds, scan_schema, scan_table, table_address
from _random_user_etl.errors import StorageError, failing_as, write_error
from _random_user_etl.folders import own_staging_root
from _random_user_etl.lake import BATCH_GLOB, LAKE_SCAN, lake_batches, lake_folder, scan_batches
from _random_user_etl.places import is_remote
from _random_user_etl.stop import Stop
from _random_user_etl.store import LocalFiles, ObjectStore, SortedBatch

log = logging.getLogger("random_user_etl")

KEY_VARIABLE = "RANDOM_USER_PSEUDONYM_KEY"  # the key's text
KEY_FILE_VARIABLE = "RANDOM_USER_PSEUDONYM_KEY_FILE"  # a file holding the key, as a mounted Secret gives it
SHORTEST_KEY = 32  # bytes: HMAC-SHA256's own block of strength
ALGORITHM = "HMAC-SHA256"
KEY_ID_LABEL = b"random_user_etl pseudonym key id"
PSEUDONYM_METADATA_KEY = "random_user_etl.pseudonym"  # an analyst file's key id, algorithm, k, source and suppressed rows
ANALYST_GLOB = "pseudonymised_users_*.parquet"
ANALYST_TABLE = "pseudonymised_users"  # the analyst table's folder in the target, with --table-format delta
WRITE_FAILURES = (OSError, pl.exceptions.PolarsError)  # what making the target, or writing an analyst file into it, can raise


@dataclasses.dataclass(frozen=True)
class PseudonymKey:
    """The operator's key: never shown, logged or written; only its id is."""

    secret: bytes = dataclasses.field(repr=False)

    @property
    def id(self) -> str:
        """The key's id: the first 8 bytes of its HMAC of a fixed label, in hex (one-way, so it tells keys apart and gives none away)."""
        return hmac.new(self.secret, KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def person_key(self, user_id: str) -> str:
        """The user's pseudonym: the lowercase hex HMAC-SHA256 of the id under the key."""
        return hmac.new(self.secret, user_id.encode(), hashlib.sha256).hexdigest()

    def person_keys(self, user_ids: pl.Series) -> pl.Series:
        """Each id's pseudonym."""
        return pl.Series(user_ids.name, [self.person_key(user_id) for user_id in user_ids], dtype=pl.String)


def load_key(environ) -> PseudonymKey:
    """The key from RANDOM_USER_PSEUDONYM_KEY (text) or RANDOM_USER_PSEUDONYM_KEY_FILE (a path); SettingsError when missing, unreadable or short."""
    text, path = environ.get(KEY_VARIABLE), environ.get(KEY_FILE_VARIABLE)
    if text is not None and path is not None:
        raise SettingsError(f"both {KEY_VARIABLE} and {KEY_FILE_VARIABLE} are set; set one")
    if text is None and path is None:
        raise SettingsError(f"--pseudonymise needs the key in {KEY_FILE_VARIABLE} (a file, as a mounted Secret) or {KEY_VARIABLE}; it is never a flag")
    if path is not None:
        secret, source = read_key_file(path).removesuffix(b"\n").removesuffix(b"\r"), KEY_FILE_VARIABLE  # echo and editors end the line
    else:
        secret, source = os.fsencode(text), KEY_VARIABLE  # the variable's very bytes, UTF-8 or not
    if len(secret) < SHORTEST_KEY:
        raise SettingsError(f"{source} holds a key of {len(secret)} bytes; it must be at least {SHORTEST_KEY} (`openssl rand -hex 32` makes one)")
    return PseudonymKey(secret)


LONGEST_KEY_FILE = 4096  # bytes: a key is one short line, and a file far longer is not the key's


def read_key_file(path: str) -> bytes:
    """The key file's bytes: a regular file (or a link to one, as a mounted Secret's is) of at most LONGEST_KEY_FILE bytes; SettingsError else."""
    try:
        # Not blocking: a FIFO at the path would hold the job, before its first line, until someone wrote to it.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise SettingsError(f"{KEY_FILE_VARIABLE} names no regular file; it names the file holding the key")
            secret = file.read(LONGEST_KEY_FILE + 1)
    except OSError as exc:
        raise SettingsError(f"{KEY_FILE_VARIABLE} cannot be read: {write_error(exc)}") from None
    if len(secret) > LONGEST_KEY_FILE:
        raise SettingsError(f"{KEY_FILE_VARIABLE} names a file of more than {LONGEST_KEY_FILE} bytes; it names the file holding the key alone")
    return secret


# ---------------------------------------------------------------- the treatments


def analyst_schema() -> pl.Schema:
    """The analyst file's columns and types, in contract order."""
    kinds: dict[str, Dtype] = {PERSON_KEY: pl.String, DECADE: pl.Int32}
    return pl.Schema({name: kinds.get(how, OUTPUT_SCHEMA[column]) for column, (how, name) in TREATMENTS.items() if how in (PERSON_KEY, KEEP, DECADE)})


def analyst_classes() -> dict[str, str]:
    """Each analyst column's class: its source column's (person_key singles out a person, as the id does)."""
    return {name: PII_CLASSES[column] for column, (_, name) in TREATMENTS.items() if name}


def analyst_field_metadata() -> dict[str, dict[str, str]]:
    """Each analyst column's Arrow field metadata: its PII class."""
    return {name: {"pii": kind} for name, kind in analyst_classes().items()}


def quasi_columns() -> list[str]:
    """The quasi-identifiers an analyst file keeps: the columns its k-anonymity covers."""
    return [name for name, kind in analyst_classes().items() if kind == QUASI]


def treated(rows: pl.LazyFrame, key: PseudonymKey) -> pl.LazyFrame:
    """A batch's rows as the analyst sees them, before suppression: each column treated as TREATMENTS says, the rest dropped."""
    treat = {
        KEEP: lambda column: pl.col(column),
        DECADE: lambda column: (pl.col(column).dt.year() // 10 * 10).cast(pl.Int32),
        PERSON_KEY: lambda column: pl.col(column).map_batches(key.person_keys, return_dtype=pl.String),
    }
    return rows.select(treat[how](column).alias(name) for column, (how, name) in TREATMENTS.items() if how in treat)


def suppressed(rows: pl.LazyFrame, k: int) -> pl.LazyFrame:
    """The rows with every quasi-identifier set to null where its combination occurs fewer than k times; no row dropped."""
    quasi = quasi_columns()
    rare = pl.len().over(quasi) < k
    return rows.with_columns(pl.when(rare).then(None).otherwise(pl.col(column)).alias(column) for column in quasi)


def rare_rows(rows: pl.LazyFrame, k: int) -> int:
    """How many rows fall in a combination of quasi-identifiers that occurs fewer than k times."""
    groups = rows.group_by(quasi_columns()).len()
    return int(groups.filter(pl.col("len") < k).select(pl.col("len").sum()).collect().item() or 0)


# ---------------------------------------------------------------- one analyst file


def analyst_path(target: str, seed: str) -> str:
    """Where a seed's analyst file lands."""
    return f"{target.rstrip('/')}/pseudonymised_users_{seed}.parquet"


class AnalystNames:
    """A sink's file names for analyst files instead of batches."""

    output_dir: str
    kind = "analyst file"  # what its lines call it

    def where(self, seed: str) -> str:
        """The seed's analyst file."""
        return analyst_path(self.output_dir, seed)

    def named(self, seed: str) -> str:
        """The seed's analyst file, as said in lines and in what refresh returns."""
        return self.where(seed)


class AnalystFolder(AnalystNames, LocalFiles):
    """A local folder of analyst files, each landed as a batch is."""

    def built_from(self, seed: str) -> dict[str, Any] | None:
        """The build record of the seed's analyst file; None when there is none."""
        return built_from(self.where(seed), None)


class AnalystObjects(AnalystNames, ObjectStore):
    """An object-storage prefix of analyst files, each landed as a batch is."""

    def built_from(self, seed: str) -> dict[str, Any] | None:
        """The build record of the seed's analyst file; None when there is none."""
        return built_from(self.where(seed), self.storage_options)


class AnalystTable(DeltaTable):
    """The analyst lake as one Delta table at <target>/pseudonymised_users: each seed one commit overwriting its rows, its build record in the commit."""

    name, kind = ANALYST_TABLE, "analyst table"

    def schema(self) -> Any:
        """The analyst columns as an Arrow schema whose fields carry their classes."""
        return with_field_metadata(analyst_schema(), analyst_field_metadata())

    def commit_metadata(self, batch: SortedBatch) -> dict[str, str]:
        """A seed's commit records, beside the lake's seed and version, the build record an analyst file keeps in its footer."""
        return {**super().commit_metadata(batch), PSEUDONYM_METADATA_KEY: batch.report[PSEUDONYM_METADATA_KEY]}

    def named(self, seed: str) -> str:
        """The seed's rows in the table, as said in lines and in what refresh returns."""
        return f"{self.address} seed {seed}"

    def built_from(self, seed: str) -> dict[str, Any] | None:
        """The build record of the last commit of the seed's rows; None when none committed them."""
        commit = next((commit for commit in self.commits() if commit.get(SEED_KEY) == seed), None)
        if commit is None or PSEUDONYM_METADATA_KEY not in commit:
            return None
        record = json.loads(commit[PSEUDONYM_METADATA_KEY])
        record.pop("suppressed_rows", None)
        return record


class AnalystFile(SortedBatch):
    """One analyst file, landed by a sink as a batch is: its report is its footer's metadata (key id, source, classes)."""

    def parquet_options(self) -> dict[str, Any]:
        """How an analyst file is written: zstd, its key id, source and classes in the footer."""
        return dict(compression="zstd", compression_level=1, metadata=self.report, engine="streaming", row_group_size=self.group_rows)

    def field_metadata(self) -> dict[str, dict[str, str]]:
        """Each analyst column's Arrow field metadata: its PII class."""
        return analyst_field_metadata()


GROUP_ROWS = 100_000  # an analyst file's row groups: its rows are few columns, and read whole


def build_record(identity: str, key: PseudonymKey, k: int) -> dict[str, Any]:
    """What an analyst file is built from: the source batch's identity, the key's id, k, the algorithm and the columns."""
    columns = [f"{name}:{how}" for column, (how, name) in TREATMENTS.items() if name]
    return {"algorithm": ALGORITHM, "key_id": key.id, "k": k, "source": identity, "columns": columns}


def file_identity(source: str, storage_options: dict | None) -> str:
    """A batch file's identity: its footer and the instant it landed, and a local file's size and time."""
    footer = pl.read_parquet_metadata(source, storage_options=storage_options)
    # The instant the batch landed, to the microsecond: a batch landed again within one second has the
    # same footer (its quality report counts seconds), never the same instant.
    landed = pl.scan_parquet(source, storage_options=storage_options, glob=False).select(pl.col("ingested_at").max()).collect().item()
    identity = hashlib.sha256(json.dumps({**footer, "landed": str(landed)}, sort_keys=True).encode())
    if not is_remote(source):  # a file replaced with the same footer still has its own size and time
        info = os.stat(source)
        identity.update(f"{info.st_size}:{info.st_mtime_ns}".encode())
    return identity.hexdigest()


def built_from(path: str, storage_options: dict | None) -> dict[str, Any] | None:
    """The build record an analyst file holds (without its suppressed count); None when there is no such file."""
    try:
        footer = pl.read_parquet_metadata(path, storage_options=storage_options)
    except FileNotFoundError:
        return None
    except Exception as exc:  # refused, unreachable, or not a parquet file: rebuilt only when it is known to be stale
        raise StorageError(write_error(exc), path=path, doing="cannot read the analyst file") from exc
    record = json.loads(footer.get(PSEUDONYM_METADATA_KEY, "{}"))
    record.pop("suppressed_rows", None)
    return record


def analyst_file(rows: pl.LazyFrame, seed: str, record: dict[str, Any], key: PseudonymKey, scratch: Path) -> AnalystFile:
    """The analyst file of a batch's rows: treated, suppressed to k, in person_key order, its record and suppressed count in the footer."""
    rows = treated(rows, key)
    rare = rare_rows(rows, record["k"])
    # In person_key order: a batch is sorted by name, and rows in name order would tell of their names.
    final = suppressed(rows, record["k"]).sort(PERSON_KEY)
    metadata = {PSEUDONYM_METADATA_KEY: json.dumps({**record, "suppressed_rows": rare}), PII_METADATA_KEY: json.dumps(analyst_classes())}
    return AnalystFile(final, seed, metadata, scratch, GROUP_ROWS)


# ---------------------------------------------------------------- the analyst lake


def lake_sources(output_dir: str, storage_options: dict | None) -> list[str]:
    """The lake's batches, local files checked or an object lake's keys, sorted."""
    if not is_remote(output_dir):
        with failing_as("cannot read the lake", output_dir):
            return lake_batches(lake_folder(output_dir))
    pattern = f"{output_dir.rstrip('/')}/{BATCH_GLOB}"
    with failing_as("cannot list the lake", output_dir, catching=(Exception,)):
        # Polars lists the pattern as a scan would; only the file names are read.
        scan = pl.scan_parquet(pattern, storage_options=storage_options, include_file_paths="path", **LAKE_SCAN)
        paths = scan.select("path").unique().collect()["path"].to_list()
    return sorted(paths)


@dataclasses.dataclass(frozen=True)
class Source:
    """One batch of the lake to build from: its seed, its rows (lazy) and its identity (told lazily: a batch file's footer is read only when asked)."""

    seed: str
    rows: pl.LazyFrame
    identity: Callable[[], str]


def batches_of(output_dir: str, storage_options: dict | None) -> list[Source]:
    """The lake's batches: each seed of its Delta table when it has one, else each batch file."""
    with failing_as("cannot read the lake", output_dir, catching=(pl.exceptions.PolarsError,)):
        seeds = landed_seeds(output_dir, storage_options)
    if seeds is None:
        return [file_source(path, storage_options) for path in lake_sources(output_dir, storage_options)]
    table = scan_table(output_dir, storage_options, None)
    assert table is not None  # landed_seeds found it
    return [Source(seed, table.filter(pl.col("seed") == seed), functools.partial(str, identity)) for seed, identity in seeds.items()]


def file_source(path: str, storage_options: dict | None) -> Source:
    """A batch file as a source."""
    return Source(seed_of(path), scan_batches([path], storage_options), lambda: file_identity(path, storage_options))


def seed_of(batch: str) -> str:
    """A batch's seed, from its name."""
    return batch.rsplit("/", 1)[-1].removeprefix("random_users_").removesuffix(".parquet")


def analyst_sink(target: str, storage_options: dict, stop: Stop, table_format: str) -> tuple[AnalystFolder | AnalystObjects | AnalystTable, Path]:
    """Where analyst files (or, for delta, the analyst table's commits) land, and the local scratch folder each is written in first."""
    if table_format == config.DELTA:
        table = AnalystTable(target, storage_options if is_remote(target) else None, stop)
        table.check()
        if is_remote(target):
            return table, own_staging_root(target)
        Path(target).mkdir(parents=True, exist_ok=True)
        return table, Path(target).absolute()  # each seed's rows written whole here, then committed
    if is_remote(target):
        return AnalystObjects(target, storage_options, stop), own_staging_root(target)
    Path(target).mkdir(parents=True, exist_ok=True)
    return AnalystFolder(target), Path(target).absolute()  # beside the file it becomes, so it is moved into place


def refresh(settings: config.Settings, target: str, key: PseudonymKey, storage_options: dict, stop: Stop) -> dict[str, bool]:
    """Build or refresh the analyst file (delta: the table's rows) of every batch of --output-dir, until `stop`; each, and whether it was built (False: up to date)."""
    stop.begin()  # a caller may keep one Stop for its jobs: a run's wind-down would cut this one's every commit and upload
    output_dir, k = settings.output_dir, settings.k_anonymity
    remote = storage_options if is_remote(output_dir) else None
    sources = batches_of(output_dir, remote)  # first: a lake that cannot be read leaves no target behind
    with failing_as("cannot make", target, catching=WRITE_FAILURES):
        sink, scratch = analyst_sink(target, storage_options, stop, settings.table_format)
    built = {}
    for source in sources:
        where, record = sink.named(source.seed), build_record(source.identity(), key, k)
        built[where] = sink.built_from(source.seed) != record
        if not built[where]:
            log.info("%s %s is up to date", sink.kind, where)
            continue
        file = analyst_file(source.rows, source.seed, record, key, scratch)
        with failing_as("cannot write", where, catching=WRITE_FAILURES):
            sink.land(file)
        log.info(
            "%s %s built (k=%d, %s rows with their quasi-identifiers suppressed)",
            sink.kind,
            where,
            k,
            json.loads(file.report[PSEUDONYM_METADATA_KEY])["suppressed_rows"],
        )
    return built


def read_analyst_lake(target: str, storage_options: dict | None) -> pl.LazyFrame:
    """A target's analyst table, else every analyst file of it, as one lazy frame (empty if it holds none)."""
    schema = analyst_schema()
    table = scan_schema(table_address(target, ANALYST_TABLE), storage_options, None, schema)
    if table is not None:
        return table
    if is_remote(target):
        return pl.scan_parquet(f"{target.rstrip('/')}/{ANALYST_GLOB}", schema=schema, storage_options=storage_options)
    files = sorted(str(path.absolute()) for path in lake_folder(target).glob(ANALYST_GLOB))
    return pl.scan_parquet(files, schema=schema, glob=False) if files else schema.to_frame().lazy()
