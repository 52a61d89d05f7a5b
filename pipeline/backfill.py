"""Backfills: embed a range of source partitions, each committed exactly once.

The work is split by the values of ``source.partition_column`` in [from, to].
Each partition is one :func:`pipeline.run.run` whose Delta commit carries a
transaction id: ``txnAppId`` = a stable id of (output table, model, outputs,
partition column, partition value) and ``txnVersion`` = 1. Delta records it in
the table's log atomically with the rows, so a re-run (after a kill, a crash or
a retry) finds it and skips that partition, and Delta itself would skip a
duplicate commit.

One app id per partition, not one per backfill with ordinal versions: Delta
skips a write whose txnVersion is <= the stored one, so ordinals break as soon
as partitions commit out of order (``--parallelism``) or a later backfill goes
back in time. Per-partition ids have neither problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline import sink, source
from pipeline.config import RunConfig
from pipeline.errors import AlreadyCommitted, ConfigError


@dataclass
class PartitionPlan:
    value: str
    app_id: str
    rows: int
    committed: bool


def app_id_for(cfg: RunConfig, model_fingerprint: str, value: str, salt: str = "") -> str:
    key = "|".join([cfg.sink.path, model_fingerprint, sink.table_identity(
        cfg, "", model_fingerprint)["outputs"], cfg.source.partition_column or "", salt])
    return f"embed-backfill-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{value}"


def partition_filter(column: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"CAST(`{column}` AS STRING) = '{escaped}'"


def plan(spark, cfg: RunConfig, model_fingerprint: str, start: str | None, end: str | None,
         salt: str = "") -> list[PartitionPlan]:
    """The partitions in [start, end] (compared as strings) and whether each is done."""
    from pyspark.sql import functions as F

    column = cfg.source.partition_column
    if not column:
        raise ConfigError("source.partition_column", "a backfill needs the source column to "
                          "split by (e.g. a date); set source.partition_column")
    df, _ = source.read_source(spark, cfg.source)
    if column not in df.columns:
        raise ConfigError("source.partition_column", f"column {column!r} is not in the source; "
                          f"its columns are: {', '.join(df.columns)}")
    value = F.col(column).cast("string")
    if start is not None:
        df = df.filter(value >= start)
    if end is not None:
        df = df.filter(value <= end)
    counts = (df.groupBy(value.alias("value")).count().filter("value IS NOT NULL")
              .orderBy("value").collect())
    plans = []
    for row in counts:
        app_id = app_id_for(cfg, model_fingerprint, row["value"], salt)
        done = sink.committed_txn(spark, cfg.sink.path, app_id) >= 1
        plans.append(PartitionPlan(value=row["value"], app_id=app_id, rows=row["count"],
                                   committed=done))
    return plans


def run_backfill(spark, cfg: RunConfig, plans: list[PartitionPlan], parallelism: int = 1,
                 on_done=None) -> list:
    """Run the pending partitions; returns their RunResults (committed ones skipped)."""
    from pipeline.run import run

    pending = [p for p in plans if not p.committed]

    def one(p: PartitionPlan):
        try:
            result = run(cfg, spark=spark, source_filter=partition_filter(
                cfg.source.partition_column, p.value), txn=(p.app_id, 1), partition=p.value)
        except AlreadyCommitted:
            result = None
        if on_done:
            on_done(p, result)
        return result

    if not pending:
        return []
    # The canary checks the runtime, which all partitions share: the first
    # partition runs it, the others skip it.
    first = one(pending[0])
    cfg = dataclasses.replace(cfg, drift=dataclasses.replace(
        cfg.drift, canary=dataclasses.replace(cfg.drift.canary, enabled=False)))
    if parallelism <= 1:
        return [first] + [one(p) for p in pending[1:]]
    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="backfill") as pool:
        return [first, *pool.map(one, pending[1:])]
