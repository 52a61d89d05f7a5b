"""Output columns: cut one pooled vector into several stored columns.

Order of operations per column (as sentence-transformers does it):
pool -> truncate to ``dim`` -> L2-renormalize -> quantize.

Stored types (Arrow -> Spark):

| dtype   | Arrow                     | Spark          | bytes per row |
|---------|---------------------------|----------------|---------------|
| float32 | fixed_size_list<float32>  | array<float>   | 4 x dim       |
| float16 | binary (IEEE half, LE)    | binary         | 2 x dim       |
| int8    | fixed_size_list<int8>     | array<tinyint> | dim           |
| uint8   | binary                    | binary         | dim           |
| binary  | binary (packbits - 128)   | binary         | dim / 8       |
| ubinary | binary (packbits)         | binary         | dim / 8       |

Spark has neither a half-float nor an unsigned byte type, hence binary for
those. int8/uint8 use per-dimension ranges from a calibration sample stored
with the table (never per-batch ranges, so vectors stay comparable across
runs); ``binary``/``ubinary`` follow sentence-transformers' quantize_embeddings.

Spark-free: numpy in, Arrow out.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.config import CALIBRATED_DTYPES, OutputSpec


class Calibration:
    """Per-column, per-dimension (min, max) ranges for int8/uint8 columns."""

    def __init__(self, ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.ranges = {k: (np.asarray(lo, np.float32), np.asarray(hi, np.float32))
                       for k, (lo, hi) in (ranges or {}).items()}

    @classmethod
    def fit(cls, vectors: dict[str, np.ndarray]) -> Calibration:
        return cls({k: (v.min(axis=0), v.max(axis=0)) for k, v in vectors.items()})

    def to_json(self) -> str:
        return json.dumps({k: {"min": lo.tolist(), "max": hi.tolist()}
                           for k, (lo, hi) in sorted(self.ranges.items())})

    @classmethod
    def from_json(cls, text: str | None) -> Calibration:
        data = json.loads(text) if text else {}
        return cls({k: (v["min"], v["max"]) for k, v in data.items()})

    def __bool__(self) -> bool:
        return bool(self.ranges)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (parity checks)."""
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def needs_calibration(specs) -> list[OutputSpec]:
    return [s for s in specs if s.dtype in CALIBRATED_DTYPES]


def cut(pooled: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Truncate a [B, H] float32 matrix to ``spec.dim`` and renormalize."""
    vecs = pooled[:, : spec.dim]
    if spec.normalize:
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def quantize(vecs: np.ndarray, spec: OutputSpec, calibration: Calibration | None = None):
    """float32 [N, dim] -> the stored dtype's numpy array ([N, dim] or [N, dim/8])."""
    if spec.dtype == "float32":
        return vecs
    if spec.dtype == "float16":
        return vecs.astype("<f2")
    if spec.dtype in ("binary", "ubinary"):
        packed = np.packbits(vecs > 0, axis=-1)
        return packed if spec.dtype == "ubinary" else (packed.astype(np.int16) - 128).astype(
            np.int8)
    if calibration is None or spec.name not in calibration.ranges:
        raise ValueError(f"column {spec.name!r} ({spec.dtype}) needs calibration ranges")
    lo, hi = calibration.ranges[spec.name]
    steps = np.maximum((hi - lo) / 255.0, 1e-12)
    levels = np.clip(np.floor((vecs - lo) / steps), 0, 255)
    return (levels - 128).astype(np.int8) if spec.dtype == "int8" else levels.astype(np.uint8)


def dequantize(values: np.ndarray, spec: OutputSpec, calibration: Calibration) -> np.ndarray:
    """Approximate float32 vectors back from int8/uint8 (bucket centres)."""
    lo, hi = calibration.ranges[spec.name]
    steps = (hi - lo) / 255.0
    levels = values.astype(np.float32) + (128 if spec.dtype == "int8" else 0)
    return lo + (levels + 0.5) * steps


def row_bytes(spec: OutputSpec) -> int:
    """Payload bytes per row of one column (no container overhead)."""
    return {"float32": 4 * spec.dim, "float16": 2 * spec.dim, "int8": spec.dim,
            "uint8": spec.dim, "binary": spec.dim // 8, "ubinary": spec.dim // 8}[spec.dtype]


def to_arrow(values: np.ndarray, spec: OutputSpec) -> pa.Array:
    """Stored numpy values -> the column's Arrow array (see the table above)."""
    n = values.shape[0]
    if spec.dtype in ("float32", "int8"):
        return pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(values).reshape(-1)), spec.dim)
    width = row_bytes(spec)
    data = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, _buffer(offsets), _buffer(data)])


def _buffer(values: np.ndarray) -> pa.Buffer:
    """A contiguous numpy array's bytes as an Arrow buffer (pa.array wraps it, no copy)."""
    buffer = pa.array(values.reshape(-1)).buffers()[1]
    assert buffer is not None
    return buffer


def to_spark_arrow(column: pa.Array) -> pa.Array:
    """Spark's ArrayType travels as an Arrow list: rewrap fixed-size lists (no copy)."""
    if not isinstance(column, pa.FixedSizeListArray):
        return column
    n, dim = len(column), column.type.list_size
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, column.values)


def spark_type(spec: OutputSpec):
    from pyspark.sql.types import ArrayType, BinaryType, ByteType, FloatType

    if spec.dtype == "float32":
        return ArrayType(FloatType(), False)
    if spec.dtype == "int8":
        return ArrayType(ByteType(), False)
    return BinaryType()


def from_stored(value, spec: OutputSpec) -> np.ndarray:
    """One stored cell (a list or bytes, as Spark returns it) -> numpy."""
    if spec.dtype == "float32":
        return np.asarray(value, dtype=np.float32)
    if spec.dtype == "int8":
        return np.asarray(value, dtype=np.int8)
    raw = np.frombuffer(bytes(value), dtype=np.uint8)
    if spec.dtype == "float16":
        return raw.view("<f2").astype(np.float32)
    return raw.view(np.int8) if spec.dtype == "binary" else raw


ENCODING = {"float32": "float32 array", "int8": "int8 array (calibrated ranges)",
            "float16": "IEEE half, little-endian bytes", "uint8": "uint8 bytes (calibrated ranges)",
            "binary": "packbits - 128 bytes", "ubinary": "packbits bytes"}


def column_metadata(spec: OutputSpec, model_pooling: str) -> dict:
    """What a reader needs to decode one stored column, kept in the Delta schema's
    column metadata (Delta has no fixed-size array type: every reader sees a
    variable-length list or bytes). ``embed.length`` is the stored length: array
    elements, or bytes for the binary-typed columns."""
    length = spec.dim if spec.dtype in ("float32", "int8") else row_bytes(spec)
    return {"embed.dim": spec.dim, "embed.dtype": spec.dtype, "embed.length": length,
            "embed.layer": spec.layer if spec.layer is not None else "last",
            "embed.reduce": "truncate", "embed.normalize": spec.normalize,
            "embed.pooling": spec.pooling or model_pooling, "embed.encoding": ENCODING[spec.dtype]}


def describe(specs) -> list[dict]:
    """The part of each spec that decides the stored bytes (kept in table properties)."""
    return [{"name": s.name, "dim": s.dim, "layer": s.layer, "dtype": s.dtype,
             "normalize": s.normalize, "pooling": s.pooling} for s in specs]
