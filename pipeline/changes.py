"""What changed in a Delta source since the last run: its Change Data Feed.

A nightly run over a large source where little changed should cost what
changed, not what the table holds. When the source is a Delta table with
Change Data Feed on (``delta.enableChangeDataFeed``) and an earlier successful
run into the same output table recorded the source version it read, a run
reads only the changes after that version: inserted and updated rows become
rows to embed (after the usual validation and the (id, content hash) skip),
deleted ids become deletes. Where the feed cannot answer (history vacuumed,
the feed turned on later, the source rewound), the run falls back to the full
comparison and says why (:mod:`pipeline.write_plan` decides, this module reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipeline.config import RunConfig, SourceConfig

CDF_PROPERTY = "delta.enableChangeDataFeed"
# The feed's own columns, dropped once the latest change per id is known.
CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")


def cdf_enabled(spark: SparkSession, path: str) -> bool:
    from pipeline.sink import table_property

    return (table_property(spark, path, CDF_PROPERTY) or "false").lower() == "true"


def last_source_version(spark: SparkSession, cfg: RunConfig) -> int | None:
    """The source version that the latest successful whole-source run into this output
    table read (None: no such run, or no runs table yet). One scan of four columns
    of the runs table, no shuffle."""
    from pyspark.sql import functions as F

    from pipeline import lineage
    from pipeline.sink import is_delta_table

    path = lineage.runs_path(cfg.sink.path, cfg.sink.runs_path)
    if not is_delta_table(path):
        return None
    events = (spark.read.format("delta").load(path)
              .filter((F.col("output_path") == cfg.sink.path) & F.col("partition").isNull()
                      & (F.col("source_path") == cfg.source.path))
              .select("run_id", "status", "event_time", "source_version").toPandas())
    if events.empty:
        return None
    latest = events.sort_values("event_time").groupby("run_id").tail(1)
    done = latest[(latest["status"] == "succeeded") & latest["source_version"].notna()]
    if done.empty:
        return None
    return int(done.sort_values("event_time")["source_version"].iloc[-1])


def latest_changes(spark: SparkSession, source: SourceConfig, start: int,
                   end: int) -> DataFrame:
    """One row per id changed in source versions [start, end]: its latest change, with
    the source's columns and ``_change_type`` (insert, update_postimage or delete).
    Within one commit a delete comes before an insert of the same id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    feed = (spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", start).option("endingVersion", end).load(source.path))
    kind = F.col("_change_type")
    order = Window.partitionBy(source.id_column).orderBy(
        F.col("_commit_version").desc(), F.when(kind == "delete", 0).otherwise(1).desc())
    return (feed.filter(kind != "update_preimage")
            .withColumn("_n", F.row_number().over(order)).filter("_n = 1")
            .drop("_n", "_commit_version", "_commit_timestamp"))


def why_not(exc: BaseException, since: int) -> str:
    """One line on why the feed could not answer, from the JVM's error where there is
    one (a Py4JJavaError's own text is only "An error occurred while calling ...")."""
    java = getattr(exc, "java_exception", None)
    name, text = type(exc).__name__, str(exc)
    if java is not None:
        name, text = java.getClass().getSimpleName(), str(java.getMessage() or "")
    cause = (f"the source's change files since version {since} are gone (vacuumed?)"
             if "FileNotFound" in name or "FileNotFound" in text or "does not exist" in text
             else f"{name}: {text.strip().splitlines()[0][:200] if text.strip() else '-'}")
    return f"the Change Data Feed could not answer: {cause}; compared the whole source instead"
