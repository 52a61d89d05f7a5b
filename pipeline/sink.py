"""Delta sink: the output table, its identity properties, and atomic commits.

The table records what made it (model fingerprint, pooling, max_length, prompt,
output specs) as table properties; a run with another identity is refused
before anything is written. Each run commits its rows in ONE Delta commit
tagged with the run id (``userMetadata``), so ``DESCRIBE HISTORY`` ties table
versions to runs and a killed run leaves the table at its last commit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SinkConflictError

PROP_PREFIX = "embed."
# Properties that decide the stored vectors: a mismatch means incomparable vectors.
IDENTITY_KEYS = ("model", "model_fingerprint", "pooling", "max_length", "prompt", "outputs")


@dataclass(frozen=True)
class Commit:
    version: int
    operation: str
    rows_written: int


def table_identity(cfg, model_name: str, model_fingerprint: str) -> dict[str, str]:
    from pipeline.outputs import describe

    return {
        "model": model_name,
        "model_fingerprint": model_fingerprint,
        "pooling": cfg.model.pooling,
        "max_length": str(cfg.model.max_length),
        "prompt": cfg.model.prompt,
        "outputs": json.dumps(describe(cfg.outputs), sort_keys=True),
    }


def is_delta_table(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        return True  # remote: let Delta decide
    return (Path(path.removeprefix("file://")) / "_delta_log").is_dir()


def read_identity(spark, path: str) -> dict[str, str] | None:
    from delta.tables import DeltaTable

    if not is_delta_table(path) or not DeltaTable.isDeltaTable(spark, path):
        return None
    props = DeltaTable.forPath(spark, path).detail().collect()[0]["properties"] or {}
    return {k[len(PROP_PREFIX):]: v for k, v in props.items() if k.startswith(PROP_PREFIX)}


def check_compatible(stored: dict[str, str] | None, wanted: dict[str, str], path: str) -> None:
    """Refuse to mix vectors of two models / two output layouts in one table."""
    if stored is None:
        return
    if not stored:
        raise SinkConflictError(f"{path} is a Delta table that embed did not make (no "
                                "embed.* table properties); choose another sink.path")
    diffs = [k for k in IDENTITY_KEYS if stored.get(k) != wanted.get(k)]
    if not diffs:
        return
    key = diffs[0]
    shown = {k: (v if len(v) < 80 else v[:77] + "...") for k, v in
             (("stored", stored.get(key) or "<none>"), ("wanted", wanted.get(key) or "<none>"))}
    raise SinkConflictError(
        f"output table {path} was made with {key}={shown['stored']}, this run has "
        f"{key}={shown['wanted']} (differs in: {', '.join(diffs)}); write to a new sink.path "
        "or set sink.mode: overwrite to replace the table")


def ensure_table(spark, path: str, schema, identity: dict[str, str]) -> None:
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schema)
    for key, value in identity.items():
        builder = builder.property(PROP_PREFIX + key, value)
    builder.execute()


def set_identity(spark, path: str, identity: dict[str, str]) -> None:
    pairs = ", ".join(f"'{PROP_PREFIX}{k}' = '{_sql_str(v)}'" for k, v in identity.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({pairs})")


def _sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def existing_keys(spark, path: str):
    """(id, content_hash) of rows already embedded, or None when there is no table."""
    if read_identity(spark, path) is None:
        return None
    return spark.read.format("delta").load(path).select("id", "content_hash")


def last_commit(spark, path: str) -> Commit:
    from delta.tables import DeltaTable

    row = DeltaTable.forPath(spark, path).history(1).collect()[0]
    metrics = row["operationMetrics"] or {}
    if row["operation"] == "MERGE":
        written = int(metrics.get("numTargetRowsInserted", 0)) + int(
            metrics.get("numTargetRowsUpdated", 0))
    else:
        written = int(metrics.get("numOutputRows", 0))
    return Commit(version=int(row["version"]), operation=row["operation"], rows_written=written)


def write(spark, df, path: str, mode: str, run_id: str, upsert: bool) -> Commit:
    """One Delta commit: append / overwrite, or MERGE on id when texts changed."""
    if upsert:
        from delta.tables import DeltaTable

        # The source holds a Python UDF: materialise it so MERGE's two passes over
        # the source do not encode every row twice.
        spark.conf.set("spark.databricks.delta.merge.materializeSource", "all")
        spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", run_id)
        try:
            (DeltaTable.forPath(spark, path).alias("t")
             .merge(df.alias("s"), "t.id = s.id")
             .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
        finally:
            spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    else:
        writer = df.write.format("delta").option("userMetadata", run_id)
        if mode == "overwrite":
            writer = writer.mode("overwrite").option("overwriteSchema", "true")
        else:
            writer = writer.mode("append")
        writer.save(path)
    return last_commit(spark, path)


def append_rows(df, path: str, run_id: str) -> None:
    df.write.format("delta").mode("append").option("userMetadata", run_id).save(path)
