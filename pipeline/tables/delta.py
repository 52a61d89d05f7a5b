"""Delta mechanics, for every table a run writes: snapshots, txn ids, tagged commits,
MERGE, appends.

Each run commits its rows to the output table in ONE Delta commit tagged with the
run id (``userMetadata``), so ``DESCRIBE HISTORY`` ties table versions to runs and
a killed run leaves the table at its last commit. Bookkeeping appends carry the
same tag. Delta's own exception classes (``delta.exceptions``) say when another
writer won a race; the run turns that into one ConcurrentRunError line.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import AlreadyCommitted, ConcurrentRunError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipeline.write_plan import CommitKind

# MERGE commits of one process take turns (backfill threads); they also set session
# confs (txn ids), which are per session, not per thread.
MERGE_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class CommitRequest:
    """What one run's commit of embeddings is (:func:`write`). ``kind`` (see
    :class:`~pipeline.write_plan.WritePlan`): merge: MERGE on ``merge_keys``, inserting
    rows not matched and, with ``replace_matched``, replacing matched ones; insert: the
    insert-only MERGE; blind_append: a plain append with the txn id (backfill partitions
    of new ids only); overwrite: replace the table (partitioned by ``partition_by``).
    ``deletes`` (ids, with a merge or insert): deleted in the same MERGE, so the rows and
    the deletes of a run are one commit. ``meta`` goes in the commit's userMetadata."""

    kind: CommitKind
    merge_keys: tuple[str, ...]
    replace_matched: bool
    run_id: str
    txn: tuple[str, int] | None = None
    meta: dict[str, str] | None = None
    deletes: DataFrame | None = None
    partition_by: str | None = None
    # chunked tables: a changed document's stored passages are all deleted (its id is
    # among ``deletes``) and its new ones inserted, in the same MERGE
    replace_documents: bool = False


@dataclass(frozen=True)
class Commit:
    version: int
    operation: str
    rows_written: int
    rows_deleted: int = 0


def is_delta_table(path: str) -> bool:
    """A Delta table is at ``path`` (a local folder or an object store: delta-rs looks)."""
    from pipeline import deltars

    return deltars.is_table(path)


def commit_tag(run_id: str, meta: dict[str, str] | None = None) -> str:
    """A commit's ``userMetadata``: the run id and, for a commit of embeddings, what
    made them (``runtime``: device/precision/attention; ``placement``)."""
    tag = {"run_id": run_id, **{k: v for k, v in (meta or {}).items() if v}}
    return json.dumps(tag, separators=(",", ":"))


def table_ref(path: str) -> str:
    """``path`` as Delta's SQL names a table by its location: delta.`path`."""
    return "delta.`" + path.replace("`", "``") + "`"


def _run_commit(spark: SparkSession, path: str, run_id: str) -> Any:
    """This run's latest commit (by userMetadata: other runs may have committed since),
    or None. SQL (DESCRIBE HISTORY): a classic session and a Spark Connect client alike."""
    from pyspark.sql import functions as F

    meta = F.col("userMetadata")
    mine = (F.get_json_object(meta, "$.run_id") == run_id) | (meta == run_id)  # or pre-JSON
    rows = (spark.sql(f"DESCRIBE HISTORY {table_ref(path)} LIMIT 50")
            .filter(mine).orderBy(F.col("version").desc())
            .limit(1).collect())
    return rows[0] if rows else None


def last_commit(spark: SparkSession, path: str, run_id: str,
                txn: tuple[str, int] | None = None) -> Commit:
    """This run's commit. A write with a txn id that Delta skipped (another run
    committed that txn first) raises :class:`AlreadyCommitted`."""
    row = _run_commit(spark, path, run_id)
    if row is None:
        if txn and committed_txn(spark, path, txn[0]) >= txn[1]:
            raise AlreadyCommitted(f"{txn[0]} v{txn[1]} was committed to {path} by another "
                                   "run while this one was writing")
        # A MERGE that found every row already written (another run in this process
        # committed them between this run's plan and its MERGE) commits nothing.
        raise lost_race(path)
    metrics = row["operationMetrics"] or {}
    if row["operation"] == "MERGE":
        written = int(metrics.get("numTargetRowsInserted", 0)) + int(
            metrics.get("numTargetRowsUpdated", 0))
    else:
        written = int(metrics.get("numOutputRows", 0))
    return Commit(version=int(row["version"]), operation=row["operation"], rows_written=written,
                  rows_deleted=int(metrics.get("numTargetRowsDeleted", 0)))


def _log(path: str) -> Any:
    """The table's latest log state, read by delta-rs: no Spark job, no JVM (a classic
    session and a Spark Connect client alike)."""
    from pipeline import deltars

    return deltars.open_table(path)


def committed_txn(spark: SparkSession | None, path: str, app_id: str) -> int:
    """The last txnVersion Delta recorded for ``app_id`` on this table (-1: none)."""
    if not is_delta_table(path):
        return -1
    found = _log(path).transaction_version(app_id)
    return -1 if found is None else int(found)


def latest_version(spark: SparkSession | None, path: str) -> int:
    return int(_log(path).version())


def table_property(spark: SparkSession | None, path: str, key: str) -> str | None:
    """One Delta table property (``delta.*`` included) of the latest version."""
    found = _log(path).metadata().configuration.get(key)
    return None if found is None else str(found)


@contextlib.contextmanager
def session_conf(spark: SparkSession, conf: dict[str, str]) -> Iterator[None]:
    """Session confs for one commit, then each key back to what it was (or unset)."""
    before = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def _commit_conf(run_id: str, txn: tuple[str, int] | None,
                 meta: dict[str, str] | None = None) -> dict[str, str]:
    conf = {"spark.databricks.delta.commitInfo.userMetadata": commit_tag(run_id, meta)}
    if txn:
        conf["spark.databricks.delta.write.txnAppId"] = txn[0]
        conf["spark.databricks.delta.write.txnVersion"] = str(txn[1])
    return conf


def _concurrent(exc: Exception, path: str) -> ConcurrentRunError | None:
    """A ConcurrentRunError for Delta's commit-conflict exceptions, else None."""
    import delta.exceptions as conflicts

    kinds = tuple(getattr(conflicts, name) for name in conflicts.__all__)
    return lost_race(path) if isinstance(exc, kinds) else None


def lost_race(path: str) -> ConcurrentRunError:
    """Another run committed to the table while this one was writing: Delta's conflict
    check stopped this run, or its MERGE found every row already written."""
    return ConcurrentRunError(
        f"another run holds this table: it committed to {path} while this run was writing "
        "(nothing of this run was written); re-run to embed what it did not")


@contextlib.contextmanager
def conflicts_reported(path: str) -> Iterator[None]:
    """Delta's concurrent-commit exceptions -> one ConcurrentRunError line."""
    try:
        yield
    except Exception as exc:
        conflict = _concurrent(exc, path)
        if conflict:
            raise conflict from None
        raise


def write(spark: SparkSession, df: DataFrame, path: str, req: CommitRequest) -> Commit:
    """ONE Delta commit of ``df`` as ``req`` says, tagged with the run id and its meta
    (:func:`commit_tag`; and, for backfills, a txn app id/version). MERGE (not a blind
    append) reads the target, so two runs writing the same table at once conflict in
    Delta's commit check instead of doubling rows; the insert-only MERGE is one pass
    over the encoded rows, no file rewritten, still conflict-checked."""
    run_id, txn = req.run_id, req.txn
    try:
        if req.kind == "blind_append":  # writer options, no session state
            writer = df.write.format("delta").mode("append").option(
                "userMetadata", commit_tag(run_id, req.meta))
            if txn:
                writer = writer.option("txnAppId", txn[0]).option("txnVersion", txn[1])
            with conflicts_reported(path):
                writer.save(path)
            return last_commit(spark, path, run_id, txn)
        conf = _commit_conf(run_id, txn, req.meta)
        # The source holds a Python UDF: a MERGE that updates passes over its source
        # twice, so materialise it and never encode a row twice; an insert-only MERGE
        # passes once and needs no copy.
        insert_only = req.kind == "insert" and req.deletes is None
        conf["spark.databricks.delta.merge.materializeSource"] = "none" if insert_only else "all"
        with conflicts_reported(path), MERGE_LOCK, session_conf(spark, conf):
            if req.kind == "overwrite":
                writer = df.write.format("delta").mode("overwrite") \
                    .option("overwriteSchema", "true")
                if req.partition_by:
                    writer = writer.partitionBy(req.partition_by)
                writer.save(path)
            else:
                _merge(spark, df, path, req)
        return last_commit(spark, path, run_id, txn)
    except ConcurrentRunError:
        # The run we lost to may have committed this very txn (the same partition
        # at once): that is a skip, not a conflict.
        if txn and committed_txn(spark, path, txn[0]) >= txn[1]:
            raise AlreadyCommitted(f"{txn[0]} v{txn[1]} was committed to {path} by another "
                                   "run while this one was writing") from None
        raise


def _merge(spark: SparkSession, df: DataFrame, path: str, req: CommitRequest) -> None:
    """The MERGE of a merge or insert commit, in Delta's SQL (a temporary view of ``df``
    as its source). ``req.replace_documents`` (chunked tables): a source row matches only
    through its id's delete marker, so every stored row (passage) of the ids in
    ``deletes`` is deleted (a changed document's old passages, however many) and every
    row of ``df`` inserted; ``deletes`` holds each id once, so a stored row matches one
    source row at most."""
    keys, deletes, by_id = req.merge_keys, req.deletes, req.replace_documents
    replace_matched = req.replace_matched and req.kind == "merge" and not by_id
    if deletes is None:
        on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        clauses = (["WHEN MATCHED THEN UPDATE SET *"] if replace_matched else []) + [
            "WHEN NOT MATCHED THEN INSERT *"]
        merge_sql(spark, df, path, on, clauses)
        return
    # The deleted ids ride along as source rows flagged _delete (their other columns
    # null); a flagged row matches every stored row of its id.
    rest = "FALSE" if by_id else (
        " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys if k != "id") or "TRUE")
    names = ", ".join(f"`{c}`" for c in df.columns)
    values = ", ".join(f"s.`{c}`" for c in df.columns)
    sets = ", ".join(f"`{c}` = s.`{c}`" for c in df.columns)
    clauses = ["WHEN MATCHED AND s._delete THEN DELETE"]
    if replace_matched:
        clauses.append(f"WHEN MATCHED AND NOT s._delete THEN UPDATE SET {sets}")
    clauses.append(f"WHEN NOT MATCHED AND NOT s._delete THEN INSERT ({names}) VALUES ({values})")
    merge_sql(spark, _with_deletes(df, deletes), path,
              f"t.id = s.id AND (s._delete OR ({rest}))", clauses)


def merge_sql(spark: SparkSession, source: DataFrame, path: str, on: str,
              clauses: list[str]) -> None:
    """``MERGE INTO`` the table at ``path`` (target ``t``) from ``source`` (``s``)."""
    view = f"embed_merge_source_{uuid.uuid4().hex}"
    source.createOrReplaceTempView(view)
    try:
        spark.sql(f"MERGE INTO {table_ref(path)} AS t USING {view} AS s ON {on} "
                  + " ".join(clauses)).collect()
    finally:
        spark.catalog.dropTempView(view)


def _with_deletes(df: DataFrame, deletes: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    nulls = [F.col("id") if c == "id" else F.lit(None).cast(df.schema[c].dataType).alias(c)
             for c in df.columns]
    return (df.withColumn("_delete", F.lit(False))
            .unionByName(deletes.select(*nulls, F.lit(True).alias("_delete"))))


def mark_txn(spark: SparkSession, path: str, run_id: str, txn: tuple[str, int]) -> None:
    """Record a txn with no rows (an empty partition), so a re-run skips it too."""
    empty = spark.read.format("delta").load(path).limit(0)
    with MERGE_LOCK, session_conf(spark, _commit_conf(run_id, txn)):
        merge_sql(spark, empty, path, "t.id = s.id", ["WHEN NOT MATCHED THEN INSERT *"])


def delete_ids(spark: SparkSession, path: str, ids_df: DataFrame, run_id: str) -> int:
    """Delete output rows whose id left the source; returns rows deleted."""
    if ids_df.limit(1).count() == 0:
        return 0
    with MERGE_LOCK, session_conf(spark, _commit_conf(run_id, None)):
        merge_sql(spark, ids_df, path, "t.id = s.id", ["WHEN MATCHED THEN DELETE"])
    row = _run_commit(spark, path, run_id)
    metrics = (row["operationMetrics"] if row is not None else None) or {}
    return int(metrics.get("numTargetRowsDeleted", 0))


def append_rows(df: DataFrame, path: str, run_id: str, merge_schema: bool = False) -> None:
    """A bookkeeping append of a DataFrame (quarantine, samples), its commit tagged
    with the same JSON ``userMetadata`` as the output table's commits."""
    writer = df.write.format("delta").mode("append").option("userMetadata", commit_tag(run_id))
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
    writer.save(path)


def append_records(spark: SparkSession | None, path: str, schema_ddl: str,
                   rows: list[dict[str, Any]], run_id: str, merge_schema: bool = False) -> None:
    """A bookkeeping append of rows the driver holds (runs, canary, drift, projections),
    tagged as :func:`append_rows` tags. Through delta-rs, on a local folder or an object
    store alike: 13 ms against Spark's 0.5 s in a warm JVM and 7 s in a cold one here, so
    a run that writes no embeddings never loads Spark's Delta writer. Spark where delta-rs
    will not write it (a writer feature it lacks, a schema it cannot merge); ``spark``
    None: a local session is started for that case only."""
    from pipeline import deltars

    with contextlib.suppress(deltars.NotWritableHere):
        deltars.append(path, schema_ddl, rows, commit_tag(run_id), merge_schema)
        return
    from pipeline.spark import session_for  # spark None: a run that started no Spark

    spark = session_for(spark, "embed-bookkeeping", path)
    append_rows(rows_frame(spark, schema_ddl, rows).coalesce(1), path, run_id, merge_schema)


def read_records(spark: SparkSession | None, path: str,
                 equal: dict[str, Any] | None = None) -> Any:
    """The rows of a small bookkeeping table (runs, drift) as pandas, filtered on
    ``column == value`` for each item of ``equal``: delta-rs (the filter pushed down to
    the Parquet scan), local or remote, unless delta-rs will not read it (deletion
    vectors, column mapping); then Spark (``spark`` None: a local session is started for
    that case only). The reading twin of append_records."""
    from pyspark.sql import functions as F

    from pipeline import deltars
    from pipeline.spark import session_for

    with contextlib.suppress(deltars.NotReadableHere):
        return deltars.read_pandas(path, equal)
    df = session_for(spark, "embed-bookkeeping", path).read.format("delta").load(path)
    for column, value in (equal or {}).items():
        df = df.filter(F.col(column) == value)
    return df.toPandas()


def rows_frame(spark: SparkSession, schema_ddl: str, rows: list[dict[str, Any]]) -> DataFrame:
    """A DataFrame of dict rows in a DDL schema's column order; missing keys are null."""
    from pyspark.sql.types import DataType, StructType

    schema = DataType.fromDDL(schema_ddl)
    assert isinstance(schema, StructType)
    names = schema.fieldNames()
    return spark.createDataFrame([tuple(row.get(n) for n in names) for row in rows], schema)


def txn_committed(spark: SparkSession, path: str, txn: tuple[str, int]) -> bool:
    """Delta recorded this txn (app id, version) for the table: that commit is done."""
    return committed_txn(spark, path, txn[0]) >= txn[1]
