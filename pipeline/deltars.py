"""Reading Delta tables without Spark: delta-rs (``deltalake``) for the log (schema,
files, properties, history), pyarrow's own filesystem for the Parquet files.

Not delta-rs' ``to_pyarrow_dataset()``: its Rust filesystem handler, called from
pyarrow's I/O threads, aborts the process at interpreter exit ("terminate called
without an active exception", delta-io/delta-rs#2184) in 5 of 10 runs measured
here on the demo table; ``file_uris()`` read by pyarrow: 0 of 10. The file list
is the snapshot's, so the rows are the table's, as long as no deletion vectors
or column mapping are in play (those tables are refused here: read them with
Spark).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.dataset as ds

if TYPE_CHECKING:
    from deltalake import DeltaTable


class NotReadableHere(Exception):
    """The table uses a feature this reader does not apply (deletion vectors, ...)."""


def open_table(path: str) -> DeltaTable:
    """The table at ``path`` (delta-rs raises TableNotFoundError where there is none)."""
    from deltalake import DeltaTable

    return DeltaTable(str(Path(path).resolve()) if "://" not in path else path)


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
    base = table.table_uri.removeprefix("file://")
    return ds.dataset(table.file_uris(), schema=schema, format="parquet",
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
