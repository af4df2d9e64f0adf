"""A file's PII classes: the key-value metadata and the Arrow field metadata that carry them."""

from __future__ import annotations

import ctypes
import json
import struct
from typing import Any
import polars as pl


PII_METADATA_KEY = "random_user_etl.pii"  # the file's key-value metadata: every column's class, as JSON
PII_FIELD_KEY = "pii"  # each field's Arrow metadata: its own class


def pii_metadata(classes: dict[str, str]) -> dict[str, str]:
    """The key-value metadata naming each column's class."""
    return {PII_METADATA_KEY: json.dumps(classes)}


def with_field_classes(options: dict[str, Any], schema: pl.Schema) -> dict[str, Any]:
    """Parquet write options, plus an Arrow schema whose fields carry their classes when the options' metadata names them."""
    # Polars writes field metadata only from an Arrow schema given to the sink, and never keeps it
    # through a scan: a file uploaded after it was written gets it here again from its own classes.
    named = (options.get("metadata") or {}).get(PII_METADATA_KEY)
    if named is None:
        return options
    return {**options, "arrow_schema": ClassedSchema(schema, json.loads(named))}


class ArrowSchemaC(ctypes.Structure):
    """The Arrow C data interface's ArrowSchema struct."""


ArrowSchemaC._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_void_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(ArrowSchemaC))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
capsule_pointer.restype, capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def encoded_metadata(pairs: dict[str, str]) -> bytes:
    """Key-value pairs in the C data interface's encoding: a count, then each key and value with its length (int32, little-endian)."""
    out = struct.pack("<i", len(pairs))
    for key, value in pairs.items():
        for text in (key.encode(), value.encode()):
            out += struct.pack("<i", len(text)) + text
    return out


class ClassedSchema:
    """A Polars schema exported through the Arrow C data interface with each field's class as its metadata (no pyarrow needed)."""

    def __init__(self, schema: pl.Schema, classes: dict[str, str]):
        self.schema, self.classes = schema, classes
        self.held: list[ctypes.Array] = []

    def __arrow_c_schema__(self):
        """Polars' own export of the schema, each top-level field given its class."""
        # Polars' release callback frees what it allocated from its private data, never through the
        # struct's metadata pointer: the buffers set here are this object's, held while it lives.
        capsule = self.schema.__arrow_c_schema__()
        top = ArrowSchemaC.from_address(capsule_pointer(capsule, b"arrow_schema"))
        for index in range(top.n_children):
            field = top.children[index].contents
            name = (field.name or b"").decode()
            if name in self.classes:
                buffer = ctypes.create_string_buffer(encoded_metadata({PII_FIELD_KEY: self.classes[name]}))
                self.held.append(buffer)
                field.metadata = ctypes.addressof(buffer)
        return capsule
