"""Delta sink: the output table, its identity properties, and atomic commits.

The table records what made it (model fingerprint, pooling, max_length, prompt,
output specs) as table properties; a run with another identity is refused
before anything is written. Each run commits its rows in ONE Delta commit
tagged with the run id (``userMetadata``), so ``DESCRIBE HISTORY`` ties table
versions to runs and a killed run leaves the table at its last commit.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import CHUNK_COLUMNS, CHUNK_TEXT
from pipeline.errors import AlreadyCommitted, ConcurrentRunError, SinkConflictError

if TYPE_CHECKING:
    from datetime import datetime

    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from pipeline.config import RunConfig
    from pipeline.encoder.model import ModelInfo
    from pipeline.write_plan import CommitKind

PROP_PREFIX = "embed."
# Properties that decide the stored vectors: a mismatch means incomparable vectors.
# MERGE commits of one process take turns (backfill threads); they also set session
# confs (txn ids), which are per session, not per thread.
MERGE_LOCK = threading.Lock()
_CONFLICT_MARKERS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
                     "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
                     "ConcurrentWriteException", "DELTA_CONCURRENT")
# partition_by is there only when set, so tables made before it existed keep matching.
# head (the model's Dense layers) likewise: only for models that have one.
IDENTITY_KEYS = ("model", "model_fingerprint", "pooling", "max_length", "prompt", "outputs",
                 "partition_by", "chunking", "head")


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


def table_identity(cfg: RunConfig, info: ModelInfo | None,
                   model_fingerprint: str) -> dict[str, str]:
    """What a table made by this run records (``cfg``: resolved by the preflight, so the
    model's own pooling, max length and document prompt). ``model_path`` (where the
    model was, for ``embed search``) is recorded but not compared."""
    from pipeline.outputs import describe

    head = info.modules.head() if info else None
    return {
        "model": info.name if info else "",
        "model_fingerprint": model_fingerprint,
        "pooling": str(cfg.model.pooling),
        "max_length": str(cfg.model.max_length),
        "prompt": cfg.model.prompt or "",
        "outputs": json.dumps(describe(cfg.outputs), sort_keys=True),
        **({"partition_by": cfg.sink.partition_by} if cfg.sink.partition_by else {}),
        **({"chunking": chunking_identity(cfg)} if cfg.chunking.enabled else {}),
        **({"head": json.dumps(head, sort_keys=True)} if head else {}),
        **({"model_path": str(info.path)} if info else {}),
    }


def chunking_identity(cfg: RunConfig) -> str:
    """What decides a chunked table's rows: how documents are cut and encoded, and
    whether the passages' texts are stored (a column of the table)."""
    c = cfg.chunking
    return json.dumps({"mode": c.mode, "max_tokens": c.max_tokens,
                       "overlap_tokens": c.overlap_tokens, "boundary": c.boundary,
                       "store_chunk_text": cfg.sink.store_chunk_text}, sort_keys=True)


def is_delta_table(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        return True  # remote: let Delta decide
    return (Path(path.removeprefix("file://")) / "_delta_log").is_dir()


def read_identity(spark: SparkSession, path: str) -> dict[str, str] | None:
    from delta.tables import DeltaTable

    if not is_delta_table(path) or not DeltaTable.isDeltaTable(spark, path):
        return None
    props = DeltaTable.forPath(spark, path).detail().collect()[0]["properties"] or {}
    return {k[len(PROP_PREFIX):]: v for k, v in props.items() if k.startswith(PROP_PREFIX)}


# Keys an older release recorded otherwise, set anew (upgraded_identity) on the next commit.
UPGRADED = ("model_fingerprint", "model_path")


def upgraded_identity(stored: dict[str, str] | None, info: ModelInfo,
                      model_fingerprint: str) -> dict[str, str] | None:
    """A table of an older release records the weights-only fingerprint of the same
    model (and no model_path): it is this model's table. Returned with today's values,
    which the run's commit stores; any other identity as it is."""
    if stored is None or stored.get("model_fingerprint") == model_fingerprint:
        return stored
    from pipeline.encoder.model import legacy_fingerprint

    if stored.get("model_fingerprint") != legacy_fingerprint(info):
        return stored
    return {**stored, "model_fingerprint": model_fingerprint, "model_path": str(info.path)}


def stale_keys(recorded: dict[str, str] | None, stored: dict[str, str] | None,
               wanted: dict[str, str]) -> dict[str, str]:
    """Of the :data:`UPGRADED` keys, those a table of this very model (``stored``, after
    :func:`upgraded_identity`) records otherwise: an older release's fingerprint, a model
    directory that moved. Set on the table's next commit."""
    if not recorded or not stored or stored.get("model_fingerprint") != wanted.get(
            "model_fingerprint"):
        return {}
    return {k: wanted[k] for k in UPGRADED if k in wanted and recorded.get(k) != wanted[k]}


def identity_changes(stored: dict[str, str] | None, wanted: dict[str, str]) -> frozenset[str]:
    """The identity keys (model, weights, pooling, outputs ...) whose stored value differs
    from this run's; calibration and canary ids are not identity. Empty: same, or no
    table yet."""
    if stored is None:
        return frozenset()
    return frozenset(k for k in IDENTITY_KEYS if stored.get(k) != wanted.get(k))


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


def ensure_table(spark: SparkSession, path: str, schema: StructType,
                 identity: dict[str, str], deletion_vectors: bool = False) -> None:
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schema)
    if identity.get("partition_by"):
        builder = builder.partitionedBy(identity["partition_by"])
    for key, value in identity.items():
        builder = builder.property(PROP_PREFIX + key, value)
    if deletion_vectors:
        builder = builder.property("delta.enableDeletionVectors", "true")
    try:
        builder.execute()
    except Exception:
        # Two runs creating the table at once: the loser finds it made (or, a moment
        # before its first commit lands, a folder that is not a table yet: wait for
        # it); then the identity check decides, as for any existing table.
        stored = _identity_once_made(spark, path)
        if stored is None:
            raise
        check_compatible(stored, identity, path)


def _identity_once_made(spark: SparkSession, path: str, wait: float = 10.0):
    import time

    deadline = time.monotonic() + wait
    while True:
        stored = read_identity(spark, path) if is_delta_table(path) else None
        if stored is not None or time.monotonic() > deadline:
            return stored
        time.sleep(0.5)


def set_identity(spark: SparkSession, path: str, identity: dict[str, str]) -> None:
    pairs = ", ".join(f"'{PROP_PREFIX}{k}' = '{_sql_str(v)}'" for k, v in identity.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({pairs})")


def _sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


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


def commit_tag(run_id: str, meta: dict[str, str] | None = None) -> str:
    """A commit's ``userMetadata``: the run id and, for a commit of embeddings, what
    made them (``runtime``: device/precision/attention; ``placement``)."""
    tag = {"run_id": run_id, **{k: v for k, v in (meta or {}).items() if v}}
    return json.dumps(tag, separators=(",", ":"))


def _run_commit(spark: SparkSession, path: str, run_id: str):
    """This run's latest commit (by userMetadata: other runs may have committed since),
    or None."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    meta = F.col("userMetadata")
    mine = (F.get_json_object(meta, "$.run_id") == run_id) | (meta == run_id)  # or pre-JSON
    rows = (DeltaTable.forPath(spark, path).history(50)
            .filter(mine).orderBy("version", ascending=False)
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


def _snapshot(spark: SparkSession, path: str):
    """The table's latest Delta snapshot, from the JVM's cached DeltaLog: no Spark job
    (DESCRIBE DETAIL or history() each cost one, ~1 s here)."""
    jvm = spark._jvm
    assert jvm is not None, "a classic (JVM) Spark session is needed, not Spark Connect"
    none = getattr(getattr(jvm.scala, "None$"), "MODULE$")
    log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, path)
    return log.update(False, none, none)


def committed_txn(spark: SparkSession, path: str, app_id: str) -> int:
    """The last txnVersion Delta recorded for ``app_id`` on this table (-1: none)."""
    if not is_delta_table(path):
        return -1
    found = _snapshot(spark, path).transactions().get(app_id)
    return int(found.get()) if found.isDefined() else -1


def latest_version(spark: SparkSession, path: str) -> int:
    return int(_snapshot(spark, path).version())


def table_property(spark: SparkSession, path: str, key: str) -> str | None:
    """One Delta table property (``delta.*`` included) of the latest version."""
    found = _snapshot(spark, path).metadata().configuration().get(key)
    return str(found.get()) if found.isDefined() else None


@contextlib.contextmanager
def session_conf(spark: SparkSession, conf: dict[str, str]):
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
    text = str(exc)
    return lost_race(path) if any(marker in text for marker in _CONFLICT_MARKERS) else None


def lost_race(path: str) -> ConcurrentRunError:
    """Another run committed to the table while this one was writing: Delta's conflict
    check stopped this run, or its MERGE found every row already written."""
    return ConcurrentRunError(
        f"another run holds this table: it committed to {path} while this run was writing "
        "(nothing of this run was written); re-run to embed what it did not")


@contextlib.contextmanager
def conflicts_reported(path: str):
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
                _merge(spark, df, path, req.merge_keys, req.replace_matched and
                       req.kind == "merge" and not req.replace_documents, req.deletes,
                       by_id=req.replace_documents)
        return last_commit(spark, path, run_id, txn)
    except ConcurrentRunError:
        # The run we lost to may have committed this very txn (the same partition
        # at once): that is a skip, not a conflict.
        if txn and committed_txn(spark, path, txn[0]) >= txn[1]:
            raise AlreadyCommitted(f"{txn[0]} v{txn[1]} was committed to {path} by another "
                                   "run while this one was writing") from None
        raise


def _merge(spark: SparkSession, df: DataFrame, path: str, keys: tuple[str, ...],
           replace_matched: bool, deletes: DataFrame | None = None,
           by_id: bool = False) -> None:
    """``by_id`` (chunked tables): a source row matches only through its id's delete
    marker, so every stored row (passage) of the ids in ``deletes`` is deleted (a
    changed document's old passages, however many) and every row of ``df`` inserted;
    ``deletes`` holds each id once, so a stored row matches one source row at most."""
    from delta.tables import DeltaTable

    on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    if deletes is None:
        merge = DeltaTable.forPath(spark, path).alias("t").merge(df.alias("s"), on)
        if replace_matched:
            merge = merge.whenMatchedUpdateAll()
        merge.whenNotMatchedInsertAll().execute()
        return
    # The deleted ids ride along as source rows flagged _delete (their other columns
    # null); a flagged row matches every stored row of its id.
    rest = "FALSE" if by_id else (
        " AND ".join(f"t.{k} = s.{k}" for k in keys if k != "id") or "TRUE")
    source = _with_deletes(df, deletes)
    columns: dict[str, str | Column] = {c: f"s.`{c}`" for c in df.columns}
    merge = (DeltaTable.forPath(spark, path).alias("t")
             .merge(source.alias("s"), f"t.id = s.id AND (s._delete OR ({rest}))")
             .whenMatchedDelete(condition="s._delete"))
    if replace_matched:
        merge = merge.whenMatchedUpdate(condition="NOT s._delete", set=columns)
    merge.whenNotMatchedInsert(condition="NOT s._delete", values=columns).execute()


def _with_deletes(df: DataFrame, deletes: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    nulls = [F.col("id") if c == "id" else F.lit(None).cast(df.schema[c].dataType).alias(c)
             for c in df.columns]
    return (df.withColumn("_delete", F.lit(False))
            .unionByName(deletes.select(*nulls, F.lit(True).alias("_delete"))))


def mark_txn(spark: SparkSession, path: str, run_id: str, txn: tuple[str, int]) -> None:
    """Record a txn with no rows (an empty partition), so a re-run skips it too."""
    from delta.tables import DeltaTable

    empty = spark.read.format("delta").load(path).limit(0)
    with MERGE_LOCK, session_conf(spark, _commit_conf(run_id, txn)):
        DeltaTable.forPath(spark, path).alias("t").merge(empty.alias("s"), "t.id = s.id") \
            .whenNotMatchedInsertAll().execute()


def delete_ids(spark: SparkSession, path: str, ids_df: DataFrame, run_id: str) -> int:
    """Delete output rows whose id left the source; returns rows deleted."""
    from delta.tables import DeltaTable

    if ids_df.limit(1).count() == 0:
        return 0
    with MERGE_LOCK, session_conf(spark, _commit_conf(run_id, None)):
        DeltaTable.forPath(spark, path).alias("t").merge(ids_df.alias("s"), "t.id = s.id") \
            .whenMatchedDelete().execute()
    row = _run_commit(spark, path, run_id)
    metrics = (row["operationMetrics"] if row is not None else None) or {}
    return int(metrics.get("numTargetRowsDeleted", 0))


def append_rows(df: DataFrame, path: str, run_id: str, merge_schema: bool = False) -> None:
    """A bookkeeping append (quarantine, runs, canary, drift, samples), its commit tagged
    with the same JSON ``userMetadata`` as the output table's commits."""
    writer = df.write.format("delta").mode("append").option("userMetadata", commit_tag(run_id))
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
    writer.save(path)
