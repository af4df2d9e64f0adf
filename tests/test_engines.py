"""The landed folder is a plain Parquet dataset: DuckDB, pandas (pyarrow) and Spark read it as it is.

Two batches are landed by the real job (seed pura, 100 users of all nationalities; seed gbonly,
25 British users), then each engine reads the folder with no options and must agree with
Polars' read_processed and with the recorded JSON: same rows, timestamps as UTC instants,
strings as strings. The output folder also holds the job's `.staging` leftovers (lock files),
as a real lake does; every engine must skip them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from support import SPARK_MISSING, GBONLY, PURA, assert_rows_are, fixture_json, nationality_counts, raw_users, user_rows

import random_user_etl as etl
from schemas import OUTPUT_SCHEMA

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def micros(moment: dt.datetime) -> int:
    """An aware datetime as microseconds since the epoch: a value no time zone setting can shift."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@pytest.fixture
def lake(settings, out) -> Path:
    """A local lake of two batches landed by the job."""
    etl.run(settings(seed="pura"))
    etl.run(settings(seed="gbonly", n=25, nat=("gb",)))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["random_users_gbonly.parquet", "random_users_pura.parquet"]
    return out


def polars_counts(folder: Path) -> dict[str, int]:
    """Users per nationality, as Polars' read_processed answers."""
    return dict(etl.read_processed(str(folder)).group_by("nationality").len().collect().iter_rows())


USERS = raw_users(PURA, GBONLY)


def test_duckdb_reads_the_folder_and_agrees_with_polars_and_the_raw_json(lake):
    con = duckdb.connect()
    counts = dict(con.sql(f"SELECT nationality, count(*) FROM '{lake}/*.parquet' GROUP BY 1").fetchall())
    assert counts == polars_counts(lake) == nationality_counts(USERS)
    assert sum(counts.values()) == 125
    types = {row[0]: row[1] for row in con.sql(f"DESCRIBE SELECT * FROM '{lake}/*.parquet'").fetchall()}
    assert list(types) == OUTPUT_SCHEMA.names()
    for name in ("date_of_birth", "registered_at", "ingested_at"):
        assert types[name] == "TIMESTAMP WITH TIME ZONE"
    assert {types[name] for name in ("user_id", "postcode", "national_id", "nationality")} == {"VARCHAR"}
    assert (types["age"], types["street_number"], types["latitude"]) == ("INTEGER", "INTEGER", "DOUBLE")
    rows = con.sql(f"SELECT user_id, email, postcode, latitude, epoch_us(date_of_birth), epoch_us(registered_at) FROM '{lake}/*.parquet'").fetchall()
    expected = {
        uid: (row["email"], row["postcode"], row["latitude"], micros(row["date_of_birth"]), micros(row["registered_at"]))
        for uid, row in user_rows(USERS).items()
    }
    assert {row[0]: row[1:] for row in rows} == expected


def test_pandas_reads_the_folder_with_utc_instants_and_string_columns(lake):
    frame = pd.read_parquet(lake)  # the folder itself, through pyarrow
    assert frame.shape == (125, len(OUTPUT_SCHEMA))
    assert list(frame.columns) == OUTPUT_SCHEMA.names()
    for name in ("date_of_birth", "registered_at", "ingested_at"):
        dtype = frame[name].dtype
        assert isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC" and dtype.unit == "us"
    for name in ("user_id", "email", "postcode", "nationality", "seed"):
        assert pd.api.types.is_string_dtype(frame[name].dtype), (name, frame[name].dtype)
    assert str(frame["age"].dtype) == "int32" and str(frame["latitude"].dtype) == "float64"
    assert frame["nationality"].value_counts().to_dict() == polars_counts(lake) == nationality_counts(USERS)
    expected = user_rows(USERS)
    assert sorted(frame["user_id"]) == sorted(expected)
    for row in frame[["user_id", "email", "postcode", "latitude", "age", "date_of_birth", "nationality"]].itertuples(index=False):
        want = expected[row.user_id]
        assert (row.email, row.postcode, row.latitude, row.age, row.nationality) == (
            want["email"],
            want["postcode"],
            want["latitude"],
            want["age"],
            want["nationality"],
        )
        assert row.date_of_birth == pd.Timestamp(want["date_of_birth"])
    # One schema across batches: every file carries the same Arrow schema.
    schemas = [pq.read_schema(path) for path in sorted(lake.glob("*.parquet"))]
    assert all(schema.equals(schemas[0]) for schema in schemas)


def test_read_processed_reads_an_older_batch_missing_a_contract_column_as_nulls(settings, out):
    """Schema growth: a batch landed before a column joined the contract still reads, with nulls."""
    etl.run(settings(seed="pura"))
    # An older batch, written by hand from the raw JSON, with the contract as it was: 8 columns.
    users = fixture_json(GBONLY)["results"]
    columns = ("user_id", "first_name", "last_name", "email", "postcode", "latitude", "date_of_birth", "nationality")
    rows = user_rows(users)
    old = pl.DataFrame(
        [{name: row[name] for name in columns} for row in rows.values()],
        schema_overrides={"date_of_birth": pl.Datetime("us", "UTC")},
    )
    old.write_parquet(out / "random_users_gbonly.parquet", compression="zstd")
    lake = etl.read_processed(str(out)).collect()
    assert lake.schema == OUTPUT_SCHEMA
    assert lake.height == 125
    older = lake.filter(pl.col("user_id").is_in(old["user_id"].implode()))
    newer = lake.filter(~pl.col("user_id").is_in(old["user_id"].implode()))
    assert older.height == 25 and newer.height == 100
    # The columns the old batch has keep their values; the ones it lacks are null, only there.
    for name in ("email", "postcode", "latitude", "date_of_birth", "nationality"):
        got = dict(older.select("user_id", name).iter_rows())
        assert got == {uid: row[name] for uid, row in rows.items()}
    missing = [name for name in OUTPUT_SCHEMA.names() if name not in old.columns]
    assert older.select(missing).null_count().row(0) == (25,) * len(missing)
    assert newer.select("age", "picture_url", "seed", "ingested_at").null_count().row(0) == (0, 0, 0, 0)
    assert_rows_are(newer, raw_users(PURA))


# ---------------------------------------------------------------- Spark


@pytest.mark.skipif(SPARK_MISSING is not None, reason=SPARK_MISSING or "")
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_reads_the_folder_with_timestamps_as_instants(lake, spark):
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    frame = spark.read.parquet(str(lake))  # the folder, no options
    fields = {field.name: field.dataType for field in frame.schema.fields}
    assert list(fields) == OUTPUT_SCHEMA.names()
    # Polars' Datetime(us, UTC) is an instant to Spark: TimestampType, not TimestampNTZType.
    for name in ("date_of_birth", "registered_at", "ingested_at"):
        assert isinstance(fields[name], T.TimestampType) and not isinstance(fields[name], T.TimestampNTZType)
    assert isinstance(fields["user_id"], T.StringType) and isinstance(fields["postcode"], T.StringType)
    assert isinstance(fields["age"], T.IntegerType) and isinstance(fields["latitude"], T.DoubleType)
    assert frame.count() == 125
    counts = {row["nationality"]: row["count"] for row in frame.groupBy("nationality").count().collect()}
    assert counts == polars_counts(lake) == nationality_counts(USERS)
    rows = frame.select(
        "user_id",
        "email",
        "postcode",
        "age",
        F.unix_micros("date_of_birth").alias("dob_us"),
        F.date_format("date_of_birth", "yyyy-MM-dd'T'HH:mm:ss.SSSX").alias("dob_text"),
    ).collect()
    # dob_text: Spark's own rendering of the instant, against the raw JSON's text as sent.
    sent = {u["login"]["uuid"]: u["dob"]["date"] for u in USERS}
    expected = {uid: (row["email"], row["postcode"], row["age"], micros(row["date_of_birth"]), sent[uid]) for uid, row in user_rows(USERS).items()}
    assert {r["user_id"]: (r["email"], r["postcode"], r["age"], r["dob_us"], r["dob_text"]) for r in rows} == expected
