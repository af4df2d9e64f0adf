"""PII classes: every column of the contract has one, and every landed file carries them where standard readers see them.

Each Arrow field's metadata holds `pii` (read by pyarrow from the file's embedded Arrow schema), and the
file's key-value metadata holds `random_user_etl.pii`, JSON of column to class (read by DuckDB and Polars).
Files landed by a run to a folder, a replay and a run into S3 (moto on loopback) are each read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from support import PURA, ROOT, assert_rows_are, raw_users

import random_user_etl as etl
from schemas import OUTPUT_SCHEMA, PII_CLASSES, QUALITY_METADATA_KEY

PII_KEY = "random_user_etl.pii"

# A few columns' classes as this test reads the contract, not as the job says them.
SPELLED_OUT = {
    "user_id": "direct",
    "email": "direct",
    "national_id": "direct",
    "date_of_birth": "quasi",
    "postcode": "quasi",
    "gender": "quasi",
    "seed": "none",
    "ingested_at": "none",
}


# ---------------------------------------------------------------- the contract


def test_every_output_column_has_a_class_and_every_class_names_an_output_column():
    assert set(PII_CLASSES) == set(OUTPUT_SCHEMA.names())


def test_every_class_is_direct_quasi_or_none():
    assert {name: cls for name, cls in PII_CLASSES.items() if cls not in {"direct", "quasi", "none"}} == {}


def test_the_classes_are_those_the_test_spells_out():
    assert {name: PII_CLASSES[name] for name in SPELLED_OUT} == SPELLED_OUT


def test_the_readme_table_gives_each_column_its_class():
    """Each row of the README's output table names its columns and, in the same order, their classes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Output columns", 1)[1].split("\n## ", 1)[0]
    header, *rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    position = [cell.strip() for cell in header.strip("|").split("|")].index("pii")
    in_readme = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        names, classes = cells[0].split(", "), cells[position].split(", ")
        assert len(classes) in (1, len(names)), row
        in_readme.update(zip(names, classes * len(names) if len(classes) == 1 else classes, strict=True))
    assert in_readme == PII_CLASSES


# ---------------------------------------------------------------- the landed files


def assert_carries_the_classes(path: Path) -> None:
    """The file's fields (pyarrow) and its key-value metadata (DuckDB, Polars) give every column its class."""
    schema = pq.read_schema(path)
    assert schema.names == OUTPUT_SCHEMA.names()
    fields = {name: schema.field(name).metadata for name in schema.names}
    assert {name: fields[name] for name in SPELLED_OUT} == {name: {b"pii": cls.encode()} for name, cls in SPELLED_OUT.items()}
    assert fields == {name: {b"pii": cls.encode()} for name, cls in PII_CLASSES.items()}
    in_duckdb = duckdb.connect().sql(f"SELECT key, value FROM parquet_kv_metadata('{path}')").fetchall()
    by_key = {bytes(key).decode(): bytes(value).decode() for key, value in in_duckdb}
    assert json.loads(by_key[PII_KEY]) == PII_CLASSES
    in_polars = pl.read_parquet_metadata(path)
    assert json.loads(in_polars[PII_KEY]) == PII_CLASSES
    # The quality report stays beside the classes.
    assert json.loads(in_polars[QUALITY_METADATA_KEY])["rows"] == json.loads(by_key[QUALITY_METADATA_KEY])["rows"] > 0


def test_a_run_to_a_folder_lands_a_file_carrying_the_classes(api, settings):
    batch = etl.run(settings(seed="pura"))
    assert_carries_the_classes(Path(batch.path))


def test_a_replay_lands_a_file_carrying_the_classes(api, out, raw, settings, cli):
    etl.run(settings(seed="pura"))
    (out / "random_users_pura.parquet").unlink()
    api.stop()
    result = cli("--replay", raw / "pura", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert_carries_the_classes(out / "random_users_pura.parquet")


def test_a_run_into_s3_lands_an_object_carrying_the_classes(api, settings, s3, tmp_path):
    etl.run(settings(output_dir=s3.url(), seed="pura"))
    copy = tmp_path / "object.parquet"
    copy.write_bytes(s3.client.get_object(Bucket=s3.name, Key="lake/random_users_pura.parquet")["Body"].read())
    assert_carries_the_classes(copy)


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_lake_reads_the_same_with_the_classes_in_its_files(where, api, settings, s3, out):
    url = str(out) if where == "folder" else s3.url()
    etl.run(settings(output_dir=url, seed="pura"))
    frame = etl.read_processed(url).collect()
    assert frame.schema == OUTPUT_SCHEMA
    assert_rows_are(frame, raw_users(PURA))
