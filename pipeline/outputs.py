"""Output columns as Spark and Delta see them: their Spark types, the column metadata a
reader decodes them by, and the part of each spec a table's identity keeps.

The arithmetic of the cuts (truncate or project, renormalize, int8 ranges) is the
encoder core's: :mod:`pipeline.encoder.cuts`; the stored bytes:
:mod:`pipeline.encoder.codec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import OutputSpec
from pipeline.encoder.codec import ENCODING, stored_length


def to_spark_arrow(column: pa.Array) -> pa.Array:
    """Spark's ArrayType travels as an Arrow list: rewrap fixed-size lists (no copy)."""
    if not isinstance(column, pa.FixedSizeListArray):
        return column
    n, dim = len(column), column.type.list_size
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, column.values)


def spark_type(spec: OutputSpec) -> Any:
    from pyspark.sql.types import (
        ArrayType,
        BinaryType,
        ByteType,
        FloatType,
        IntegerType,
        StructField,
        StructType,
    )

    if spec.kind == "sparse":  # pipeline.encoder.splade.arrow_type
        values = BinaryType() if spec.dtype == "float16" else ArrayType(FloatType(), False)
        return StructType([StructField("indices", ArrayType(IntegerType(), False), False),
                           StructField("values", values, False)])
    if spec.dtype == "float32":
        return ArrayType(FloatType(), False)
    if spec.dtype == "int8":
        return ArrayType(ByteType(), False)
    return BinaryType()




def column_metadata(spec: OutputSpec, model_pooling: str) -> dict:
    """What a reader needs to decode one stored column, kept in the Delta schema's
    column metadata (Delta has no fixed-size array type: every reader sees a
    variable-length list or bytes). ``embed.length`` is the stored length: array
    elements, or bytes for the binary-typed columns."""
    if spec.kind == "sparse":
        return {"embed.kind": "sparse", "embed.dtype": spec.dtype,
                "embed.max_active_dims": spec.max_active_dims or "model",
                "embed.min_weight": spec.min_weight,
                "embed.encoding": "struct of ascending vocabulary ids (indices) and their "
                                  + ("float16 weights as little-endian bytes (values)"
                                     if spec.dtype == "float16" else "weights (values)")}
    length = stored_length(spec)
    return {"embed.dim": spec.dim, "embed.dtype": spec.dtype, "embed.length": length,
            "embed.layer": spec.layer if spec.layer is not None else "last",
            "embed.reduce": spec.reduce + (" (centred)" if spec.center else ""),
            "embed.normalize": spec.normalize,
            "embed.pooling": spec.pooling or model_pooling, "embed.encoding": ENCODING[spec.dtype]}


def describe(specs: Iterable[OutputSpec]) -> list[dict]:
    """The part of each spec that decides the stored bytes (kept in table properties)."""
    # reduce/center only where not the default: identities of older tables stay equal
    return [{"name": s.name, "dim": s.dim, "layer": s.layer, "dtype": s.dtype,
             "normalize": s.normalize, "pooling": s.pooling,
             **({"reduce": s.reduce, "center": s.center} if s.reduce != "truncate" else {}),
             **({"kind": s.kind, "max_active_dims": s.max_active_dims,
                 "min_weight": s.min_weight} if s.kind == "sparse" else {})}
            for s in specs]
