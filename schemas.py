"""The raw randomuser.me 1.4 response schema and the output contract, as Polars dtypes.

The raw schema is what `transform` parses a response body against: every field is
declared, so no type is ever guessed from the first rows. Numbers are declared as
text and parsed strictly by the transform, because a JSON reader told "integer"
silently truncates 1.5 to 1 and turns true into 1; read as text, such a value fails
the strict parse and the run says so. Fields the service sends
but the contract does not need (login.password, salt and hashes among them) are not
declared, so they are never even parsed.
"""

import polars as pl
from polars.datatypes import DataTypeClass

# A column's type as written here: a dtype (pl.List(...), UTC_INSTANT) or a dtype class (pl.String).
# Named so that a dict mixing the two types as Polars takes it, not as a dict of `object`.
Dtype = pl.DataType | DataTypeClass

S = pl.String

RAW_USER = pl.Struct(
    {
        "gender": S,
        "name": pl.Struct({"title": S, "first": S, "last": S}),
        "location": pl.Struct(
            {
                "street": pl.Struct({"number": S, "name": S}),
                "city": S,
                "state": S,
                "country": S,
                # An integer for most nationalities, a string for GB, CA, NO ("0564"):
                # read as text so neither kind is lost or reshaped.
                "postcode": S,
                # Strings in the source; parsed and range-checked by the transform.
                "coordinates": pl.Struct({"latitude": S, "longitude": S}),
                "timezone": pl.Struct({"offset": S, "description": S}),
            }
        ),
        "email": S,
        "login": pl.Struct({"uuid": S, "username": S}),
        "dob": pl.Struct({"date": S, "age": S}),
        "registered": pl.Struct({"date": S, "age": S}),
        "phone": S,
        "cell": S,
        "id": pl.Struct({"name": S, "value": S}),
        "picture": pl.Struct({"large": S}),
        "nat": S,
    }
)

RAW_INFO = pl.Struct({"seed": S, "results": S, "page": S, "version": S})

RAW_RESPONSE_FIELDS: dict[str, Dtype] = {"results": pl.List(RAW_USER), "info": RAW_INFO, "error": S}
RAW_RESPONSE = pl.Schema(RAW_RESPONSE_FIELDS)

# The top-level user fields the contract needs: asked for with `inc=` to keep answers lean.
INCLUDED_FIELDS = tuple(RAW_USER.to_schema())

UTC_INSTANT = pl.Datetime("us", "UTC")

# The output contract: names, order and types of every landed column.
OUTPUT_COLUMNS: dict[str, Dtype] = {
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
    "date_of_birth": UTC_INSTANT,
    "age": pl.Int32,
    "registered_at": UTC_INSTANT,
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
    "ingested_at": UTC_INSTANT,
}
OUTPUT_SCHEMA = pl.Schema(OUTPUT_COLUMNS)


# Each output column's PII class and how it reaches the analyst lake (random_user_etl.pseudonymise):
# (class, treatment, the analyst column's name). A class: `direct` identifies a person alone, `quasi`
# identifies in combination with other columns (birth date, place, gender), `none` says nothing of
# the person. A treatment: `person_key` is the keyed HMAC-SHA256 of the id; `drop` leaves the column
# out; `keep` copies it; `decade` keeps a date's decade (1987-03-02 -> 1980).
# Every direct identifier but the id is dropped. Of the quasi-identifiers only coarse global recodings
# are kept, each one a k-anonymity check covers: gender, birth decade and nationality together keep
# 100% of a 5,000-user page of the fake service unsuppressed at k = 5, and 98.3% once its columns
# are shuffled apart as truly random people would be (the fake repeats 280 people); adding the
# registration year keeps 7%, a state or a time zone under 5%, the title 67%. Country, the id
# scheme and time zone say no more than nationality does, or place a person too finely.
DIRECT, QUASI, NONE = "direct", "quasi", "none"
PERSON_KEY, DROP, KEEP, DECADE = "person_key", "drop", "keep", "decade"
PII: dict[str, tuple[str, str, str]] = {
    "user_id": (DIRECT, PERSON_KEY, "person_key"),
    "gender": (QUASI, KEEP, "gender"),
    "title": (QUASI, DROP, ""),  # says gender, and for some nationalities marital status; with gender and nationality it splits groups too finely (67% kept)
    "first_name": (DIRECT, DROP, ""),
    "last_name": (DIRECT, DROP, ""),
    "full_name": (DIRECT, DROP, ""),
    "email": (DIRECT, DROP, ""),
    "username": (DIRECT, DROP, ""),
    "phone": (DIRECT, DROP, ""),
    "cell": (DIRECT, DROP, ""),
    "date_of_birth": (QUASI, DECADE, "birth_decade"),
    "age": (QUASI, DROP, ""),  # the birth decade says it to within ten years
    "registered_at": (QUASI, DROP, ""),  # even its year leaves 7% of people in groups of five
    "street_number": (DIRECT, DROP, ""),
    "street_name": (DIRECT, DROP, ""),
    "street_address": (DIRECT, DROP, ""),
    "city": (QUASI, DROP, ""),
    "state": (QUASI, DROP, ""),
    "country": (QUASI, DROP, ""),  # the service's country is the nationality's
    "postcode": (QUASI, DROP, ""),
    "latitude": (QUASI, DROP, ""),
    "longitude": (QUASI, DROP, ""),
    "timezone_offset": (QUASI, DROP, ""),
    "timezone_description": (QUASI, DROP, ""),
    "national_id_type": (QUASI, DROP, ""),  # names the country's id scheme; names the nationality's id scheme
    "national_id": (DIRECT, DROP, ""),
    "nationality": (QUASI, KEEP, "nationality"),
    "picture_url": (DIRECT, DROP, ""),
    "seed": (NONE, KEEP, "seed"),
    "page": (NONE, KEEP, "page"),
    "api_version": (NONE, KEEP, "api_version"),
    "ingested_at": (NONE, KEEP, "ingested_at"),
}
PII_CLASSES = {column: kind for column, (kind, _, _) in PII.items()}
TREATMENTS = {column: (how, name) for column, (_, how, name) in PII.items()}

# Where a landed file's key-value metadata holds the classes (JSON, column to class), for readers of
# the footer (DuckDB's parquet_kv_metadata, Polars' read_parquet_metadata); beside the quality report.
PII_METADATA_KEY = "random_user_etl.pii"


def pii_field_metadata() -> dict[str, dict[str, str]]:
    """The Arrow field metadata of the contract: each output column's {"pii": class}, in the contract's order."""
    return {name: {"pii": PII_CLASSES[name]} for name in OUTPUT_SCHEMA}


# Where each user column comes from in the raw answer, for error messages that name it.
SOURCE_FIELDS = {
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

# Every user text field is at most this many bytes (UTF-8), a contract check made right after
# parsing. The longest real field is 48 bytes (a picture URL). Bounding every field bounds a row,
# so typed pages, staged parts and sort runs (all held by row count) are bounded by the settings,
# whatever the answers hold (the README's "Memory" paragraph has the measured peaks).
MAX_FIELD_BYTES = 256

# The service leaves national ids empty or null for some nationalities; every other
# user column must be present in every record.
NULLABLE_COLUMNS = frozenset({"national_id_type", "national_id"})

# A rerun of a seed gives the same rows in the same order.
SORT_KEY = ("nationality", "last_name", "first_name", "user_id")

# Where the batch's data-quality report lives in the parquet key-value metadata.
QUALITY_METADATA_KEY = "random_user_etl.quality"
