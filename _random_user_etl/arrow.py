"""Arrow schemas with field metadata: what a parquet file embeds for its readers, since Polars keeps no field metadata."""

from __future__ import annotations

from typing import Any
import polars as pl


def with_field_metadata(schema: pl.Schema, metadata: dict[str, dict[str, str]]) -> Any:
    """`schema` as the Arrow schema Polars embeds in a parquet file (sink_parquet's arrow_schema), each field with its metadata."""
    # Polars writes a field's metadata only from an Arrow schema given with the rows, of their very
    # names and types: these are Polars' own, read through the Arrow C stream interface of an empty
    # frame. nanoarrow (Apache Arrow's small C library, no dependencies) builds the schema; imported
    # here, when a file is written, not at every start.
    import nanoarrow as na

    arrow = na.Schema(na.c_array_stream(schema.to_frame()).get_schema())
    fields = (arrow.field(index) for index in range(arrow.n_fields))
    return na.struct([na.Schema(field, metadata=metadata.get(str(field.name), {})) for field in fields])
