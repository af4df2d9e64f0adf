"""THE oracle: what the contract's rows of an answer are, worked out from the raw JSON as Python's
json reads it, by the contract's rules written out here (never by the job's code).

Tests (through conftest) and benchmarks/bench.py import it: there is no other reading of a raw user.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import json
import math
import re

import polars as pl

from schemas import MAX_FIELD_BYTES, RAW_RESPONSE

# ---------------------------------------------------------------- the contract, written out by hand
# The columns and where each comes from, from the service's documented layout and the README's
# "Output columns" table, never from the job's schemas: a column the job takes from the wrong field
# differs from what this reads.

S = pl.String
UTC = pl.Datetime("us", "UTC")

# Every landed column, in the contract's order, with its type.
COLUMNS = {
    "user_id": S,
    "gender": S,
    "title": S,
    "first_name": S,
    "last_name": S,
    "full_name": S,
    "email": S,
    "username": S,
    "phone": S,
    "cell": S,
    "date_of_birth": UTC,
    "age": pl.Int32,
    "registered_at": UTC,
    "street_number": pl.Int32,
    "street_name": S,
    "street_address": S,
    "city": S,
    "state": S,
    "country": S,
    "postcode": S,
    "latitude": pl.Float64,
    "longitude": pl.Float64,
    "timezone_offset": S,
    "timezone_description": S,
    "national_id_type": S,
    "national_id": S,
    "nationality": S,
    "picture_url": S,
    "seed": S,
    "page": pl.Int32,
    "api_version": S,
    "ingested_at": UTC,
}

# The columns read straight from one field of a raw user: that field's dotted path.
FROM_USER = {
    "user_id": "login.uuid",
    "gender": "gender",
    "title": "name.title",
    "first_name": "name.first",
    "last_name": "name.last",
    "email": "email",
    "username": "login.username",
    "phone": "phone",
    "cell": "cell",
    "date_of_birth": "dob.date",
    "age": "dob.age",
    "registered_at": "registered.date",
    "street_number": "location.street.number",
    "street_name": "location.street.name",
    "city": "location.city",
    "state": "location.state",
    "country": "location.country",
    "postcode": "location.postcode",
    "latitude": "location.coordinates.latitude",
    "longitude": "location.coordinates.longitude",
    "timezone_offset": "location.timezone.offset",
    "timezone_description": "location.timezone.description",
    "national_id_type": "id.name",
    "national_id": "id.value",
    "nationality": "nat",
    "picture_url": "picture.large",
}
# The rest are worked out in reference_rows: full_name, street_address from the user's fields;
# seed, page, api_version from info; ingested_at from the run.

# ---------------------------------------------------------------- the contract's reference reading
# THE oracle of the fuzz and table tests: every contract column of every row, worked out from what
# Python's json reads, by the contract's rules written out here (not by the job's code):
# - text columns take a JSON string as is; a JSON true/false as "true"/"false"; a JSON integer as its
#   digits ("-0" as "0"); any other JSON number as its shortest round-trip decimal without exponent
#   (1.5e3 -> "1500", 1.50 -> "1.5", -0.0 -> "-0"); an object or array where a value belongs refuses;
# - whole numbers: text of ASCII digits with an optional sign, within Int32;
# - floats: text of a decimal or exponent number, inf or nan (any case, signed), then the range check;
# - instants: YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM), a real date, fraction cut to
#   microseconds, years 1 to 9999 in UTC; nothing else (no leap second, no one-digit month);
# - "" or null national id fields -> null; "" user id -> null; any other null refuses;
# - full_name = first + " " + last, street_address = number + " " + street;
# - a NaN or Infinity constant, a number beyond a float's range, or a lone UTF-16 surrogate in a
#   landed text refuses; so does a body that is not UTF-8 (RFC 8259), a UTF-8 BOM aside. Duplicate keys read as Python's json reads them (the last one wins).


class Refused(Exception):
    """The reference refuses this answer: the job must raise EtlError."""


@dataclasses.dataclass(frozen=True)
class JsonNumber:
    """A JSON number as written, so no reading of it is lost before the contract's rules apply."""

    text: str
    integral: bool


INT32 = (-(2**31), 2**31 - 1)
WHOLE_TEXT = re.compile(r"[+-]?[0-9]+")
FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)
INSTANT_TEXT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(?:\.([0-9]+))?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise Refused(f"{name} is not JSON")


def standard_json(body: bytes):
    """The body as Python's json reads it, numbers kept as written; Refused if it does not read."""
    try:
        # RFC 8259 answers are UTF-8: json.loads(bytes) would also take UTF-16, or raw surrogates (surrogatepass).
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refused("not UTF-8") from None
    try:
        return json.loads(
            text,
            parse_int=lambda text: JsonNumber(text, True),
            parse_float=lambda text: JsonNumber(text, False),
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise Refused(f"json refuses it: {type(exc).__name__}") from None


def as_text(value) -> str | None:
    """A JSON scalar as the contract's text, by the rules above."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, JsonNumber):
        if value.integral:
            return "0" if value.text == "-0" else value.text
        number = float(value.text)
        if math.isinf(number):
            raise Refused("a number beyond a float's range")
        return format(decimal.Decimal(repr(number)).normalize(), "f")
    raise Refused(f"a JSON {type(value).__name__} where a value belongs")


def shape_of(dtype):
    """A raw schema's shape, worked out once: None for a leaf, ("list", inner) or ("struct", ((name, shape), ...))."""
    if isinstance(dtype, pl.List):
        return ("list", shape_of(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return ("struct", tuple((f.name, shape_of(f.dtype)) for f in dtype.fields))
    return None


def declared(value, shape, path: str = ""):
    """The declared part of a raw value (its shape_of schemas.RAW_*): texts at the leaves, None for a null or absent object."""
    if shape is None:
        return as_text(value)
    kind, inner = shape
    if kind == "list":
        if not isinstance(value, list):
            raise Refused(f"{path} is not an array")
        return [declared(item, inner, path) for item in value]
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused(f"{path} is not an object")
    return {name: declared(value.get(name), field, f"{path}.{name}") for name, field in inner}


RAW_SHAPE = shape_of(pl.Struct(RAW_RESPONSE))


def dotted(record: dict | None, path: str):
    """A dotted field of a declared record, None where any object on the way is null."""
    for name in path.split("."):
        if record is None:
            return None
        record = record[name]
    return record


def whole(text: str) -> int:
    """A whole-number column's value, or Refused."""
    if not WHOLE_TEXT.fullmatch(text) or not INT32[0] <= int(text) <= INT32[1]:
        raise Refused("not a whole number")
    return int(text)


def coordinate(text: str, bound: float) -> float:
    """A latitude or longitude, or Refused."""
    if not FLOAT_TEXT.fullmatch(text) or not -bound <= float(text) <= bound:
        raise Refused("not a coordinate")
    return float(text)


def utc_instant(text: str) -> dt.datetime:
    """An instant column's value in UTC, or Refused."""
    match = INSTANT_TEXT.fullmatch(text)
    if not match:
        raise Refused("not an instant")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = dt.timedelta(0) if zone == "Z" else int(zone[0] + "1") * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        local = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), int((fraction or "0")[:6].ljust(6, "0")))
        return (local.replace(tzinfo=dt.UTC) - offset).astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise Refused("not a real instant") from None


def reference_rows(body: bytes, ingested_at: dt.datetime) -> list[dict]:
    """Every contract row of an answer (no expectations), from Python's json by the rules above; Refused otherwise."""
    doc = standard_json(body)
    if not isinstance(doc, dict):
        raise Refused("not one JSON object")
    if doc.get("results") is None:
        raise Refused("no results")
    top = declared(doc, RAW_SHAPE)
    if top["error"] is not None:
        raise Refused("a service error")
    info = top["info"] or dict.fromkeys(("seed", "results", "page", "version"))
    if info["page"] is not None and not re.fullmatch(r"[1-9][0-9]{0,4}", info["page"]):
        raise Refused("info.page is no page number")
    if info["results"] is not None and info["results"] != str(len(top["results"])):
        raise Refused("info.results contradicts the users")
    rows = []
    for user in top["results"]:
        text = {name: dotted(user, source) for name, source in FROM_USER.items()}
        if text["user_id"] == "":
            text["user_id"] = None
        for name in ("national_id_type", "national_id"):
            text[name] = text[name] or None
        if any(value is None for name, value in text.items() if name not in ("national_id_type", "national_id")):
            raise Refused("a required field is null")
        if any(LONE_SURROGATE.search(value) for value in text.values() if value is not None):
            raise Refused("a lone surrogate in a landed text")
        if any(len(value.encode("utf-8", "surrogatepass")) > MAX_FIELD_BYTES for value in text.values() if value is not None):
            raise Refused("a text field past the contract's length bound")
        rows.append(
            {
                **text,
                "full_name": f"{text['first_name']} {text['last_name']}",
                "date_of_birth": utc_instant(text["date_of_birth"]),
                "age": whole(text["age"]),
                "registered_at": utc_instant(text["registered_at"]),
                "street_number": whole(text["street_number"]),
                "street_address": f"{whole(text['street_number'])} {text['street_name']}",
                "latitude": coordinate(text["latitude"], 90),
                "longitude": coordinate(text["longitude"], 180),
            }
        )
    if len({row["user_id"] for row in rows}) < len(rows):
        raise Refused("a user id repeats")
    if any(LONE_SURROGATE.search(info[name] or "") for name in ("seed", "version")):
        raise Refused("a lone surrogate in info")
    meta = {"seed": info["seed"] or None, "page": int(info["page"]) if info["page"] else None, "api_version": info["version"], "ingested_at": ingested_at}
    return [{name: {**row, **meta}[name] for name in COLUMNS} for row in rows]


# ---------------------------------------------------------------- raw users, read by the rules above

META = ("seed", "page", "api_version", "ingested_at")  # a page's columns, not a user's
USER_COLUMNS = tuple(name for name in COLUMNS if name not in META)


def user_rows(users: list[dict]) -> dict[str, dict]:
    """Each raw user's contract columns (no page metadata), keyed by user id, by reference_rows."""
    return {row["user_id"]: {name: row[name] for name in USER_COLUMNS} for row in rows_read(json.dumps({"results": users}).encode())}


@functools.lru_cache(maxsize=8)
def rows_read(body: bytes) -> tuple[dict, ...]:
    """reference_rows of a body of users alone, read once: tests check the same users many times (never change what it gives)."""
    return tuple(reference_rows(body, ingested_at=None))


def row_key(row: dict) -> tuple:
    """A reference row's sort key (nationality, last name, first name, id): the order of a landed batch."""
    return (row["nationality"], row["last_name"], row["first_name"], row["user_id"])


def raw_key(user: dict) -> tuple:
    """A raw user's sort key, read as the contract reads it."""
    (row,) = user_rows([user]).values()
    return row_key(row)
