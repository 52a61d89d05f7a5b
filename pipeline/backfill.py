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

:class:`Partition` is the one place that knows a partition's filter and txn id:
``embed backfill``, ``embed run --partition`` and the Airflow DAG all use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import source
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.results import Partition, RunResult
from pipeline.tables.delta import txn_committed
from pipeline.tables.identity import TableIdentity

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class PartitionPlan:
    partition: Partition
    rows: int
    committed: bool

    @property
    def value(self) -> str:
        return self.partition.value


def partition_column(cfg: RunConfig) -> str:
    column = cfg.source.partition_column
    if not column:
        raise ConfigError("source.partition_column", "a partition run or backfill needs the "
                          "source column to split by (e.g. a date); set "
                          "source.partition_column")
    return column


def partition(cfg: RunConfig, model_fingerprint: str, value: str, salt: str = "") -> Partition:
    """The partition ``value`` of this config's source, with its stable txn app id."""
    column = partition_column(cfg)
    key = "|".join([cfg.sink.path, model_fingerprint, TableIdentity.of_run(
        cfg, None, model_fingerprint)["outputs"], column, salt])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Partition(column=column, value=value, app_id=f"embed-backfill-{digest}-{value}")


def plan(spark: SparkSession, cfg: RunConfig, model_fingerprint: str, start: str | None,
         end: str | None, salt: str = "") -> list[PartitionPlan]:
    """The partitions in [start, end] (compared as strings) and whether each is done."""
    from pyspark.sql import functions as F

    column = partition_column(cfg)
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
    return _plans(cfg, model_fingerprint, salt, [(r["value"], r["count"]) for r in counts],
                  lambda txn: txn_committed(spark, cfg.sink.path, txn))


def _plans(cfg: RunConfig, model_fingerprint: str, salt: str, counts: list[tuple[str, int]],
           committed: Callable[[tuple[str, int]], bool]) -> list[PartitionPlan]:
    """A PartitionPlan per (value, rows), in that order; ``committed``: whether Delta
    recorded a txn (app id, version) on the output table."""
    plans = []
    for value, rows in counts:
        p = partition(cfg, model_fingerprint, value, salt)
        plans.append(PartitionPlan(partition=p, rows=rows, committed=committed(p.txn)))
    return plans


def plan_without_spark(cfg: RunConfig, model_fingerprint: str, start: str | None,
                       end: str | None, salt: str = "") -> list[PartitionPlan] | None:
    """:func:`plan`'s answer read with delta-rs and pyarrow, no JVM (``embed backfill
    --dry-run``), local or in an object store; None where that reader does not apply: a
    source that is not a Delta table, one delta-rs cannot read (deletion vectors, column
    mapping), or a partition column that is not a string, a date or an integer (Spark's
    cast to string is the partition value; those three cast alike in both)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline import deltars
    from pipeline.tables.delta import is_delta_table

    column = partition_column(cfg)
    if cfg.source.format != "delta":
        return None
    try:
        data = deltars.dataset(cfg.source.path)
    except Exception:  # noqa: BLE001 - NotReadableHere, or no table: Spark says so in its words
        return None
    if column not in data.schema.names:
        raise ConfigError("source.partition_column", f"column {column!r} is not in the source; "
                          f"its columns are: {', '.join(data.schema.names)}")
    kind = data.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_date32(kind) or pa.types.is_integer(kind)):
        return None
    values = pc.cast(data.to_table(columns=[column]).column(column), pa.string())
    counts = pc.value_counts(values.drop_null())
    found = sorted((str(v), int(n or 0)) for v, n in zip(counts.field("values").to_pylist(),
                                                    counts.field("counts").to_pylist(),
                                                    strict=True)
                   if (start is None or str(v) >= start) and (end is None or str(v) <= end))
    output = deltars.open_table(cfg.sink.path) if is_delta_table(cfg.sink.path) else None

    return _plans(cfg, model_fingerprint, salt, found,
                  lambda txn: deltars.txn_committed(output, txn))


def without_canary(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, drift=dataclasses.replace(
        cfg.drift, canary=dataclasses.replace(cfg.drift.canary, enabled=False)))


def run_backfill(spark: SparkSession, cfg: RunConfig, plans: list[PartitionPlan],
                 parallelism: int = 1,
                 on_done: Callable[[PartitionPlan, RunResult], None] | None = None,
                 ) -> list[RunResult]:
    """Run the pending partitions; returns their RunResults (committed ones skipped).

    A partition that fails (a drift breach with ``on_breach: fail`` included)
    stops the backfill: partitions not started are not run; its error is raised.
    """
    from pipeline.run import run

    def one(p: PartitionPlan, config: RunConfig) -> RunResult:
        result = run(config, spark=spark, partition=p.partition)
        if on_done:
            on_done(p, result)
        return result

    pending = [p for p in plans if not p.committed]
    if not pending:
        return []
    # The canary checks the runtime, which all partitions share: the first
    # partition runs it, the others skip it.
    results = [one(pending[0], cfg)]
    rest, rest_cfg = pending[1:], without_canary(cfg)
    if parallelism <= 1:
        return results + [one(p, rest_cfg) for p in rest]
    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="backfill") as pool:
        futures: list[Future[RunResult]] = [pool.submit(one, p, rest_cfg) for p in rest]
        try:
            results += [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results
