"""Delta tables without Spark: delta-rs (``deltalake``) for the log (schema, files,
properties, history) and bookkeeping appends, pyarrow's own filesystem for the Parquet
files. Local folders and object stores alike: every call takes its storage options and
filesystem from :mod:`pipeline.storage`.

Not delta-rs' ``to_pyarrow_dataset()``: its Rust filesystem handler, called from
pyarrow's I/O threads, aborts the process at interpreter exit ("terminate called
without an active exception", delta-io/delta-rs#2184) in 5 of 10 runs measured
here on the demo table; ``file_uris()`` read by pyarrow: 0 of 10. The file list
is the snapshot's, so the rows are the table's, as long as no deletion vectors
or column mapping are in play (those tables are refused here: read them with
Spark).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline import storage

if TYPE_CHECKING:
    from deltalake import DeltaTable


class NotReadableHere(Exception):
    """The table uses a feature this reader does not apply (deletion vectors, ...)."""


def open_table(path: str) -> DeltaTable:
    """The table at ``path`` (delta-rs raises TableNotFoundError where there is none)."""
    from deltalake import DeltaTable

    path = storage.normalize(path)
    return DeltaTable(path, storage_options=storage.settings().delta_options(path))


def is_table(path: str) -> bool:
    """A Delta table is at ``path`` (a local folder with a ``_delta_log``, or a log that
    delta-rs finds in the object store)."""
    from deltalake import DeltaTable

    path = storage.normalize(path)
    return DeltaTable.is_deltatable(path, storage.settings().delta_options(path))


def unreadable_because(table: DeltaTable) -> str | None:
    """The feature this reader would not apply (its rows would be wrong), or None."""
    if "deletionVectors" in (table.protocol().reader_features or []):
        return "deletion vectors"
    if table.metadata().configuration.get("delta.columnMapping.mode", "none") != "none":
        return "column mapping"
    return None


def arrow_dataset(table: DeltaTable) -> ds.Dataset:
    """The snapshot's rows as a pyarrow dataset, in the table's schema (files written
    before a column was added read it as null)."""
    why = unreadable_because(table)
    if why:
        raise NotReadableHere(f"{table.table_uri} uses {why}")
    schema = pa.schema(cast(Any, table.schema().to_arrow()))  # arro3 -> pyarrow (C data)
    partitions = table.metadata().partition_columns
    settings = storage.settings()
    fs, base = settings.filesystem(storage.normalize(table.table_uri))
    files = [settings.filesystem(storage.normalize(uri))[1] for uri in table.file_uris()]
    return ds.dataset(files, schema=schema, format="parquet", filesystem=fs,
                      partitioning="hive" if partitions else None,
                      partition_base_dir=base if partitions else None)


def dataset(path: str) -> ds.Dataset:
    return arrow_dataset(open_table(path))


def read_pandas(path: str, equal: dict[str, Any] | None = None) -> Any:
    """The rows of a small table (a runs or drift table) as pandas, filtered on
    ``column == value`` for each item of ``equal`` (pushed down to the Parquet scan)."""
    import pyarrow.compute as pc

    filt = None
    for column, value in (equal or {}).items():
        term = pc.field(column) == value
        filt = term if filt is None else filt & term
    return dataset(path).to_table(filter=filt).to_pandas()


def txn_committed(table: DeltaTable | None, txn: tuple[str, int]) -> bool:
    """The table's log records this txn (app id, version) or a later version of it."""
    stored = table.transaction_version(txn[0]) if table is not None else None
    return stored is not None and stored >= txn[1]


# --------------------------------------------------------------------------- appends

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(), "long": pa.int64(), "bigint": pa.int64(), "int": pa.int32(),
    "double": pa.float64(), "float": pa.float32(), "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),  # Delta's timestamp: UTC microseconds
}


class NotWritableHere(Exception):
    """delta-rs will not append to this table (a writer feature it lacks, a schema it
    cannot merge): Spark's writer decides."""


def arrow_schema(ddl: str) -> pa.Schema:
    """A flat Spark DDL schema (``a string, `b` array<float>``) as pyarrow's, the way
    Spark stores it in Delta (every field nullable)."""
    fields = []
    for column in ddl.split(", "):
        name, kind = column.strip().split(None, 1)
        inner = kind.removeprefix("array<").removesuffix(">")
        arrow = _ARROW_TYPES[inner]
        fields.append(pa.field(name.strip("`"), pa.list_(arrow) if inner != kind else arrow))
    return pa.schema(fields)


def append(path: str, ddl: str, rows: list[dict[str, Any]], user_metadata: str,
           merge_schema: bool = False) -> None:
    """Append driver-side rows to a table (created where there is none) in one
    commit whose ``userMetadata`` is ``user_metadata``, as Spark's append does; keys
    outside ``ddl`` are ignored, missing ones are null; ``merge_schema`` adds the
    columns the table lacks."""
    from deltalake import CommitProperties, write_deltalake
    from deltalake.exceptions import DeltaProtocolError, SchemaMismatchError

    schema = arrow_schema(ddl)
    data = pa.Table.from_pylist([{n: row.get(n) for n in schema.names} for row in rows],
                                schema=schema)
    try:
        path = storage.normalize(path)
        write_deltalake(path, data, mode="append",
                        storage_options=storage.settings().delta_options(path),
                        schema_mode="merge" if merge_schema else None,
                        commit_properties=CommitProperties(
                            custom_metadata={"userMetadata": user_metadata}))
    except (DeltaProtocolError, SchemaMismatchError) as exc:
        raise NotWritableHere(f"{path}: {exc}") from exc
