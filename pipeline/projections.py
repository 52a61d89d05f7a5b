"""Where ``reduce: pca`` projections live: a small Delta side table next to the
output (``<parent>/_embedding_projections``), one row per (table, column,
projection), named by the projection's digest. The output table's identity
holds ``{column: digest}`` (``embed.projections``); a matrix never goes in a
table property. Rows are only appended: a projection a table references is
never replaced (``sink.mode: overwrite`` fits a new one and the identity
then names that).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from pipeline.encoder.cuts import Projection
from pipeline.errors import PipelineError
from pipeline.tables.delta import append_records
from pipeline.tables.paths import TablePaths

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SCHEMA = ("output_path string, column string, digest string, input_dim int, dim int, "
          "centered boolean, matrix array<float>, mean array<float>, sample_rows long, "
          "run_id string, fitted_at timestamp")


def table_path(output_path: str) -> str:
    return TablePaths.beside(output_path).projections


def store(spark: SparkSession, output_path: str, projections: dict[str, Projection],
          sample_rows: int, run_id: str) -> None:
    """Append this run's fitted projections (before the output commit that names them)."""
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    rows = [{"output_path": output_path, "column": name, "digest": p.digest,
             "input_dim": p.dims[0], "dim": p.dims[1], "centered": p.mean is not None,
             "matrix": p.matrix.ravel().tolist(),
             "mean": p.mean.tolist() if p.mean is not None else None,
             "sample_rows": sample_rows, "run_id": run_id, "fitted_at": now}
            for name, p in sorted(projections.items())]
    append_records(spark, table_path(output_path), SCHEMA, rows, run_id)


def load(output_path: str, digests: dict[str, str]) -> dict[str, Projection]:
    """The projections a table's identity names (delta-rs: no Spark needed), each
    checked against its digest; a missing one is an error, never a silent re-fit."""
    import pyarrow.dataset as ds
    from deltalake.exceptions import TableNotFoundError

    from pipeline import deltars

    if not digests:
        return {}
    path = table_path(output_path)
    try:
        dataset = deltars.dataset(path)
        rows = dataset.to_table(filter=ds.field("digest").isin(list(digests.values()))
                                ).to_pylist()
    except TableNotFoundError:
        rows = []
    by_digest = {r["digest"]: r for r in rows}
    out = {}
    for column, digest in digests.items():
        row = by_digest.get(digest)
        if row is None:
            raise PipelineError(
                f"the projection {digest} that {output_path} names for column {column!r} is "
                f"not in {path}: it was deleted or moved; restore it, or re-embed with "
                "sink.mode: overwrite to fit a new one")
        matrix = np.asarray(row["matrix"], np.float32).reshape(row["input_dim"], row["dim"])
        projection = Projection(matrix, row["mean"])
        if projection.digest != digest:
            raise PipelineError(f"the projection {digest} in {path} does not match its digest "
                                f"({projection.digest}): the side table was altered")
        out[column] = projection
    return out


def digests_of(identity: Mapping[str, str] | None) -> dict[str, str]:
    return json.loads((identity or {}).get("projections") or "{}")
