"""SparkSession with Delta, Arrow, the project's interpreter and the connectors of the
object stores a run uses (pipeline.jars) set up, and their settings (pipeline.storage).

Also writes the installed pyspark's ``conf/spark-defaults.conf`` (``embed
setup-spark``) so a plain ``spark-submit jobs/embed.py`` from this environment
gets the Delta jars, the Delta catalog and this interpreter on its workers (and with
``--storage s3`` the S3A connector).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import jars, session, storage
from pipeline.config import SparkConfig
from pipeline.errors import StorageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
# The class each store's connector provides: a session without it cannot reach the store.
CONNECTOR_CLASSES = {"s3": "org.apache.hadoop.fs.s3a.S3AFileSystem",
                     "azure": "org.apache.hadoop.fs.azurebfs.SecureAzureBlobFileSystem",
                     "gcs": "com.google.cloud.hadoop.fs.gcs.GoogleHadoopFileSystem"}

_QUIET_LOG4J = """\
# Written by `embed setup-spark`: keep Spark's console to warnings and errors.
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.delta.name = org.apache.spark.sql.delta
logger.delta.level = error
logger.shutdown.name = org.apache.spark.util.ShutdownHookManager
logger.shutdown.level = error
logger.taskset.name = org.apache.spark.scheduler.TaskSetManager
logger.taskset.level = error
logger.ivy.name = org.apache.spark.deploy.SparkSubmitUtils
logger.ivy.level = error
"""


# The driver JVM compiles with C1 only: a run's driver lives seconds to minutes and
# spends its CPU on class loading and compiling what it runs once (Delta's log replay,
# planning), where C2's second compilation competes with the Python workers for the
# cores. Measured here on 2 cores: a cold 300-row `embed run` 38.6 -> 34.2 s and a
# cold no-op (Spark path) 21.7 -> 17.4 s (means of two runs each); bench/job.py on the
# 8,017 demo texts 1.06x -> 1.19x of sentence-transformers; tests/test_incremental.py
# in one session 228 s either way. Executors keep the JVM's default.
DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"
# A session that lives long and runs many jobs (a notebook, the test suite's one
# session) wants C2 back: set spark.driver.extraJavaOptions to this (the JVM's default).
# The test suite's session ran its in-process tests about a third slower with C1 only.
LONG_LIVED_JAVA_OPTIONS = "-XX:TieredStopAtLevel=4"


def spark_home() -> Path:
    return jars.spark_home()


def base_conf(python: str | None = None, storages: Iterable[str] = (),
              ship_connectors: bool = True) -> dict[str, str]:
    """What every session gets: Delta's jars (with the connectors of ``storages``, on
    every node, unless ``ship_connectors`` is False: a local master's driver has them on
    its classpath), Delta's extension and catalog, this interpreter on the workers."""
    python = python or sys.executable
    kinds = sorted(set(storages))
    connectors = [j for kind in kinds for j in [
        *(jars.ensure(kind) if ship_connectors else []), *jars.delta_extras(kind)]]
    return {
        "spark.jars": ",".join([*jars.ensure("delta"), *connectors]),
        **_log_stores(storages),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        "spark.driver.extraJavaOptions": DRIVER_JAVA_OPTIONS,
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "8",
        "spark.databricks.delta.snapshotPartitions": "2",
        # Delta's VACUUM lists files in this many tasks; Spark's default of 10,000
        # makes a VACUUM of a small table take 50-150 s on 2 cores (5 s at 64)
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "64",
    }


def local_metastore_conf(folder: Path) -> dict[str, str]:
    """Hive support over an embedded Derby metastore, with its warehouse, in ``folder``:
    a catalog on one machine (a Connect server to try, the tests). Static confs: a
    session gets them when it starts."""
    return {"spark.sql.catalogImplementation": "hive",
            "spark.sql.warehouse.dir": str(folder / "warehouse"),
            "spark.hadoop.javax.jdo.option.ConnectionURL":
                f"jdbc:derby:;databaseName={folder / 'metastore_db'};create=true"}


def derby_log_option(folder: Path) -> str:
    """The driver JVM option that puts Derby's log in ``folder``, not the working dir."""
    return f"-Dderby.stream.error.file={folder / 'derby.log'}"


def _storages_file() -> Path:
    return spark_home() / "conf" / "embed-storage.txt"


def set_up_storages() -> list[str]:
    """The stores ``embed setup-spark --storage`` put into spark-defaults.conf so far."""
    path = _storages_file()
    return path.read_text().split() if path.is_file() else []


def write_spark_defaults(python: str | None = None, storages: Iterable[str] = ()) -> Path:
    """Write spark-defaults.conf + log4j2.properties into the installed pyspark, and
    pin SPARK_HOME for this environment's Spark scripts (:func:`pin_spark_home`).
    ``storages`` (s3, azure, gcs) join the ones set up before: their connectors go on
    every spark-submit's classpath (resolved from Maven Central once)."""
    conf_dir = spark_home() / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    kinds = sorted({*set_up_storages(), *storages})
    lines = ["# Written by `embed setup-spark` for this environment."]
    lines += [f"{k} {v}" for k, v in base_conf(python, kinds).items()]
    storage.write_bytes(str(_storages_file()), ("\n".join(kinds) + "\n").encode())
    target = conf_dir / "spark-defaults.conf"
    # renamed into place: a spark-submit starting meanwhile reads the old file or the new
    storage.write_bytes(str(target), ("\n".join(lines) + "\n").encode())
    storage.write_bytes(str(conf_dir / "log4j2.properties"), _QUIET_LOG4J.encode())
    pin_spark_home()
    return target


_FIND_SPARK_HOME = """\
#!/usr/bin/env bash
# Written by `embed setup-spark`: SPARK_HOME for this environment's Spark scripts.
# pyspark's own find-spark-home asks `python3` from PATH where pyspark is; that is
# not this environment's interpreter unless the venv is activated, so
# `.venv/bin/spark-submit` typed in a fresh shell failed with "Could not find
# valid SPARK_HOME". spark-submit, pyspark, spark-class ... source this file
# only when SPARK_HOME is unset; a SPARK_HOME of your own still wins.
if [ -z "${{SPARK_HOME}}" ]; then
  export SPARK_HOME="{home}"
fi
"""


def pin_spark_home() -> Path | None:
    """Rewrite the ``find-spark-home`` that pip put beside this interpreter (next to
    ``spark-submit``) so it names this environment's pyspark as SPARK_HOME, without
    asking whichever ``python3`` is first on PATH. Returns the file written, or None
    where pyspark's scripts are not beside this interpreter."""
    import sysconfig

    import pyspark

    scripts = Path(sysconfig.get_path("scripts"))
    target = scripts / "find-spark-home"
    if not (scripts / "spark-submit").is_file() or not target.is_file():
        return None
    target.write_text(_FIND_SPARK_HOME.format(home=Path(pyspark.__file__).parent))
    target.chmod(0o755)
    return target


def get_session(cfg: SparkConfig, storages: Iterable[str] = ()) -> SparkSession:
    """The active session (spark-submit, the DAG) or a new one with Delta configured, able
    to reach ``storages`` (s3, azure, gcs: :func:`pipeline.storage.kinds`).

    A new session gets each store's connector (a local master on the driver's classpath:
    no copy of the AWS SDK's 690 MB bundle per session; a cluster's executors by
    ``spark.jars``) and the store's settings as Hadoop keys; ``spark.conf`` keys of the
    config win over both."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    remote = cfg.remote or os.environ.get("SPARK_REMOTE")
    if remote:
        return connect(remote, cfg, storages)
    active = SparkSession.getActiveSession()
    if active is not None:
        return adopt(active, cfg, storages)
    builder = SparkSession.builder.appName(cfg.app_name)
    # Under spark-submit (the JVM started this Python) --master and the classpath are
    # spark-submit's, not the config's: the session is checked as an adopted one.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if cfg.master and not submitted:
        builder = builder.master(cfg.master)
    local = (cfg.master or "local[*]").startswith("local")
    for key, value in {**base_conf(storages=storages, ship_connectors=not local),
                       **_driver_classpath(storages if local else ()),
                       **_log_stores(storages), **_hadoop_keys(storages)}.items():
        if not submitted:
            builder = builder.config(key, value)
    builder = builder.config("spark.ui.enabled", "false")
    for key, value in cfg.conf.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    session.quiet(spark)
    if submitted:
        return adopt(spark, cfg, storages)
    _apply_runtime_conf(spark, cfg, storages)
    return spark


def connect(remote: str, cfg: SparkConfig, storages: Iterable[str] = ()) -> SparkSession:
    """A Spark Connect client of the server at ``remote`` (``sc://host:port``). The
    server owns the jars, the master and the stores' settings; the config's
    ``spark.sql.*`` keys become this session's confs."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(remote).getOrCreate()
    return adopt(spark, cfg, storages)


def adopt(spark: SparkSession, cfg: SparkConfig, storages: Iterable[str] = ()) -> SparkSession:
    """A session made elsewhere (spark-submit, the DAG, a notebook) set up for this run:
    the stores' connectors must be on its classpath (else a one-line error that says how),
    and the stores' settings and the config's ``spark.hadoop.*`` keys go into its Hadoop
    configuration now."""
    missing = [kind for kind in sorted(set(storages)) if not _has_class(
        spark, CONNECTOR_CLASSES.get(kind, ""))]
    if missing:
        kind = missing[0]
        raise StorageError(
            f"this Spark session has no {kind} connector ({CONNECTOR_CLASSES[kind]}): run "
            f"`embed setup-spark --storage {kind}` once (it puts the connector into "
            "spark-defaults.conf), or start the job with --packages "
            f"{jars.coordinate(kind)}")
    if "s3" in set(storages) and session.conf_value(spark, LOG_STORE_KEYS[0]) is None:
        raise StorageError(
            "this Spark session commits to S3 with Delta's single-driver log store, which "
            "loses a commit when two drivers write one table at once: run `embed "
            f"setup-spark --storage s3` once, or pass --conf {LOG_STORE_KEYS[0]}="
            f"{jars.LOGSTORE_CLASS} (set it to io.delta.storage.S3SingleDriverLogStore to "
            "accept one writer per table)")
    _apply_runtime_conf(spark, cfg, storages)
    return spark


_PROBED: dict[str, bool] = {}


def check_conditional_writes(spark: SparkSession, location: str) -> None:
    """Refuse (StorageError) a bucket that ignores conditional writes: the commits of two
    drivers could overwrite each other there. Probed once per bucket and process, beside
    ``location``: two create-if-absent PUTs of one object, the second must fail (412).
    Skipped where the session uses a log store of the user's own (one writer accepted,
    or a coordinator such as DynamoDB)."""
    if storage.scheme(location) != "s3a" or session.is_connect(spark):
        return  # a Connect server's stores are its operator's to set up
    bucket = storage.bucket_and_key(location)[0]
    if session.conf_value(spark, LOG_STORE_KEYS[0]) != jars.LOGSTORE_CLASS:
        return
    if bucket not in _PROBED:
        _PROBED[bucket] = _refuses_second_create(spark, storage.join(
            storage.parent(location), f"_embedding_probe-{uuid.uuid4().hex}"))
    if not _PROBED[bucket]:
        raise StorageError(
            f"s3a://{bucket} ignores conditional writes (If-None-Match): two drivers "
            "committing to one table there could overwrite each other's commit; use a "
            "store that has them (AWS S3 does since 2024), or run one writer per table and "
            f"set spark.conf.{LOG_STORE_KEYS[0]}: io.delta.storage.S3SingleDriverLogStore")


def _refuses_second_create(spark: SparkSession, location: str) -> bool:
    jvm = spark._jvm
    assert jvm is not None
    path = jvm.org.apache.hadoop.fs.Path(location)
    fs = path.getFileSystem(session.hadoop_conf(spark))

    def create() -> Any:
        return (fs.createFile(path).overwrite(False)
                .must("fs.option.create.conditional.overwrite", True).build())

    first, second = create(), create()  # both pass the existence check: neither is there
    first.write(bytearray(b"1"))
    first.close()
    second.write(bytearray(b"2"))
    try:
        second.close()
        refused = False
    except Exception:  # noqa: BLE001 - py4j wraps S3A's RemoteFileChangedException (412)
        refused = True
    fs.delete(path, False)
    return refused


def _has_class(spark: SparkSession, name: str) -> bool:
    if session.is_connect(spark) or not name:
        return True  # a Connect server's classpath is its operator's
    jvm = spark._jvm
    if jvm is None:
        return True
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
    try:
        jvm.java.lang.Class.forName(name, False, loader)
    except Exception:  # noqa: BLE001 - py4j wraps ClassNotFoundException
        return False
    return True


def _driver_classpath(storages: Iterable[str]) -> dict[str, str]:
    connectors = [j for kind in sorted(set(storages)) for j in jars.ensure(kind)]
    return {"spark.driver.extraClassPath": os.pathsep.join(connectors)} if connectors else {}


# Delta picks a log store per URI scheme; S3's must make commits conditional PUTs.
LOG_STORE_KEYS = tuple(f"spark.delta.logStore.{s}.impl" for s in ("s3a", "s3", "s3n"))


def _log_stores(storages: Iterable[str]) -> dict[str, str]:
    return dict.fromkeys(LOG_STORE_KEYS, jars.LOGSTORE_CLASS) if "s3" in set(storages) else {}


def _hadoop_keys(storages: Iterable[str]) -> dict[str, str]:
    """The stores' settings as session confs (``spark.hadoop.`` + the Hadoop key)."""
    if "s3" not in set(storages):
        return {}
    return {f"spark.hadoop.{k}": v for k, v in storage.settings().hadoop_conf().items()}


def session_for(spark: SparkSession | None, app_name: str, location: str) -> SparkSession:
    """``spark``, or a local session for a table that delta-rs could not serve (able to
    reach ``location``'s store)."""
    return spark or get_session(SparkConfig(master="local[1]", app_name=app_name),
                                storage.kinds([location]))


def _apply_runtime_conf(spark: SparkSession, cfg: SparkConfig,
                        storages: Iterable[str] = ()) -> None:
    """The config's session confs that can change now: ``spark.sql.*``, and the Hadoop
    keys (the stores' settings, then ``spark.hadoop.*``) into the Hadoop configuration
    every later job reads. Other keys are fixed when a session starts: warned about."""
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    session.delta_errors(spark)
    connect_client = session.is_connect(spark)
    hadoop = {} if connect_client else {
        k.removeprefix("spark.hadoop."): v for k, v in _hadoop_keys(storages).items()}
    for key, value in cfg.conf.items():
        if key.startswith("spark.sql.") and spark.conf.isModifiable(key):
            spark.conf.set(key, str(value))
        elif key.startswith("spark.hadoop.") and connect_client:
            raise StorageError(f"spark.conf.{key}: a Spark Connect client cannot set the "
                               "server's Hadoop configuration; set it on the server "
                               "(its spark-defaults.conf or --conf)")
        elif key.startswith("spark.hadoop."):
            hadoop[key.removeprefix("spark.hadoop.")] = str(value)
        elif spark.conf.get(key, None) != str(value):
            log.warning("spark.conf.%s is fixed when a session starts; this session (started "
                        "by spark-submit or the DAG) keeps %s: pass it as --conf", key,
                        spark.conf.get(key, None))
    conf = session.hadoop_conf(spark)
    if hadoop and conf is not None:
        for key, value in hadoop.items():
            conf.set(key, value)


def task_slots(spark: SparkSession) -> int:
    """Concurrent tasks the cluster runs (local[N] -> N)."""
    return session.task_slots(spark)


