"""What a Spark session offers, and the few calls that differ by kind of session.

A classic session has a JVM in this process: a SparkContext (its status tracker,
accumulators, job groups, default parallelism, the Hadoop configuration). A Spark
Connect client (``spark.remote: sc://host:port``, or ``SPARK_REMOTE``) has none of
them: it sends plans to a server. Everything else this project asks of Spark (DataFrames,
Arrow UDFs, Delta's SQL, session confs, job tags) is the same for both, and the stages
call it directly. Only this module asks which kind a session is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class Capabilities:
    """``classic``: a JVM in this process (SparkContext, accumulators, status tracker);
    False: a Spark Connect client."""

    classic: bool

    @classmethod
    def of(cls, spark: SparkSession) -> Capabilities:
        return cls(classic=not type(spark).__module__.startswith("pyspark.sql.connect"))


def is_connect(spark: SparkSession) -> bool:
    return not Capabilities.of(spark).classic


def conf_value(spark: SparkSession, key: str, default: str | None = None) -> str | None:
    """A Spark conf as the session sees it (the application's static confs included:
    Spark copies them into every session's conf), classic or Connect alike."""
    value = spark.conf.get(key, None)
    return default if value is None else str(value)


def master(spark: SparkSession) -> str:
    """The master the session's jobs run on (the server's, for a Connect client)."""
    return conf_value(spark, "spark.master") or "local[*]"


def is_local(spark: SparkSession) -> bool:
    return master(spark).startswith("local")


_SLOTS: dict[int, int] = {}


def task_slots(spark: SparkSession) -> int:
    """Concurrent tasks the cluster runs (local[N] -> N): the SparkContext's default
    parallelism; a Connect client asks the server once per session (the partitions of a
    range without a partition count, which Spark sizes by the same number)."""
    if Capabilities.of(spark).classic:
        return max(1, spark.sparkContext.defaultParallelism)
    key = id(spark)
    if key not in _SLOTS:
        _SLOTS[key] = _server_parallelism(spark)
    return _SLOTS[key]


def _server_parallelism(spark: SparkSession) -> int:
    set_explicitly = conf_value(spark, "spark.default.parallelism")
    if set_explicitly:
        return max(1, int(set_explicitly))
    found = re.fullmatch(r"local\[(\d+)(?:,\s*\d+)?\]", master(spark))
    if found:
        return max(1, int(found.group(1)))
    from pyspark.sql import functions as F

    partitions = spark.range(1 << 20).select(F.spark_partition_id().alias("p")).distinct()
    return max(1, partitions.count())


def tag_jobs(spark: SparkSession, tag: str, description: str) -> None:
    """Mark the jobs this thread starts from now on as ``tag`` (their group, on a classic
    session: the status tracker reads a group; a Connect client tags its operations),
    e.g. for the progress bar or to cancel them together."""
    if Capabilities.of(spark).classic:
        spark.sparkContext.setJobGroup(tag, description)
    else:
        spark.addTag(tag)


def quiet(spark: SparkSession) -> None:
    """Spark's console to errors only (a classic session; a server keeps its own)."""
    if Capabilities.of(spark).classic:
        spark.sparkContext.setLogLevel("ERROR")


def hadoop_conf(spark: SparkSession) -> Any | None:
    """The session's Hadoop configuration (a py4j object), None on a Connect client."""
    if not Capabilities.of(spark).classic:
        return None
    jsc = spark.sparkContext._jsc
    return jsc.hadoopConfiguration() if jsc is not None else None


def delta_errors(spark: SparkSession) -> None:
    """Delta's commit-conflict errors as its Python classes (``delta.exceptions``) on this
    kind of session. pyspark converts a JVM error as it raises it, so the conversion must
    be in place before any Delta command runs: a classic session patches py4j's converter,
    a Connect client registers Delta's classes with Connect's."""
    if Capabilities.of(spark).classic:
        import delta.exceptions  # noqa: F401
    else:
        import delta.connect.exceptions  # noqa: F401
