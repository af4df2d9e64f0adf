"""Reading the lake: a torn or foreign file named like a batch is named, not read as rows or left to Polars' words."""

from __future__ import annotations

import itertools
import re

import polars as pl
import pyarrow.parquet as pq
import pytest
from support import PURA, assert_rows_are, raw_users

import random_user_etl as etl
from schemas import OUTPUT_SCHEMA


@pytest.fixture
def lake(api, settings, out):
    """A lake holding one landed batch, seed pura."""
    etl.run(settings(seed="pura"))
    return out


def refused(lake, name: str) -> str:
    """read_processed(lake) raises, or its collect() does, an EtlError naming the file `name`; its line."""
    with pytest.raises(etl.EtlError, match=re.escape(str(lake / name))) as caught:
        etl.read_processed(str(lake)).collect()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_torn_batch_is_named(lake):
    batch = lake / "random_users_pura.parquet"
    whole = batch.read_bytes()
    (lake / "random_users_torn.parquet").write_bytes(whole[: len(whole) // 2])  # a copy cut short by a crash
    assert "not a whole parquet file" in refused(lake, "random_users_torn.parquet")


def test_a_file_that_is_not_parquet_is_named_and_its_bytes_are_not_echoed(lake):
    (lake / "random_users_x.parquet").write_text("name,email\nMason Hanson,mason.hanson@example.com\n")
    line = refused(lake, "random_users_x.parquet")
    assert "not a whole parquet file" in line and "example.com" not in line


@pytest.mark.parametrize(
    "frame, says",
    [
        (pl.DataFrame({"a": [1, 2]}), "holds no user_id column"),
        (pl.DataFrame({"user_id": ["u1"], "age": ["forty"]}), "column age is String, not Int32"),
        (pl.DataFrame({"user_id": [1]}), "column user_id is Int64, not String"),
    ],
    ids=["other-columns", "other-type", "other-id-type"],
)
def test_a_parquet_file_of_other_columns_or_types_is_named(lake, frame, says):
    frame.write_parquet(lake / "random_users_other.parquet")
    assert says in refused(lake, "random_users_other.parquet")


def test_the_lake_still_reads_lazily_and_whole_once_the_foreign_file_is_gone(lake):
    (lake / "random_users_x.parquet").write_bytes(b"not parquet")
    with pytest.raises(etl.EtlError):
        etl.read_processed(str(lake)).collect()
    (lake / "random_users_x.parquet").unlink()
    frame = etl.read_processed(str(lake))
    assert isinstance(frame, pl.LazyFrame) and frame.collect_schema() == OUTPUT_SCHEMA
    assert_rows_are(frame.collect(), raw_users(PURA))


# ---------------------------------------------------------------- a whole footer over a corrupt page


def corrupted(whole: bytes, at: int, value: int) -> bytes:
    """The file with one byte changed: a page of it rotted on an unlucky disk, its footer still whole."""
    return whole[:at] + bytes([value]) + whole[at + 1 :]


def test_a_batch_with_a_corrupt_page_is_named_when_the_lake_is_collected_never_a_panic(lake):
    whole = (lake / "random_users_pura.parquet").read_bytes()
    footer = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")
    torn = lake / "random_users_rot.parquet"
    failed = 0
    # Every 61st byte of the pages, set to each of two values: most reads fail, a few panic in Polars' Rust.
    for at, value in itertools.product(range(4, footer, 61), (0x00, 0xFF)):
        torn.write_bytes(corrupted(whole, at, value))
        try:
            etl.read_processed(str(lake)).collect()
        except etl.EtlError as exc:
            assert str(torn) in str(exc) and "\n" not in str(exc), (at, value, str(exc))
            failed += 1
        # Polars' own errors (no file named) and its PanicException (a BaseException) fail the test here.
    assert failed > 0  # the corruption was seen at all


def test_a_corrupt_page_in_a_column_not_read_does_not_stop_a_query_of_the_others(lake):
    whole = (lake / "random_users_pura.parquet").read_bytes()
    column = pq.ParquetFile(lake / "random_users_pura.parquet").metadata.row_group(0).column(OUTPUT_SCHEMA.names().index("email"))
    start = column.data_page_offset + 16
    (lake / "random_users_rot.parquet").write_bytes(whole[:start] + b"\x00" * 64 + whole[start + 64 :])
    with pytest.raises(etl.EtlError, match="random_users_rot.parquet"):
        etl.read_processed(str(lake)).collect()
    ids = etl.read_processed(str(lake)).select("user_id").collect()  # the projection still reaches each file
    assert sorted(ids["user_id"]) == sorted(2 * [user["login"]["uuid"] for user in raw_users(PURA)])
