"""The runs table: one Delta table of run events next to the output tables, and its one
reader.

Append-only: a ``running`` row when a run starts, a final ``succeeded`` or
``failed`` row when it ends (a partition found already committed: one ``skipped``
row), so concurrent runs never conflict on it; the latest row per run id is the
run's state. Read with delta-rs (no Spark job, no JVM: the Airflow check tasks,
``embed search``, the plan's CDF version), and with Spark where delta-rs cannot
read the table (deletion vectors, an object store only Spark has credentials for).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

SCHEMA = (
    "run_id string, status string, event_time timestamp, started_at timestamp, "
    "ended_at timestamp, output_path string, output_version long, source_path string, "
    "source_version long, model string, model_fingerprint string, runtime string, "
    "config_hash string, config_json string, mode string, partition string, "
    "rows_read long, rows_embedded long, rows_quarantined long, rows_skipped long, "
    "rows_deleted long, seconds double, stage_seconds string, versions string, error string, "
    "lineage_run_id string, source_files_hash string, canary string, drift_status string, "
    "drift string, message string, plan_path string, plan_note string, placement string, "
    "chunks_written long, chunks_deleted long, parity string, warnings string"
)
_JSON_FIELDS = ("stage_seconds", "versions", "canary", "drift")


def events(path: str, equal: dict[str, Any] | None = None,
           spark: SparkSession | None = None) -> pd.DataFrame:
    """The table's events (pandas), filtered on ``column == value`` for each item of
    ``equal``; empty where there is no table yet."""
    import pandas as pd

    from pipeline.tables.delta import is_delta_table, read_records

    if not is_delta_table(path):
        return pd.DataFrame(columns=[c.split()[0] for c in SCHEMA.split(", ")])
    return read_records(spark, path, equal)


def latest(path: str, limit: int = 20, output_path: str | None = None,
           partition: str | None = None, status: str | None = None,
           spark: SparkSession | None = None) -> pd.DataFrame:
    """The latest event per run id, newest runs first; optionally only runs of one
    output table, one partition, or whose latest status is ``status``."""
    equal = {k: v for k, v in (("output_path", output_path), ("partition", partition)) if v}
    found = events(path, equal, spark)
    runs = found.sort_values("event_time").groupby("run_id", sort=False).tail(1)
    if status:
        runs = runs[runs["status"] == status]
    # started_at is to the second: two runs of one second (no-ops decided without Spark
    # take milliseconds) are ordered by their latest event, to the microsecond
    return (runs.sort_values(["started_at", "event_time"], ascending=False).head(limit)
            .reset_index(drop=True))


def last_source_version(path: str, output_path: str, source_path: str,
                        spark: SparkSession | None = None) -> int | None:
    """The source version that the latest successful whole-source run into this output
    table read (None: no such run, or no runs table yet)."""
    found = events(path, {"output_path": output_path, "source_path": source_path}, spark)
    if found.empty:
        return None
    found = found[found["partition"].isna()]
    runs = found.sort_values("event_time").groupby("run_id").tail(1)
    done = runs[(runs["status"] == "succeeded") & runs["source_version"].notna()]
    if done.empty:
        return None
    return int(done.sort_values("event_time")["source_version"].iloc[-1])


def latest_source(path: str, output_path: str) -> dict[str, Any] | None:
    """The ``source`` section of the config of the latest succeeded run into
    ``output_path`` (where ``embed search`` finds snippets), or None."""
    found = latest(path, 1000, output_path=output_path, status="succeeded")
    for config in found["config_json"]:
        if config:
            return json.loads(config)["source"]
    return None


def append(spark: SparkSession | None, path: str, fields: dict[str, Any]) -> None:
    """Append one run event; missing fields are null, dicts are stored as JSON."""
    from pipeline.tables.delta import append_records

    row = dict(fields, event_time=datetime.now(UTC).replace(tzinfo=None))
    for key in _JSON_FIELDS:
        if isinstance(row.get(key), dict):
            row[key] = json.dumps(row[key], sort_keys=True)
    for key in ("started_at", "ended_at"):
        value = row.get(key)
        if isinstance(value, datetime) and value.tzinfo is not None:
            row[key] = value.astimezone(UTC).replace(tzinfo=None)
    for attempt in range(3):  # appends never conflict, but two first writes can race
        try:
            # mergeSchema: runs tables of older releases gain the newer columns
            append_records(spark, path, SCHEMA, [row], fields.get("run_id") or "",
                           merge_schema=True)
            return
        except Exception:
            if attempt == 2:
                raise
