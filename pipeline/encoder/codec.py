"""One codec per stored dtype: float32 vectors to the bytes a table stores, and back.

Every writer and reader goes through here: the encoder (quantize, to Arrow), drift
(stored cells back to floats), ``embed search`` (Arrow batches back to floats, or
to packed bits for Hamming distance).

| dtype   | Arrow                     | Spark          | bytes per row |
|---------|---------------------------|----------------|---------------|
| float32 | fixed_size_list<float32>  | array<float>   | 4 x dim       |
| float16 | binary (IEEE half, LE)    | binary         | 2 x dim       |
| int8    | fixed_size_list<int8>     | array<tinyint> | dim           |
| uint8   | binary                    | binary         | dim           |
| binary  | binary (packbits - 128)   | binary         | dim / 8       |
| ubinary | binary (packbits)         | binary         | dim / 8       |

Spark has neither a half-float nor an unsigned byte type, hence binary for those.
int8/uint8 use per-dimension ranges from a calibration sample stored with the
table (never per-batch ranges, so vectors stay comparable across runs);
``binary``/``ubinary`` follow sentence-transformers' quantize_embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np
import pyarrow as pa

from pipeline.config import OutputSpec

ENCODING = {"float32": "float32 array", "int8": "int8 array (calibrated ranges)",
            "float16": "IEEE half, little-endian bytes", "uint8": "uint8 bytes (calibrated ranges)",
            "binary": "packbits - 128 bytes", "ubinary": "packbits bytes"}
LIST_DTYPES = ("float32", "int8")  # stored as arrays; the others as bytes
BIT_DTYPES = ("binary", "ubinary")
CALIBRATED = ("int8", "uint8")


class Ranges(Protocol):
    """What int8/uint8 need: per column, per dimension (min, max) (cuts.Calibration)."""

    @property
    def ranges(self) -> Mapping[str, tuple[Any, Any]]: ...


def row_bytes(spec: OutputSpec) -> int:
    """Payload bytes per row of one column (no container overhead)."""
    return {"float32": 4 * spec.dim, "float16": 2 * spec.dim, "int8": spec.dim,
            "uint8": spec.dim, "binary": spec.dim // 8, "ubinary": spec.dim // 8}[spec.dtype]


def stored_length(spec: OutputSpec) -> int:
    """A stored cell's length: array elements, or bytes for the binary-typed dtypes."""
    return spec.dim if spec.dtype in LIST_DTYPES else row_bytes(spec)


def _range(spec: OutputSpec, calibration: Ranges | None) -> tuple[np.ndarray, np.ndarray]:
    if calibration is None or spec.name not in calibration.ranges:
        raise ValueError(f"column {spec.name!r} ({spec.dtype}) needs calibration ranges")
    return calibration.ranges[spec.name]


def quantize(vecs: np.ndarray, spec: OutputSpec, calibration: Ranges | None = None) -> np.ndarray:
    """float32 [N, dim] -> the stored dtype's numpy array ([N, dim] or [N, bytes])."""
    if spec.dtype == "float32":
        return vecs
    if spec.dtype == "float16":
        return vecs.astype("<f2")
    if spec.dtype in BIT_DTYPES:
        packed = np.packbits(vecs > 0, axis=-1)
        return packed if spec.dtype == "ubinary" else (packed.astype(np.int16) - 128).astype(
            np.int8)
    lo, hi = _range(spec, calibration)
    steps = np.maximum((hi - lo) / 255.0, 1e-12)
    levels = np.clip(np.floor((vecs - lo) / steps), 0, 255)
    return (levels - 128).astype(np.int8) if spec.dtype == "int8" else levels.astype(np.uint8)


def dequantize(values: np.ndarray, spec: OutputSpec, calibration: Ranges) -> np.ndarray:
    """Approximate float32 vectors back from int8/uint8 (bucket centres)."""
    lo, hi = _range(spec, calibration)
    steps = (hi - lo) / 255.0
    levels = values.astype(np.float32) + (128 if spec.dtype == "int8" else 0)
    return lo + (levels + 0.5) * steps


def to_arrow(values: np.ndarray, spec: OutputSpec) -> pa.Array:
    """Stored numpy values -> the column's Arrow array (see the table above)."""
    n = values.shape[0]
    if spec.dtype in LIST_DTYPES:
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


# --------------------------------------------------------------------------- reading back


def from_arrow(column: pa.Array | pa.ChunkedArray, spec: OutputSpec) -> np.ndarray:
    """A stored column's Arrow batch -> its stored numpy values ([N, length])."""
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if spec.dtype in LIST_DTYPES:
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), spec.dim).astype(
            np.float32 if spec.dtype == "float32" else np.int8, copy=False)
    raw = _fixed_binary(column, row_bytes(spec))
    return raw.view("<f2") if spec.dtype == "float16" else (
        raw.view(np.int8) if spec.dtype == "binary" else raw)


def from_cells(cells: Sequence[Any], spec: OutputSpec) -> np.ndarray:
    """Stored cells (lists or bytes, as Spark and pandas return them) -> stored values."""
    if not len(cells):
        return np.zeros((0, stored_length(spec)), np.float32 if spec.dtype == "float32"
                        else np.uint8)
    if spec.dtype in LIST_DTYPES:
        return np.stack([np.asarray(c, dtype=np.float32 if spec.dtype == "float32"
                                    else np.int8) for c in cells])
    raw = np.frombuffer(b"".join(bytes(c) for c in cells), np.uint8).reshape(len(cells), -1)
    return raw.view("<f2") if spec.dtype == "float16" else (
        raw.view(np.int8) if spec.dtype == "binary" else raw)


def packed_bits(values: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """binary/ubinary stored values -> packbits uint8 [N, dim/8] (Hamming distance)."""
    return values if spec.dtype == "ubinary" else (
        values.view(np.int8).astype(np.int16) + 128).astype(np.uint8)


def to_float(values: np.ndarray, spec: OutputSpec,
             calibration: Ranges | None = None) -> np.ndarray:
    """Stored values -> float32 [N, dim]: int8/uint8 dequantized (left as their levels
    where the ranges are unknown), float16 widened, bits as +-1."""
    if spec.dtype in BIT_DTYPES:
        bits = np.unpackbits(packed_bits(values, spec), axis=1)[:, :spec.dim]
        return bits.astype(np.float32) * 2 - 1
    if spec.dtype in CALIBRATED and calibration is not None and spec.name in calibration.ranges:
        return dequantize(values, spec, calibration)
    return values.astype(np.float32, copy=False)


def _fixed_binary(column: pa.Array, width: int) -> np.ndarray:
    """A binary Arrow array whose every value has ``width`` bytes -> uint8 [N, width]."""
    _, offset_buf, data_buf = column.buffers()
    assert offset_buf is not None and data_buf is not None
    start = column.offset
    offsets = np.frombuffer(cast(Any, offset_buf), np.int32)[start:start + len(column) + 1]
    data = np.frombuffer(cast(Any, data_buf), np.uint8)[offsets[0]:offsets[-1]]
    return data.reshape(len(column), width)
