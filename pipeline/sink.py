"""The output table's rows: what a run compares with (its keys) and what it writes
(the encoder's columns plus what made each row). Commits go through
:mod:`pipeline.tables.delta`; the table's identity is :mod:`pipeline.tables.identity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import CHUNK_COLUMNS, CHUNK_TEXT

if TYPE_CHECKING:
    from datetime import datetime

    from pyspark.sql import DataFrame, SparkSession


def existing_keys(spark: SparkSession, path: str, chunked: bool = False) -> DataFrame:
    """(id, content_hash) of the rows already embedded in the output table (once per
    document of a chunked table, which holds a row per passage)."""
    keys = spark.read.format("delta").load(path).select("id", "content_hash")
    return keys.distinct() if chunked else keys

def with_lineage_columns(encoded: DataFrame, model: str, model_fingerprint: str, run_id: str,
                         embedded_at: datetime, carry: str | None = None) -> DataFrame:
    """The output table's row layout: the encoder's columns plus what made each row,
    then the ``carry`` column (sink.partition_by)."""
    from pyspark.sql import functions as F

    chunks = [c for c in (*CHUNK_COLUMNS, CHUNK_TEXT) if c in encoded.columns]
    vectors = [c for c in encoded.columns if c not in ("id", "content_hash", "n_tokens",
                                                         "truncated", carry, *chunks)]
    return encoded.select(
        "id", *chunks, "content_hash", *vectors, "n_tokens", "truncated",
        F.lit(model).alias("model"), F.lit(model_fingerprint).alias("model_fingerprint"),
        F.lit(run_id).alias("run_id"), F.lit(embedded_at).cast("timestamp").alias("embedded_at"),
        *([carry] if carry else []))
