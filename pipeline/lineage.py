"""The runs table: one Delta table of run records next to the output table.

Append-only (a ``running`` row when a run starts, a final ``succeeded`` or
``failed`` row when it ends): concurrent runs never conflict on it, and the
latest row per run id is the run's state. A run that dies without a final row
(SIGKILL) stays ``running`` with no end time, which is what happened.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

RUNS_SCHEMA = (
    "run_id string, status string, event_time timestamp, started_at timestamp, "
    "ended_at timestamp, output_path string, output_version long, source_path string, "
    "source_version long, model string, model_fingerprint string, runtime string, "
    "config_hash string, config_json string, mode string, partition string, "
    "rows_read long, rows_embedded long, rows_quarantined long, rows_skipped long, "
    "rows_deleted long, seconds double, stage_seconds string, versions string, error string"
)


def runs_path(sink_path: str, configured: str | None) -> str:
    return configured or str(Path(sink_path).parent / "_embedding_runs")


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("embed-pipeline", "pyspark", "delta-spark", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def record(spark, path: str, **fields) -> None:
    """Append one run event; missing fields are null."""
    from pyspark.sql.types import _parse_datatype_string

    schema = _parse_datatype_string(RUNS_SCHEMA)
    row = {name: fields.get(name) for name in schema.fieldNames()}
    row["event_time"] = datetime.now(UTC).replace(tzinfo=None)
    for key in ("stage_seconds", "versions"):
        if isinstance(row[key], dict):
            row[key] = json.dumps(row[key], sort_keys=True)
    for key in ("started_at", "ended_at"):
        if isinstance(row[key], datetime) and row[key].tzinfo is not None:
            row[key] = row[key].astimezone(UTC).replace(tzinfo=None)
    frame = spark.createDataFrame([row], schema)
    for attempt in range(3):  # appends never conflict, but two first writes can race
        try:
            frame.write.format("delta").mode("append") \
                .option("userMetadata", fields.get("run_id") or "").save(path)
            return
        except Exception:
            if attempt == 2:
                raise


def latest_runs(spark, path: str, limit: int = 20, output_path: str | None = None):
    """The latest event per run id, newest runs first (a pandas frame)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(path)
    if output_path:
        df = df.filter(F.col("output_path") == output_path)
    w = Window.partitionBy("run_id").orderBy(F.col("event_time").desc())
    return (df.withColumn("_n", F.row_number().over(w)).filter("_n = 1").drop("_n")
            .orderBy(F.col("started_at").desc()).limit(limit).toPandas())
