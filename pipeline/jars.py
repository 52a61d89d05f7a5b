"""The JVM jars a session needs beyond pyspark's own: Delta's, and the connector of each
object store a run reads or writes (S3A for ``s3a://``, ABFS for ``abfss://``, GCS for
``gs://``).

Each is resolved from Maven Central once, by Spark's own Ivy, in a child process whose
report goes to a log file, and remembered in a manifest beside the installed pyspark
(``conf/embed-jars-<kind>.txt``: the coordinate, then the jars in Ivy's cache). The
versions follow the installed pip packages: Delta's from ``delta-spark``, S3A's and
ABFS's from the Hadoop that pyspark ships (``hadoop-aws`` of that version brings the AWS
SDK bundle and the analytics accelerator its pom names). Resolved jars that duplicate
one of pyspark's own (hadoop-client, parquet, jackson ...) are left out, so the session
runs pyspark's versions only.

S3 also gets Delta a log store whose commits are conditional PUTs
(``pipeline/data/ConditionalS3LogStore.java``, compiled here once with the JDK's javac
against those jars): without it two drivers can overwrite each other's commit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import StorageError

SCALA_VERSION = "2.13"
GCS_CONNECTOR = "4.0.4"  # the newest gcs-connector that resolved with its dependencies
KINDS = ("delta", "s3", "azure", "gcs")
# Classes each kind's jars must load (the connector, and a class of what it needs): a
# resolution that lacks one is refused, not written down.
REQUIRED = {"delta": ("io.delta.tables.DeltaTable",),
            "s3": ("org.apache.hadoop.fs.s3a.S3AFileSystem",
                   "software.amazon.awssdk.services.s3.S3Client"),
            "azure": ("org.apache.hadoop.fs.azurebfs.SecureAzureBlobFileSystem",),
            "gcs": ("com.google.cloud.hadoop.fs.gcs.GoogleHadoopFileSystem",
                    "com.google.cloud.hadoop.gcsio.GoogleCloudStorageFileSystem")}
_ARTIFACT = re.compile(r"^(?:[^_]+_)?(.+?)-\d")  # Ivy's group_artifact-version.jar
MAVEN_CENTRAL = "https://repo1.maven.org/maven2/"
_IVY_SETTINGS = """\
<!-- Written by `embed setup-spark`: jars come from Maven Central only (or the mirror that
     EMBED_MAVEN_REPO names); Spark's default resolver chain also asks the Spark Packages
     host, which is unreachable from many networks and fills the console with "not found"
     lines. -->
<ivysettings>
  <settings defaultResolver="central"/>
  <resolvers>
    <ibiblio name="central" m2compatible="true" root="{root}"/>
  </resolvers>
</ivysettings>
"""


def maven_repo() -> str:
    """Maven Central, or a mirror of it (EMBED_MAVEN_REPO: a proxy of your own)."""
    return os.environ.get("EMBED_MAVEN_REPO") or MAVEN_CENTRAL


def spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


@cache
def hadoop_version() -> str:
    """The Hadoop version pyspark ships (its hadoop-client-api jar)."""
    found = sorted((spark_home() / "jars").glob("hadoop-client-api-*.jar"))
    if not found:
        raise StorageError(f"no hadoop-client-api jar in {spark_home() / 'jars'}: "
                               "pyspark is not installed with its jars")
    return found[0].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def coordinate(kind: str) -> str:
    """The Maven coordinate of ``kind``'s jars, matched to the installed packages."""
    from importlib.metadata import version

    import pyspark

    if kind == "delta":
        spark_mm = ".".join(pyspark.__version__.split(".")[:2])
        return f"io.delta:delta-spark_{spark_mm}_{SCALA_VERSION}:{version('delta-spark')}"
    return {"s3": f"org.apache.hadoop:hadoop-aws:{hadoop_version()}",
            "azure": f"org.apache.hadoop:hadoop-azure:{hadoop_version()}",
            "gcs": f"com.google.cloud.bigdataoss:gcs-connector:{GCS_CONNECTOR}"}[kind]


def manifest(kind: str) -> Path:
    return spark_home() / "conf" / f"embed-jars-{kind}.txt"


def resolved(kind: str) -> list[str] | None:
    """Local paths of ``kind``'s jars resolved earlier, if they all still exist."""
    path = manifest(kind)
    if not path.is_file():
        return None
    lines = path.read_text().split()
    if not lines or lines[0] != coordinate(kind):
        return None
    jars = lines[1:]
    return jars if jars and all(Path(j).is_file() for j in jars) else None


def ivy_settings() -> Path:
    """The ivysettings.xml every resolution here uses."""
    path = spark_home() / "conf" / "ivysettings.xml"
    text = _IVY_SETTINGS.format(root=maven_repo())
    if not path.is_file() or path.read_text() != text:
        storage.write_bytes(str(path), text.encode())
    return path


def pyspark_artifacts() -> set[str]:
    """The artifact names of pyspark's own jars (versions dropped)."""
    return {artifact(p.name) for p in (spark_home() / "jars").glob("*.jar")}


def artifact(jar_name: str) -> str:
    """``org.apache.parquet_parquet-hadoop-1.16.0.jar`` -> ``parquet-hadoop``."""
    found = _ARTIFACT.match(jar_name)
    return found.group(1) if found else jar_name.removesuffix(".jar")


LOGSTORE_SOURCE = Path(__file__).parent / "data" / "ConditionalS3LogStore.java"
LOGSTORE_CLASS = "io.embedpipeline.delta.ConditionalS3LogStore"


def logstore_jar() -> Path:
    """Where the conditional-commit log store's jar is kept (named by its source's and
    the libraries' digest, so a change of either builds it anew)."""
    import hashlib

    digest = hashlib.sha256(LOGSTORE_SOURCE.read_bytes()
                            + coordinate("delta").encode() + hadoop_version().encode())
    return spark_home() / "conf" / f"embed-logstore-{digest.hexdigest()[:16]}.jar"


def build_logstore(classpath: list[str]) -> Path:
    """Compile the log store (javac --release 17) and pack it as a jar, once."""
    import shutil
    import tempfile
    import zipfile

    target = logstore_jar()
    if target.is_file():
        return target
    javac = shutil.which("javac", path=os.pathsep.join(
        p for p in (os.path.join(os.environ.get("JAVA_HOME", ""), "bin"),
                    os.environ.get("PATH", "")) if p))
    if javac is None:
        raise StorageError("building the S3 log store that makes Delta's commits "
                               "conditional needs a JDK's javac (Java 17+) once: install one "
                               "or set JAVA_HOME, then run `embed setup-spark --storage s3`")
    with tempfile.TemporaryDirectory(prefix="embed-logstore-") as out:
        done = subprocess.run([javac, "--release", "17", "-nowarn", "-cp",
                               os.pathsep.join(classpath), "-d", out, str(LOGSTORE_SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StorageError(f"javac could not build {LOGSTORE_SOURCE.name}: "
                                   f"{(done.stderr.strip().splitlines() or ['?'])[0][:200]}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w") as jar:
            for cls in sorted(Path(out).rglob("*.class")):
                jar.write(cls, cls.relative_to(out).as_posix())
        os.replace(tmp, target)
    return target


def delta_extras(kind: str) -> list[str]:
    """Jars of ours that Delta's classes load (so they travel with Delta's in
    ``spark.jars``): S3's conditional-commit log store, built here once."""
    if kind != "s3":
        return []
    hadoop = sorted(str(p) for p in (spark_home() / "jars").glob("hadoop-client-api-*.jar"))
    return [str(build_logstore([*hadoop, *ensure("delta"), *ensure("s3")]))]


def ensure(kind: str, announce: str = "embed") -> list[str]:
    """``kind``'s jars: those resolved earlier, else resolved now (once, a line on stderr
    says so; concurrent processes wait for the first one's resolution).
    :class:`StorageError` where Maven Central cannot be reached."""
    jars = resolved(kind)
    if jars:
        return jars
    log_file = spark_home() / "conf" / f"embed-jars-{kind}-resolve.log"
    with storage.locked(log_file.with_suffix(".lock")):
        jars = resolved(kind)  # another process resolved it meanwhile
        if jars:
            return jars
        print(f"{announce}: resolving {coordinate(kind)} from Maven Central (once, into "
              "Ivy's cache)", file=sys.stderr, flush=True)
        with open(log_file, "w") as log:
            done = subprocess.run([sys.executable, "-m", "pipeline.jars", "--resolve", kind,
                                   coordinate(kind)],
                                  stdout=log, stderr=subprocess.STDOUT)
    jars = resolved(kind)
    if done.returncode != 0 or not jars:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()]
        incomplete = [ln for ln in lines if ln.startswith("Error: ") and "resolved without" in ln]
        if incomplete:  # resolved, but it does not load: no network problem
            raise StorageError(f"{incomplete[-1].removeprefix('Error: ')}; see "
                               "docs/storage.md")
        why = next((ln for ln in reversed(lines) if any(
            word in ln for word in ("UNRESOLVED", "unresolved", "Error", "Exception",
                                    "not found"))), lines[-1] if lines else "no output")
        setup = "embed setup-spark" + (f" --storage {kind}" if kind != "delta" else "")
        raise StorageError(
            f"could not resolve {coordinate(kind)} ({why[:160]}; log: {log_file}): its "
            f"jars are not in Ivy's cache and {maven_repo()} cannot be reached; run "
            f"`{setup}` where it can (or set EMBED_MAVEN_REPO to a mirror), then copy "
            "~/.ivy2.5.2 here")
    return jars


def _resolve(kind: str, wanted: str) -> None:
    """The child process of :func:`ensure`: a session with ``spark.jars.packages`` =
    ``wanted`` (the parent's coordinate of ``kind``); the jars Ivy adds, less those
    pyspark (or Delta, for a connector) already has."""
    import shutil
    import tempfile

    from pyspark.sql import SparkSession

    manifest(kind).unlink(missing_ok=True)
    os.environ.pop("SPARK_REMOTE", None)  # a JVM of its own, whatever the caller runs on
    builder = (SparkSession.builder.master("local[1]").appName(f"embed-jars-{kind}")
               .config("spark.jars", "").config("spark.jars.packages", wanted)
               .config("spark.jars.ivySettings", str(ivy_settings()))
               .config("spark.ui.enabled", "false"))
    if kind == "delta":
        builder = (builder.config("spark.sql.extensions",
                                  "io.delta.sql.DeltaSparkSessionExtension")
                   .config("spark.sql.catalog.spark_catalog",
                           "org.apache.spark.sql.delta.catalog.DeltaCatalog"))
    spark = builder.getOrCreate()
    tmp = tempfile.mkdtemp(prefix="embed-jars-")
    try:
        if kind == "delta":  # the jars load: a table is written
            spark.range(1).write.format("delta").save(tmp + "/t")
        jvm: Any = spark._jvm
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
        for name in REQUIRED[kind]:
            try:
                jvm.java.lang.Class.forName(name, True, loader)
            except Exception:  # noqa: BLE001 - py4j: ClassNotFound / NoClassDefFound
                sys.exit(f"Error: {wanted} resolved without {name}: its dependencies do "
                         "not come with it from Maven (put the connector's shaded jar on "
                         "the classpath with spark.jars instead)")
        # spark-submit put what Ivy resolved into the JVM's spark.jars property (the
        # Python side's "" above keeps spark-defaults' jars out of this resolution)
        found = jvm.java.lang.System.getProperty("spark.jars") or ""
        jars = [j.removeprefix("file://").removeprefix("file:") for j in found.split(",") if j]
    finally:
        spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    taken = pyspark_artifacts()
    if kind != "delta":
        taken |= {artifact(Path(j).name) for j in resolved("delta") or []}
    keep = [j for j in jars if artifact(Path(j).name) not in taken]
    storage.write_bytes(str(manifest(kind)), ("\n".join([wanted, *keep]) + "\n").encode())


def main(argv: list[str]) -> None:
    """``--ensure KIND...``: each kind's jars in Ivy's cache (bootstrap, the test setup);
    ``--resolve KIND COORDINATE``: the child process of :func:`ensure`."""
    if len(argv) == 3 and argv[0] == "--resolve" and argv[1] in KINDS:
        _resolve(argv[1], argv[2])
        return
    kinds = argv[1:]
    if len(argv) < 2 or argv[0] != "--ensure" or not set(kinds) <= set(KINDS):
        sys.exit(f"usage: python -m pipeline.jars --ensure {{{','.join(KINDS)}}}...")
    try:
        for kind in kinds:
            ensure(kind, announce="bootstrap")
            delta_extras(kind)
    except StorageError as err:
        sys.exit(f"bootstrap: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
