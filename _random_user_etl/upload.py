"""The batch's upload, the job of a process of its own (own_process): a finished file streamed to its object key."""

from __future__ import annotations

from typing import TYPE_CHECKING
import polars as pl
from _random_user_etl.arrow import with_field_metadata
from _random_user_etl.errors import write_error

if TYPE_CHECKING:
    from polars.io.partition import SinkedPathsCallbackArgs


def send(job: dict) -> dict:
    """Upload the finished batch file `job["path"]` to `job["destination"]`: the object's size in bytes, or why not."""
    sinked: list[SinkedPathsCallbackArgs] = []
    try:
        # Polars reads no field metadata: the job sends it (the PII classes), to be embedded in the object again.
        options = dict(job["sink"])
        rows = pl.scan_parquet(job["path"], glob=False)
        fields = with_field_metadata(rows.collect_schema(), options.pop("field_metadata", {}))
        rows.sink_parquet(job["destination"], arrow_schema=fields, sinked_paths_callback=sinked.append, **options)
    except BaseException as exc:  # a panic inside Polars too: the run that started this says it in its one line
        return {"timeout": isinstance(exc, TimeoutError), "said": write_error(exc)}
    return {"bytes": sum(path.num_bytes for args in sinked for path in args.paths)}
