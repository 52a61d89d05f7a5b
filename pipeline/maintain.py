"""Keep an output table healthy over hundreds of runs: compaction and cleanup.

Every run adds files (an insert writes new ones, a MERGE rewrites the files that
hold replaced rows), so a nightly table collects many small files. ``OPTIMIZE``
compacts them (Delta's bin-packing; a rewrite that changes no row), ``VACUUM``
deletes the files no version within the retention window needs. The retention
is never below the table's ``delta.deletedFileRetentionDuration`` (Delta's
default, 7 days): a run pins the version it started from, and the files of that
version must outlive the longest run. Both are Delta commits tagged like a run's
(``userMetadata``), so ``DESCRIBE HISTORY`` says who compacted when.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, SourceError
from pipeline.tables import delta
from pipeline.tables.identity import TableIdentity

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DEFAULT_RETENTION_HOURS = 168.0  # Delta's own default for deletedFileRetentionDuration


@dataclass(frozen=True)
class Layout:
    files: int
    bytes: int

    @property
    def mean_file_mb(self) -> float:
        return self.bytes / self.files / 2**20 if self.files else 0.0

    def summary(self) -> str:
        return (f"{self.files:,} files, {self.bytes / 2**20:,.1f} MiB "
                f"(mean {self.mean_file_mb:.2f} MiB per file)")


def layout(spark: SparkSession, path: str) -> Layout:
    """The table's current files and bytes (its latest version), as Delta reports them."""
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    assert detail is not None
    return Layout(files=int(detail["numFiles"] or 0), bytes=int(detail["sizeInBytes"] or 0))


def log_layout(path: str) -> Layout | None:
    """As :func:`layout`, from the table's log by delta-rs (no JVM), local or remote; None
    where delta-rs cannot open it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake.exceptions import DeltaError

    from pipeline import deltars

    try:
        files = pa.table(deltars.open_table(path).get_add_actions(flatten=True))
    except DeltaError:
        return None
    size = pc.sum(files["size_bytes"]).as_py() if files.num_rows else 0
    return Layout(files=files.num_rows, bytes=int(size or 0))


def retention_hours(spark: SparkSession, path: str) -> float:
    """The table's delta.deletedFileRetentionDuration in hours (default 168)."""
    text = delta.table_property(spark, path, "delta.deletedFileRetentionDuration")
    if not text:
        return DEFAULT_RETENTION_HOURS
    match = re.match(r"(?i)interval\s+(\d+)\s+(\w+?)s?$", text.strip())
    if not match:
        return DEFAULT_RETENTION_HOURS
    per = {"second": 1 / 3600, "minute": 1 / 60, "hour": 1, "day": 24, "week": 168}
    return int(match.group(1)) * per.get(match.group(2).lower(), 1)


def maintenance_id(now: datetime | None = None) -> str:
    return f"maintain-{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"


def optimize(spark: SparkSession, path: str, tag: str) -> dict[str, str]:
    """Compact the table's small files; returns Delta's metrics. A run writing the same
    files at once makes one of the two fail with ConcurrentRunError (exit 7): nothing
    is lost, re-run what failed."""
    check_table(spark, path)
    # userMetadata is a session conf: take the writers' lock, as a MERGE does
    with delta.conflicts_reported(path), delta.MERGE_LOCK, delta.session_conf(spark, {
            "spark.databricks.delta.commitInfo.userMetadata": delta.commit_tag(tag)}):
        rows = spark.sql(f"OPTIMIZE {delta.table_ref(path)}").collect()
    metrics = rows[0]["metrics"] if rows else None
    return {k: str(v) for k, v in (metrics.asDict() if metrics else {}).items()
            if not isinstance(v, (dict, list))}


def vacuum(spark: SparkSession, path: str, hours: float) -> None:
    """Delete files no version of the last ``hours`` needs (at least the table's
    retention: a running run still reads the version it started from)."""
    check_table(spark, path)
    floor = retention_hours(spark, path)
    if hours < floor:
        raise ConfigError("--vacuum", f"{hours:g} hours is below the table's retention of "
                          f"{floor:g} hours (delta.deletedFileRetentionDuration): files a "
                          "running run's snapshot needs could go; use at least that")
    spark.sql(f"VACUUM {delta.table_ref(path)} RETAIN {hours:f} HOURS").collect()


def check_table(spark: SparkSession, path: str) -> None:
    stored = TableIdentity.read(spark, path)
    if stored is None:
        raise SourceError(f"no Delta table at {path}")
    if not stored:
        raise SourceError(f"{path} is a Delta table that embed did not make (no embed.* "
                          "table properties)")
