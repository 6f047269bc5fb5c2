"""Table schemas: the JSON files in schemas/ are the truth; this module turns them into pyarrow.

Every table write goes through `validate`, so a stage cannot publish a column the schema does not know,
miss a required one, or put a null where the schema forbids it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import UserError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


class SchemaError(UserError):
    """A table does not match its schema file."""


_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "binary": pa.binary(),
    "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
}


def arrow_type(spec: str) -> pa.DataType:
    """Map a schema type string ("int64", "list<string>", ...) to a pyarrow type."""
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(arrow_type(spec[5:-1]))
    try:
        return _SCALARS[spec]
    except KeyError:
        raise SchemaError(f"unknown type {spec!r} in a schema file; known: {sorted(_SCALARS)}") from None


@cache
def schema_doc(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))
        raise SchemaError(f"no schema file for table {name!r} ({path}); known tables: {known}")
    return json.loads(path.read_text())


@cache
def arrow_schema(name: str) -> pa.Schema:
    doc = schema_doc(name)
    fields = [pa.field(f["name"], arrow_type(f["type"]), nullable=f.get("nullable", True)) for f in doc["fields"]]
    return pa.schema(fields, metadata={"synsetforge.table": name, "synsetforge.schema_version": str(doc["version"])})


def schema_version(name: str) -> int:
    return int(schema_doc(name)["version"])


def table_names() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json") if "fields" in json.loads(p.read_text()))


def validate(name: str, data: Any) -> pa.Table:
    """Return `data` (pyarrow Table or pandas DataFrame) as a Table with exactly the schema of `name`.

    Columns are reordered and safely cast; a missing column, an extra column, a lossy cast or a null in
    a non-nullable column raises SchemaError naming the table and the column.
    """
    schema = arrow_schema(name)
    if not isinstance(data, pa.Table):
        try:
            data = pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise SchemaError(f"table {name!r}: cannot convert to Arrow: {exc}") from exc
    missing = [f for f in schema.names if f not in data.column_names]
    extra = [c for c in data.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"table {name!r}: missing columns {missing}, unexpected columns {extra}")
    columns = []
    for field in schema:
        column = data.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"table {name!r}, column {field.name!r}: {column.type} does not cast to {field.type}: {exc}"
                ) from exc
        if not field.nullable and column.null_count:
            raise SchemaError(f"table {name!r}, column {field.name!r}: {column.null_count} null value(s) not allowed")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def empty_table(name: str) -> pa.Table:
    return arrow_schema(name).empty_table()
