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
    from pipeline.tables.delta import table_property

    return (table_property(spark, path, CDF_PROPERTY) or "false").lower() == "true"


def last_source_version(spark: SparkSession, cfg: RunConfig) -> int | None:
    """The source version that the latest successful whole-source run into this output
    table read (None: no such run, or no runs table yet)."""
    from pipeline.tables import runs
    from pipeline.tables.paths import TablePaths

    return runs.last_source_version(TablePaths.of(cfg).runs, cfg.sink.path, cfg.source.path,
                                    spark)


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


def changed_rows(snapshot: DataFrame, changes: DataFrame, cfg: SourceConfig) -> DataFrame:
    """The source rows to validate for a Change Data Feed run: each changed id's latest
    row, except where the snapshot holds that id more than once, or holds it still
    though its latest change was a delete (one of two copies went): then all of its
    snapshot rows, so :func:`tag_rows` judges them as on the full path. Only the id
    column of the snapshot is scanned, plus the rows of such ids."""
    from pyspark.sql import functions as F

    id_col = cfg.id_column
    kinds = changes.select(id_col, (F.col("_change_type") == "delete").alias("_gone"))
    counts = (snapshot.select(id_col).join(kinds.select(id_col), id_col, "left_semi")
              .groupBy(id_col).count())
    special = (counts.join(kinds, id_col)
               .filter((F.col("count") > 1) | F.col("_gone")).select(id_col))
    upserts = changes.filter(F.col("_change_type") != "delete") \
        .drop(*(c for c in CDF_COLUMNS if c in changes.columns))
    if special.limit(1).count() == 0:
        return upserts
    return (upserts.join(special, id_col, "left_anti")
            .unionByName(snapshot.join(special, id_col, "left_semi")))
