"""Output columns cut from one pooled vector: the Spark-free arithmetic.

Order of operations per column (as sentence-transformers does it):
pool -> truncate to ``dim`` -> L2-renormalize -> quantize; with ``reduce: pca``:
pool -> L2-normalize -> (centre) -> project onto the table's ``dim`` axes ->
L2-renormalize -> quantize (int8 ranges are fitted on the projected values).

How each dtype is stored and read back: :mod:`pipeline.encoder.codec`; how a column
is described to Spark and Delta: :mod:`pipeline.outputs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np

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


def needs_calibration(specs: Iterable[OutputSpec]) -> list[OutputSpec]:
    return [s for s in specs if s.dtype in CALIBRATED_DTYPES]


def needs_projection(specs: Iterable[OutputSpec]) -> list[OutputSpec]:
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
