"""Output columns: cut one pooled vector into several stored columns.

Order of operations per column (as sentence-transformers does it):
pool -> truncate to ``dim`` -> L2-renormalize -> cast to the stored dtype.
Spark-free: numpy in, Arrow out.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import OutputSpec


def cut(pooled: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Truncate a [B, H] float32 matrix to ``spec.dim`` and renormalize."""
    vecs = pooled[:, : spec.dim]
    if spec.normalize:
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def arrow_type(spec: OutputSpec) -> pa.DataType:
    return pa.list_(pa.float32(), spec.dim)


def to_arrow(matrix: np.ndarray, spec: OutputSpec) -> pa.Array:
    """[N, dim] float32 -> FixedSizeList<float32>[dim] (zero-copy over the buffer)."""
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, spec.dim)


def spark_ddl(spec: OutputSpec) -> str:
    return "ARRAY<FLOAT>"


def describe(specs: tuple[OutputSpec, ...]) -> list[dict]:
    """The part of each spec that decides the stored bytes (kept in table properties)."""
    return [{"name": s.name, "dim": s.dim, "dtype": s.dtype, "normalize": s.normalize}
            for s in specs]
