"""SparkSession with Delta, Arrow and the project's interpreter set up.

Also writes the installed pyspark's ``conf/spark-defaults.conf`` (``embed
setup-spark``) so a plain ``spark-submit jobs/embed.py`` from this environment
gets the Delta jars, the Delta catalog and this interpreter on its workers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import SparkConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SCALA_VERSION = "2.13"
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


def delta_package() -> str:
    """The Maven coordinate of the Delta jar that matches the installed pip packages."""
    from importlib.metadata import version

    import pyspark

    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_mm}_{SCALA_VERSION}:{version('delta-spark')}"


def spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def _jar_manifest() -> Path:
    return spark_home() / "conf" / "delta-jars.txt"


def resolved_jars() -> list[str] | None:
    """Local paths of the Delta jars resolved at setup, if all still exist.

    Using them as ``spark.jars`` skips Ivy at every start: no resolution report
    on the console and no registry lookup at run time.
    """
    manifest = _jar_manifest()
    if not manifest.is_file():
        return None
    lines = manifest.read_text().split()
    if not lines or lines[0] != delta_package():
        return None
    jars = lines[1:]
    return jars if jars and all(Path(j).is_file() for j in jars) else None


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


def base_conf(python: str | None = None) -> dict[str, str]:
    python = python or sys.executable
    jars = resolved_jars()
    deps = {"spark.jars": ",".join(jars)} if jars else {"spark.jars.packages": delta_package()}
    return {
        **deps,
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


def write_spark_defaults(python: str | None = None) -> Path:
    """Write spark-defaults.conf + log4j2.properties into the installed pyspark, and
    pin SPARK_HOME for this environment's Spark scripts (:func:`pin_spark_home`)."""
    conf_dir = spark_home() / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `embed setup-spark` for this environment."]
    lines += [f"{k} {v}" for k, v in base_conf(python).items()]
    target = conf_dir / "spark-defaults.conf"
    target.write_text("\n".join(lines) + "\n")
    (conf_dir / "log4j2.properties").write_text(_QUIET_LOG4J)
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


def get_session(cfg: SparkConfig) -> SparkSession:
    """The active session (spark-submit) or a new local one with Delta configured."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        _apply_runtime_conf(active, cfg)
        return active
    builder = SparkSession.builder.appName(cfg.app_name)
    # Under spark-submit (the JVM started this Python) --master decides, not the config.
    if cfg.master and "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.master)
    for key, value in base_conf().items():
        builder = builder.config(key, value)
    builder = builder.config("spark.ui.enabled", "false")
    for key, value in cfg.conf.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    _apply_runtime_conf(spark, cfg)
    return spark


def session_for(spark: SparkSession | None, app_name: str) -> SparkSession:
    """``spark``, or a local session for a table that delta-rs could not serve."""
    return spark or get_session(SparkConfig(master="local[1]", app_name=app_name))


def _apply_runtime_conf(spark: SparkSession, cfg: SparkConfig) -> None:
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    for key, value in cfg.conf.items():
        if key.startswith("spark.sql."):
            spark.conf.set(key, str(value))


def task_slots(spark: SparkSession) -> int:
    """Concurrent tasks the cluster runs (local[N] -> N)."""
    return max(1, spark.sparkContext.defaultParallelism)


_IVY_SETTINGS = """\
<!-- Written by `embed setup-spark`: Delta's jars come from Maven Central only (Spark's
     default resolver chain also asks the Spark Packages host, which is unreachable
     from many networks and fills the console with "not found" lines). -->
<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers>
    <ibiblio name="central" m2compatible="true" root="https://repo1.maven.org/maven2/"/>
  </resolvers>
</ivysettings>
"""


def ivy_settings() -> Path:
    """The ivysettings.xml the one resolution of Delta's jars uses."""
    path = spark_home() / "conf" / "ivysettings.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != _IVY_SETTINGS:
        path.write_text(_IVY_SETTINGS)
    return path


def warm_jar_cache() -> None:
    """Resolve Delta's jars into Ivy's cache once (from Maven Central), in a child
    process whose Ivy report goes to a log file: the console gets one line, or on
    failure the error and what to do."""
    import subprocess

    if resolved_jars():
        return
    log_file = spark_home() / "conf" / "delta-jars-resolve.log"
    print(f"bootstrap: resolving {delta_package()} from Maven Central", flush=True)
    with open(log_file, "w") as log:
        done = subprocess.run([sys.executable, "-m", "pipeline.spark", "--resolve"],
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not resolved_jars():
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()]
        why = next((ln for ln in reversed(lines) if any(
            word in ln for word in ("UNRESOLVED", "unresolved", "Error", "Exception",
                                    "not found"))), lines[-1] if lines else "no output")
        print(f"bootstrap: could not resolve Delta's jars: {why[:200]} (full log: {log_file});"
              " check that https://repo1.maven.org is reachable, then run make demo again",
              file=sys.stderr)
        sys.exit(1)


def _resolve_jars() -> None:
    """The child process of :func:`warm_jar_cache`: one session with spark.jars.packages."""
    import shutil
    import tempfile

    from pipeline.config import SparkConfig

    _jar_manifest().unlink(missing_ok=True)
    write_spark_defaults()  # packages, not stale jars, for this one resolution
    spark = get_session(SparkConfig(master="local[1]", app_name="embed-warm",
                                    conf={"spark.jars.ivySettings": str(ivy_settings())}))
    tmp = tempfile.mkdtemp(prefix="embed-warm-")
    try:
        spark.range(1).write.format("delta").save(tmp + "/t")
        jars = [j.removeprefix("file://") for j in
                spark.sparkContext.getConf().get("spark.jars", "").split(",") if j]
    finally:
        spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    _jar_manifest().write_text("\n".join([delta_package(), *jars]) + "\n")
    write_spark_defaults()  # now with spark.jars from the cache


if __name__ == "__main__":
    if "--warm" in sys.argv:
        warm_jar_cache()
    elif "--resolve" in sys.argv:
        _resolve_jars()
