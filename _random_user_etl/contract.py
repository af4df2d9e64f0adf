"""The transform: a checked answer's users typed against the contract, every violation named."""

from __future__ import annotations

import datetime as dt
import polars as pl
from random_user_config import MAX_PAGE_SIZE
from schemas import MAX_FIELD_BYTES, NULLABLE_COLUMNS, OUTPUT_SCHEMA, SOURCE_FIELDS, UTC_INSTANT
from _random_user_etl.answer import PageRequest, check_envelope, contract_failure, parse_answer


# An instant as ISO 8601 writes it and a standard reader reads it: chrono alone would also take a
# one-digit month, a space before the zone, or a leap second rolled into the next minute.
INSTANT_TEXT = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)


INSTANT_COLUMNS = tuple(name for name in SOURCE_FIELDS if OUTPUT_SCHEMA[name] == UTC_INSTANT)


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"


def field(path: str) -> pl.Expr:
    """An expression for a dotted field of the raw user struct."""
    head, *rest = path.split(".")
    expr = pl.col(head)
    for name in rest:
        expr = expr.struct.field(name)
    return expr


def typed_columns() -> dict[str, pl.Expr]:
    """Each contract column of a user, typed, from the flat text columns named as the contract."""
    typed: dict[str, pl.Expr] = {}
    for name in SOURCE_FIELDS:
        dtype = OUTPUT_SCHEMA[name]
        col = pl.col(name)
        if dtype == UTC_INSTANT:
            # No cache: real answers hold distinct instants, so a cache is built per page and never hit.
            instant = col.str.to_datetime(TIMESTAMP_FORMAT, time_unit="us", time_zone="UTC", strict=False, cache=False)
            typed[name] = pl.when(col.str.contains(INSTANT_TEXT)).then(instant)
        elif dtype != pl.String:
            typed[name] = col.cast(dtype, strict=False)
        elif name in NULLABLE_COLUMNS:
            typed[name] = pl.when(col != "").then(col)  # the service writes "no id" as "" or null
        else:
            typed[name] = col
    return typed


def contract_violations(flat: pl.DataFrame, typed: pl.DataFrame) -> list[str]:
    """What in these records breaks the contract, each with the field and the count of records."""
    problems = []
    missing = flat.null_count().row(0, named=True)
    unparsed = typed.null_count().row(0, named=True)
    for name, source in SOURCE_FIELDS.items():
        if name not in NULLABLE_COLUMNS and missing[name]:
            problems.append(f"{source} is missing or null in {missing[name]} records")
        elif unparsed[name] > missing[name] and name not in NULLABLE_COLUMNS:
            kind = {UTC_INSTANT: "a date", pl.Float64: "a number"}.get(OUTPUT_SCHEMA[name], "a whole number")
            problems.append(f"{source} does not parse as {kind} in {unparsed[name] - missing[name]} records")
    ranges = typed.select(
        bad_latitude=(~pl.col("latitude").is_between(-90, 90)).sum(),
        bad_longitude=(~pl.col("longitude").is_between(-180, 180)).sum(),
        duplicates=pl.len() - pl.col("user_id").drop_nulls().n_unique() - pl.col("user_id").null_count(),
        # A standard reader holds years 1 to 9999 only; an offset can carry a written year past them.
        **{name: (~pl.col(name).dt.year().is_between(1, 9999)).sum() for name in INSTANT_COLUMNS},
    ).row(0, named=True)
    if ranges["bad_latitude"]:
        problems.append(f"latitude lies outside [-90, 90] in {ranges['bad_latitude']} records")
    if ranges["bad_longitude"]:
        problems.append(f"longitude lies outside [-180, 180] in {ranges['bad_longitude']} records")
    for name in INSTANT_COLUMNS:
        if ranges[name]:
            problems.append(f"{SOURCE_FIELDS[name]} lies outside the years 1 to 9999 in {ranges[name]} records")
    if ranges["duplicates"]:
        problems.append(f"login.uuid repeats in {ranges['duplicates']} records")
    return problems


def check_field_lengths(flat: pl.DataFrame) -> None:
    """Refuse records with a text field longer than MAX_FIELD_BYTES, before anything copies it."""
    counts = flat.select((pl.all().str.len_bytes() > MAX_FIELD_BYTES).sum()).row(0, named=True)
    problems = [f"{SOURCE_FIELDS[name]} is longer than {MAX_FIELD_BYTES:,} bytes in {count} records" for name, count in counts.items() if count]
    if problems:
        raise contract_failure(problems)


def transform(body: bytes, expect: PageRequest | None = None, ingested_at: dt.datetime | None = None) -> pl.DataFrame:
    """One raw answer body in, the contract frame out in the answer's order, or EtlError saying what is wrong."""
    parsed = parse_answer(body, most_users=expect.results if expect and expect.results else MAX_PAGE_SIZE)
    info = check_envelope(parsed, expect)
    users = parsed.users if parsed.users is not None else pl.DataFrame()
    if users.height == 0:
        return OUTPUT_SCHEMA.to_frame()
    flat = users.select(**{name: field(source) for name, source in SOURCE_FIELDS.items()})
    check_field_lengths(flat)
    flat = flat.with_columns(user_id=pl.when(pl.col("user_id") != "").then("user_id"))  # "" identifies no one
    typed = flat.with_columns(**typed_columns())
    problems = contract_violations(flat, typed)
    if problems:
        raise contract_failure(problems)
    ingested_at = ingested_at or dt.datetime.now(dt.UTC)
    page = info.get("page") or (expect.page if expect else None)
    return (
        typed.with_columns(
            full_name=pl.concat_str("first_name", "last_name", separator=" "),
            street_address=pl.concat_str(pl.col("street_number").cast(pl.String), "street_name", separator=" "),
            seed=pl.lit(info.get("seed") or (expect.seed if expect else None), pl.String),
            page=pl.lit(int(page) if page is not None else None, pl.Int32),
            api_version=pl.lit(info.get("version"), pl.String),
            ingested_at=pl.lit(ingested_at, UTC_INSTANT),
        ).select(OUTPUT_SCHEMA.names())  # not sorted: the batch is, as it lands (write_batch)
    )
