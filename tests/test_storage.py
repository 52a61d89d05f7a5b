"""Object storage: every location is a URI with one owner (pipeline.storage), and S3
tables work end to end on a real S3 API server (moto's, a subprocess: tests/s3.py).

The in-process tests share the suite's one Spark session (it carries the S3A connector
on its driver classpath); the command-line tests start the real ``embed`` processes a
user would, with the AWS variables in their environment and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import SparkConfig, parse_config
from pipeline.errors import ConfigError, StorageError
from tests.conftest import ROOT
from tests.output import tail
from tests.s3 import ACCESS_KEY, environment

BIN = ROOT / ".venv" / "bin"


# --------------------------------------------------------------------------- locations


def test_locations_are_uris_in_one_spelling(tmp_path):
    assert storage.normalize("s3://b/k/") == storage.normalize("s3n://b/k") == "s3a://b/k"
    assert storage.normalize("file:///tmp/x") == storage.normalize("file:/tmp/x") == "/tmp/x"
    assert storage.normalize("rel/t", tmp_path) == str(tmp_path / "rel" / "t")
    assert storage.normalize("gs://b/t") == "gs://b/t"
    assert storage.parent("s3a://b/lake/out") == "s3a://b/lake"
    assert storage.parent("s3a://b") == "s3a://b"  # a bucket is its own top
    assert storage.join("s3a://b/lake", "_embedding_runs") == "s3a://b/lake/_embedding_runs"
    assert storage.kinds(["s3a://b/x", "/tmp/y", "abfss://c@a.dfs.core.windows.net/p",
                          "gs://g/x"]) == {"s3", "azure", "gcs"}
    assert not storage.is_local("s3a://b/x") and storage.is_local("/tmp/x")

    from pipeline.tables.paths import TablePaths

    paths = TablePaths.beside("s3a://b/lake/out")
    assert paths.runs == "s3a://b/lake/_embedding_runs"
    assert paths.samples == "s3a://b/lake/_embedding_samples/out"
    assert paths.quarantine == "s3a://b/lake/out_quarantine"

    # a config means the same from any working directory: URIs stay URIs, s3:// is s3a://
    cfg = parse_config({"source": {"path": "s3://b/src"}, "sink": {"path": "../out"},
                        "model": {"name_or_path": "s3://b/models/m", "onnx_cache": "gs://g/o"},
                        "outputs": [{"name": "e", "dim": 8}]}, base_dir=tmp_path)
    assert (cfg.source.path, cfg.model.name_or_path, cfg.model.onnx_cache) == (
        "s3a://b/src", "s3a://b/models/m", "gs://g/o")
    assert cfg.sink.path == str(tmp_path.parent / "out")
    # a file:// sink keeps its bookkeeping beside it, not under the working directory
    local = parse_config({"source": {"path": "/tmp/src"}, "sink": {"path": "file:///tmp/l/out"},
                          "outputs": [{"name": "e", "dim": 8}]})
    assert TablePaths.of(local).runs == "/tmp/l/_embedding_runs"


def test_openlineage_names_tables_as_the_naming_spec_does():
    from pipeline.lineage import dataset_name

    assert dataset_name("s3a://bucket/lake/out") == ("s3://bucket", "lake/out")
    assert dataset_name("gs://bucket/t") == ("gs://bucket", "t")
    assert dataset_name("hdfs://nn:8020/a/b") == ("hdfs://nn:8020", "/a/b")
    assert dataset_name("/tmp/x") == ("file", "/tmp/x")


# --------------------------------------------------------------------------- settings


def test_every_client_gets_its_settings_from_one_source():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_SECRET_ACCESS_KEY": "planted-secret-value"}
    settings = storage.StorageSettings.of(env=env)
    assert settings == storage.StorageSettings("http://127.0.0.1:9000", "eu-west-1", True)
    hadoop = settings.hadoop_conf()
    assert hadoop["fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert hadoop["fs.s3a.path.style.access"] == "true"
    assert hadoop["fs.s3a.connection.ssl.enabled"] == "false"  # http: no TLS
    assert "DefaultCredentialsProvider" in hadoop["fs.s3a.aws.credentials.provider"]
    delta = settings.delta_options("s3a://b/t")
    assert delta["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert delta["AWS_ALLOW_HTTP"] == "true" and delta["AWS_CONDITIONAL_PUT"] == "etag"
    assert settings.delta_options("/tmp/t") == {}
    # no client is handed a secret: each reads the environment's chain itself
    assert "planted-secret-value" not in json.dumps([hadoop, delta])
    # the config's storage: section wins over the environment; AWS_ENDPOINT_URL_S3 over
    # AWS_ENDPOINT_URL
    section = storage.StorageConfig(endpoint="https://s3.example", path_style=False)
    chosen = storage.StorageSettings.of(section, {**env, "AWS_ENDPOINT_URL_S3": "http://x"})
    assert (chosen.endpoint, chosen.region, chosen.path_style) == (
        "https://s3.example", "eu-west-1", False)
    assert storage.StorageSettings.of(env={"AWS_ENDPOINT_URL": "http://a",
                                           "AWS_ENDPOINT_URL_S3": "http://b"}).endpoint \
        == "http://b"


def test_a_secret_in_the_config_is_refused_or_never_stored(tmp_path):
    raw = {"source": {"path": "s3://b/src", "options": {"api_token": "planted-1"}},
           "sink": {"path": "s3://b/out"}, "outputs": [{"name": "e", "dim": 8}],
           "spark": {"conf": {"spark.hadoop.fs.s3a.secret.key": "planted-2",
                              "spark.sql.shuffle.partitions": 4}}}
    for key in ("secret_access_key", "aws_session_token", "password"):
        with pytest.raises(ConfigError) as err:
            parse_config({**raw, "storage": {key: "x"}})
        assert f"storage.{key}" in str(err.value) and "environment" in str(err.value)
        assert "\n" not in str(err.value)
    cfg = parse_config(raw)
    stored = json.dumps(cfg.to_dict())
    assert "planted-1" not in stored and "planted-2" not in stored
    assert cfg.to_dict()["spark"]["conf"]["spark.sql.shuffle.partitions"] == 4
    # the hash a runs table keeps does not move with a rotated secret
    rotated = parse_config({**raw, "spark": {"conf": {
        "spark.hadoop.fs.s3a.secret.key": "rotated", "spark.sql.shuffle.partitions": 4}}})
    assert rotated.config_hash() == cfg.config_hash()
    # the runs table row is made from it
    from pipeline.lineage import RunMeta, RunRecorder

    recorder = RunRecorder(None, cfg, RunMeta("r", __import__("datetime").datetime.now(),
                                              None, "fp"))
    assert "planted" not in json.dumps(recorder.base, default=str)


def test_connector_jars_leave_out_what_pyspark_ships():
    from pipeline import jars

    pyspark_own = jars.pyspark_artifacts()
    assert {"hadoop-client-api", "parquet-hadoop", "jackson-databind"} <= pyspark_own
    delta, s3 = jars.resolved("delta"), jars.resolved("s3")
    assert delta and s3, "scripts/test.sh resolves both (python -m pipeline.jars --ensure s3)"
    names = {jars.artifact(Path(j).name) for j in delta + s3}
    assert not names & pyspark_own, names & pyspark_own
    assert {"delta-spark_4.2_2.13", "hadoop-aws", "bundle", "analyticsaccelerator-s3"} <= names
    assert jars.coordinate("s3") == f"org.apache.hadoop:hadoop-aws:{jars.hadoop_version()}"
    # spark-defaults (embed setup-spark --storage s3): the connector, shipped to every
    # executor, and the log store that makes Delta's S3 commits conditional PUTs
    from pipeline.spark import base_conf

    conf = base_conf(storages=["s3"])
    assert all(j in conf["spark.jars"] for j in s3)
    assert conf["spark.delta.logStore.s3a.impl"] == jars.LOGSTORE_CLASS
    assert jars.logstore_jar().is_file()


# --------------------------------------------------------------------------- S3, in-process


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.bucket("lake")


@pytest.fixture(scope="module")
def s3_model(s3_server, bucket, model_dir) -> str:
    """all-MiniLM-L6-v2's directory, in the bucket only."""
    return s3_server.upload_folder(model_dir, f"{bucket}/models/all-MiniLM-L6-v2")


def test_commits_from_many_writers_are_conditional_puts_and_none_is_lost(
        spark, s3_server, bucket):
    """Threads of one driver commit at once with no lock between them: the log store's
    conditional PUT is all that keeps two from writing one version."""
    from pipeline import deltars
    from pipeline.spark import check_conditional_writes

    table = "s3a://lake/threads/t"
    check_conditional_writes(spark, table)  # moto honours If-None-Match: no refusal
    spark.range(1).selectExpr("'seed' as id").write.format("delta").save(table)
    errors: list[str] = []

    def append(name: str) -> None:
        for i in range(5):
            try:
                spark.range(1).selectExpr(f"'{name}-{i}' as id").write.format("delta") \
                    .mode("append").save(table)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(str(exc).splitlines()[0])

    threads = [threading.Thread(target=append, args=(f"t{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = deltars.dataset(table).to_table().column("id").to_pylist()
    assert not errors, errors[:3]
    assert sorted(ids) == sorted(["seed", *(f"t{n}-{i}" for n in range(3) for i in range(5))])
    assert deltars.open_table(table).version() == 15


def test_an_adopted_session_gets_the_hadoop_keys_or_refuses_clearly(spark):
    from pipeline.spark import adopt

    adopt(spark, SparkConfig(conf={"spark.hadoop.fs.s3a.readahead.range": "123K"}), ["s3"])
    assert spark.sparkContext._jsc.hadoopConfiguration().get("fs.s3a.readahead.range") == "123K"
    with pytest.raises(StorageError) as err:
        adopt(spark, SparkConfig(), ["azure"])
    assert "embed setup-spark --storage azure" in str(err.value)
    assert "\n" not in str(err.value)


_COPY = """
import sys
sys.path.insert(0, {root!r})
from pipeline import storage
print(storage.local_copy(sys.argv[1]))
"""


def _model_gets(s3_server, since: int) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", s3_server.log.read_text(errors="replace"))
    return [ln for ln in plain.splitlines()[since:] if '"GET /lake/models/' in ln]


def _copies(cache: Path, model: str, workers: int) -> list[str]:
    env = {**os.environ, "EMBED_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _COPY.format(root=str(ROOT)), model],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(workers)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [out.strip() for out, _ in outs]


def test_a_model_in_the_bucket_is_copied_once_per_node(s3_server, s3_model, tmp_path):
    """Three workers of one node at once: one copies (under the lock, into a temp folder
    renamed into place), the others wait for it; the store serves the bytes of one copy
    (as many range reads as one worker alone makes)."""
    mark = len(s3_server.log.read_text(errors="replace").splitlines())
    alone = _copies(tmp_path / "node-a", s3_model, 1)
    one_copy = len(_model_gets(s3_server, mark))
    mark = len(s3_server.log.read_text(errors="replace").splitlines())
    found = _copies(tmp_path / "node-b", s3_model, 3)
    assert len(set(found)) == 1 and Path(found[0]).name == Path(alone[0]).name
    copy = Path(found[0])
    assert (copy / "model.safetensors").is_file() and not list(copy.parent.glob(".*.tmp"))
    assert len(_model_gets(s3_server, mark)) == one_copy > 0
    # a second worker later finds it: not one request for the model's bytes
    mark = len(s3_server.log.read_text(errors="replace").splitlines())
    _copies(tmp_path / "node-b", s3_model, 1)
    assert not _model_gets(s3_server, mark)


# --------------------------------------------------------------------------- S3, commands

PLANTED = ("planted-env-secret-5d1f", "planted-conf-secret-9a2c", "planted-option-secret-77e0")


def _embed(args: list[str], cwd: Path, env: dict[str, str],
           timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "embed"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _objects_named(s3_server, prefix: str) -> list[str]:
    client = s3_server.client()
    found = client.list_objects_v2(Bucket="lake", Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in found]


@pytest.mark.slow
def test_s3_end_to_end_kill9_spark_submit_dag_tasks_every_command_and_no_secret(
        spark, s3_server, bucket, s3_model, tmp_path):
    """A config that names only s3:// URIs, credentials only in the environment (and
    planted secrets in spark.conf and source.options), as a scheduler would run it:
    `embed run` killed -9 mid-run; spark-submit (the DAG's embed task) refused in one line
    without the S3 setup, then re-run with it (what `embed setup-spark --storage s3` puts
    in spark-defaults.conf): every id exactly once; the DAG's Python tasks; a no-op
    re-run from the logs; every table command. No secret in any object written, file
    written or line printed."""
    from pipeline import dag_tasks, deltars
    from pipeline.spark import base_conf

    env = {**os.environ, **environment(s3_server.endpoint, secret=PLANTED[0]),
           "PYSPARK_PYTHON": sys.executable, "EMBED_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    rows = 100
    out = _embed(["demo-data", "--out", "s3://lake/cli/docstrings", "--limit", str(rows)],
                 work, env)
    printed = [out.stdout + out.stderr]
    assert out.returncode == 0, out.stderr
    config = work / "s3.yaml"
    config.write_text(f"""
source: {{path: s3://lake/cli/docstrings, partition_column: day,
         options: {{api_token: {PLANTED[2]}}}}}
model: {{name_or_path: '{s3_model}', parity_check: false}}
outputs: [{{name: emb_384, dim: 384}}, {{name: emb_64, dim: 64, dtype: int8}}]
sink: {{path: s3://lake/cli/out}}
spark: {{master: 'local[2]', conf: {{spark.hadoop.fs.s3a.access.key: {ACCESS_KEY},
        spark.hadoop.fs.s3a.secret.key: {PLANTED[1]}}}}}
lineage: {{transport: file, path: lineage.jsonl}}
drift: {{canary: {{enabled: true}}, distribution: {{enabled: false}}}}
""")
    killed = subprocess.Popen([str(BIN / "embed"), "run", "--config", "s3.yaml",
                               "--no-progress"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _objects_named(s3_server, "cli/out/_delta_log/0"):
        time.sleep(0.3)
    os.killpg(killed.pid, signal.SIGKILL)
    printed.append(killed.communicate(timeout=60)[0])
    assert time.time() < deadline, tail(printed[-1])

    submit = [str(BIN / "spark-submit"), "--master", "local[2]"]
    job = [str(ROOT / "jobs" / "embed.py"), "--config", str(config)]
    bare = subprocess.run([*submit, *job], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    said = bare.stdout + bare.stderr  # (spark-submit hands the driver's stderr to stdout)
    printed.append(said)
    assert bare.returncode == 2, tail(said)
    error = [ln for ln in said.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "embed setup-spark --storage s3" in error[0], tail(said)
    assert "Traceback" not in said
    confs = [arg for key, value in base_conf(storages=["s3"]).items()
             for arg in ("--conf", f"{key}={value}")]
    done = subprocess.run([*submit, *confs, *job], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    printed.append(done.stdout + done.stderr)
    assert done.returncode == 0, tail(printed[-1])
    ids = deltars.dataset("s3://lake/cli/out").to_table(columns=["id"]).column("id")
    assert sorted(ids.to_pylist()) == list(range(rows))  # every id exactly once

    # the DAG's Python tasks (the embed task was the spark-submit above)
    validated = dag_tasks.validate_config(str(config), "2026-06-07")
    checked = dag_tasks.check_run(str(config), "")
    assert checked["rows_embedded"] + checked["rows_skipped"] == rows
    drifted = dag_tasks.check_drift(str(config), checked["run_id"])
    assert drifted["canary"] in ("baseline", "same_runtime", "runtime_changed"), drifted
    assert "into s3a://lake/cli/out" in dag_tasks.summary_line(validated, checked, drifted)

    started = time.perf_counter()
    noop = _embed(["run", "--config", "s3.yaml", "--json", "--no-progress"], work, env)
    noop_seconds = time.perf_counter() - started
    printed.append(noop.stdout + noop.stderr)
    assert noop.returncode == 0 and json.loads(noop.stdout.splitlines()[-1])["rows_read"] == 0
    assert noop_seconds < 15, noop_seconds  # no JVM: the Delta logs say nothing changed

    commands = [
        ["runs", "--table", "s3://lake/cli/out"],
        ["drift", "--table", "s3://lake/cli/out"],
        ["search", "--table", "s3://lake/cli/out", "--column", "emb_64", "--k", "3",
         "--hybrid", "s3://lake/cli/out:emb_384", "read a zip file"],
        ["sizes", "--config", "s3.yaml", "--rows", "1000"],
        ["validate", "--config", "s3.yaml"],
        ["backfill", "--config", "s3.yaml", "--from", "2024-01-01", "--to", "2024-01-02",
         "--dry-run"],
        ["maintain", "--table", "s3://lake/cli/out", "--optimize", "--vacuum", "168"],
    ]
    for args in commands:
        ran = _embed(args, work, env)
        printed.append(ran.stdout + ran.stderr)
        assert ran.returncode == 0, (args, tail(ran.stderr))
    assert "succeeded" in printed[-7] and "running" in printed[-7]  # runs: the killed one
    assert list((work / "_drift_reports").glob("*.html"))  # a remote table's report: here
    assert "compacted into" in printed[-1]
    maintained = dag_tasks.maintain_table(str(config), "2026-06-07", "daily", spark=spark)
    assert maintained["maintained"]

    written = [p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != "s3.yaml"]
    stored = list(s3_server.objects("lake").values())
    for secret in PLANTED:
        assert not [t for t in printed if secret in t], secret
        assert not [b for b in written + stored if secret.encode() in b], secret


def test_a_connector_that_cannot_be_resolved_is_one_line_that_says_what_to_do(monkeypatch):
    """No network and no cache (a Maven repository that refuses connections, a version of
    the connector no cache has): one line, exit 2, naming the coordinate and the way out."""
    from pipeline import jars

    monkeypatch.setenv("EMBED_MAVEN_REPO", "http://127.0.0.1:9/maven2/")
    monkeypatch.setattr(jars, "coordinate", lambda kind: "org.apache.hadoop:hadoop-azure:0.0.0")
    with pytest.raises(StorageError) as err:
        jars.ensure("azure")
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert jars.coordinate("azure") in message and "embed setup-spark --storage azure" in message
    monkeypatch.delenv("EMBED_MAVEN_REPO")
    jars.ivy_settings()  # Maven Central again, for whatever resolves next
