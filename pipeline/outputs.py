"""Output columns: cut one pooled vector into several stored columns.

Order of operations per column (as sentence-transformers does it):
pool -> truncate to ``dim`` -> L2-renormalize -> quantize; with ``reduce: pca``:
pool -> L2-normalize -> (centre) -> project onto the table's ``dim`` axes ->
L2-renormalize -> quantize (int8 ranges are fitted on the projected values).

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

import hashlib
import json

import numpy as np
import pyarrow as pa

from pipeline.config import CALIBRATED_DTYPES, OutputSpec


class Projection:
    """A ``reduce: pca`` column's map from the pooled vector to ``dim``: the top
    ``dim`` principal axes of the (uncentred, or with ``center`` centred) second-
    moment matrix of a sample's L2-normalized vectors. Fitted once per table."""

    def __init__(self, matrix: np.ndarray, mean: np.ndarray | None = None):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # [H, dim]
        self.mean = None if mean is None else np.asarray(mean, np.float32)  # [H]

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int, center: bool = False) -> Projection:
        x = _unit(np.asarray(vectors, np.float64))
        if len(x) < dim:
            raise ValueError(f"a {dim}-dim projection needs at least {dim} sample rows, "
                             f"got {len(x)}: raise sink.calibration.size")
        mean = x.mean(axis=0) if center else None
        if mean is not None:
            x = x - mean
        _, axes = np.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues
        top = axes[:, ::-1][:, :dim]
        # a sign per axis, so that the same sample always gives the same matrix
        signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(dim)])
        return cls(top * np.where(signs == 0, 1, signs), mean)

    def apply(self, pooled: np.ndarray) -> np.ndarray:
        x = _unit(pooled.astype(np.float32, copy=False))
        if self.mean is not None:
            x = x - self.mean
        return x @ self.matrix

    @property
    def dims(self) -> tuple[int, int]:
        return self.matrix.shape[0], self.matrix.shape[1]

    @property
    def digest(self) -> str:
        """sha256 prefix of the matrix and mean: how the table's identity names it."""
        h = hashlib.sha256(np.asarray(self.matrix.shape, np.int64).tobytes())
        h.update(self.matrix.tobytes())
        if self.mean is not None:
            h.update(self.mean.tobytes())
        return h.hexdigest()[:16]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Calibration:
    """What a table's columns fitted once on a sample: per-column, per-dimension
    (min, max) ranges for int8/uint8 columns, and the projections of ``reduce: pca``
    columns. Kept with the table; every later run reuses them."""

    def __init__(self, ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 projections: dict[str, Projection] | None = None):
        self.ranges = {k: (np.asarray(lo, np.float32), np.asarray(hi, np.float32))
                       for k, (lo, hi) in (ranges or {}).items()}
        self.projections = dict(projections or {})

    @classmethod
    def fit(cls, vectors: dict[str, np.ndarray],
            projections: dict[str, Projection] | None = None) -> Calibration:
        return cls({k: (v.min(axis=0), v.max(axis=0)) for k, v in vectors.items()},
                   projections)

    def to_json(self) -> str:
        return json.dumps({k: {"min": lo.tolist(), "max": hi.tolist()}
                           for k, (lo, hi) in sorted(self.ranges.items())})

    @classmethod
    def from_json(cls, text: str | None) -> Calibration:
        data = json.loads(text) if text else {}
        return cls({k: (v["min"], v["max"]) for k, v in data.items()})

    def __bool__(self) -> bool:
        return bool(self.ranges or self.projections)

    def projection_ids(self) -> str:
        """The identity's ``projections``: {column: digest} (matrices live in a side table)."""
        return json.dumps({k: p.digest for k, p in sorted(self.projections.items())})


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (parity checks)."""
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def needs_calibration(specs) -> list[OutputSpec]:
    return [s for s in specs if s.dtype in CALIBRATED_DTYPES]


def needs_projection(specs) -> list[OutputSpec]:
    return [s for s in specs if s.reduce == "pca"]


def cut(pooled: np.ndarray, spec: OutputSpec, projection: Projection | None = None,
        pca: str = "project") -> np.ndarray:
    """A [B, H] float32 matrix to ``spec.dim`` (truncate, or ``reduce: pca``: project),
    renormalized. ``pca``: ``project`` (the column), ``full`` (the normalized pooled
    vector, to fit a projection on) or ``truncate`` (the canary's parity check)."""
    if spec.reduce == "pca" and pca == "full":
        return np.ascontiguousarray(_unit(pooled), dtype=np.float32)
    if spec.reduce == "pca" and pca == "project":
        if projection is None:
            raise ValueError(f"column {spec.name!r} (reduce: pca) needs its projection")
        vecs = projection.apply(pooled)
    else:
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
            "embed.reduce": spec.reduce + (" (centred)" if spec.center else ""),
            "embed.normalize": spec.normalize,
            "embed.pooling": spec.pooling or model_pooling, "embed.encoding": ENCODING[spec.dtype]}


def describe(specs) -> list[dict]:
    """The part of each spec that decides the stored bytes (kept in table properties)."""
    # reduce/center only where not the default: identities of older tables stay equal
    return [{"name": s.name, "dim": s.dim, "layer": s.layer, "dtype": s.dtype,
             "normalize": s.normalize, "pooling": s.pooling,
             **({"reduce": s.reduce, "center": s.center} if s.reduce != "truncate" else {})}
            for s in specs]
