"""Deployment paths: a real standalone cluster on 127.0.0.1, the real Airflow DAG
(DagBag + `airflow dags test` running spark-submit), and the GPU cluster conf."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from pipeline.config import load_config
from pipeline.demo import demo_rows
from pipeline.tables import runs as runs_table
from pipeline.tables.paths import TablePaths
from tests.conftest import ROOT, arrow_matrix, cosine_rows, demo_table, sorted_table, write_config
from tests.output import tail

BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def deploy_source(spark, tmp_path_factory):
    return demo_table(spark, tmp_path_factory.mktemp("deploy"), 80)


def _event_log(folder: Path) -> list[dict]:
    """The events of the one application logged in ``folder`` (Spark 4 writes a folder
    per application, with rolling event files in order)."""
    files = sorted(p for p in folder.rglob("events_*") if p.is_file())
    assert files, list(folder.rglob("*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _stage_profiles(events: list[dict]) -> tuple[set[int], dict[int, int], dict[int, list]]:
    """(ids of the profiles that ask tasks for GPUs, {stage id: profile id},
    {stage id: the RDD scopes it runs}) from a Spark event log."""
    gpu_profiles = {e["Resource Profile Id"] for e in events
                    if e["Event"] == "SparkListenerResourceProfileAdded"
                    and "gpu" in e.get("Task Resource Requests", {})}
    stages = {e["Stage Info"]["Stage ID"]: e["Stage Info"]["Resource Profile Id"]
              for e in events if e["Event"] == "SparkListenerStageSubmitted"}
    scopes = {e["Stage Info"]["Stage ID"]: [json.loads(r["Scope"])["name"]
                                            for r in e["Stage Info"]["RDD Info"] if "Scope" in r]
              for e in events if e["Event"] == "SparkListenerStageSubmitted"}
    return gpu_profiles, stages, scopes


@pytest.mark.cluster
def test_standalone_cluster_with_fake_gpus_matches_the_local_encoder(spark, deploy_source,
                                                                      tmp_path):
    """A real master and a worker that advertises two GPUs ("0", "1") through a discovery
    script, on this CPU machine; spark-submit with spark.gpus_per_task: 1, device: auto.
    From the event log: only stages that run the encoder (mapInArrow) carry the GPU
    profile, the rest the default one; the encode tasks were given GPUs 0 and 1, each
    task one, and encoded on the CPU, as the summary says. The vectors equal the encoder
    core's on the same texts, run here; the processes are gone after stop."""
    from pipeline.cluster import Cluster, _alive

    cluster = Cluster(tmp_path / "cluster", port=7177, webui_port=8180)
    events = tmp_path / "events"
    events.mkdir()
    pids = []
    state = ["--state-dir", str(tmp_path / "cluster")]
    try:
        # the commands docs/operations.md shows (`embed cluster start` / `stop`), with
        # this test's state dir, ports and fake GPUs
        started = subprocess.run([str(BIN / "embed"), "cluster", "start", "--workers", "1",
                                  "--cores", "2", "--memory", "3g", "--gpus", "2", *state,
                                  "--port", "7177", "--webui-port", "8180"], cwd=ROOT,
                                 env=_env(), capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-2000:]
        assert started.stdout.strip() == cluster.master_url
        pids = [int(p.read_text()) for p in (tmp_path / "cluster").glob("*.pid")]
        assert cluster.alive_workers() == 1 and len(pids) == 2
        cfg_path = write_config(tmp_path, deploy_source, str(tmp_path / "cluster_out"))
        proc = subprocess.run(
            [str(BIN / "spark-submit"), "--master", cluster.master_url,
             "--conf", "spark.executor.cores=2", "--conf", "spark.cores.max=2",
             "--conf", "spark.executor.resource.gpu.amount=2",
             "--conf", "spark.eventLog.enabled=true", "--conf", "spark.eventLog.compress=false",
             "--conf", f"spark.eventLog.dir=file://{events}",
             "jobs/embed.py", "--config", str(cfg_path), "--json",
             "--set", "spark.gpus_per_task=1", "--set", "model.device=auto"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 5000)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["rows_embedded"] == 80

        # device: cuda on workers given GPUs but without CUDA: the executors' config
        # error comes back as one line and exit 2, and nothing is written
        cuda = subprocess.run(
            [str(BIN / "spark-submit"), "--master", cluster.master_url,
             "--conf", "spark.executor.cores=2", "--conf", "spark.cores.max=2",
             "--conf", "spark.executor.resource.gpu.amount=2",
             "--conf", "spark.task.maxFailures=1",
             "jobs/embed.py", "--config", str(cfg_path), "--set", "spark.gpus_per_task=1",
             "--set", "model.device=cuda", "--set", f"sink.path={tmp_path / 'cuda_out'}"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        # (spark-submit hands the driver's stderr to stdout)
        said = [line for line in (cuda.stdout + cuda.stderr).splitlines()
                if line.startswith("error: ")]
        assert cuda.returncode == 2, tail(cuda.stdout + cuda.stderr)
        assert said == ["error: config error at 'model.device': cuda was asked for but no "
                        "CUDA device is visible (raised on an executor)"], said
        assert not (tmp_path / "cuda_out").exists()
    finally:
        stopped = subprocess.run([str(BIN / "embed"), "cluster", "stop", *state], cwd=ROOT,
                                 env=_env(), capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped ")
    assert pids and not any(_alive(pid) for pid in pids)

    assert summary["runtime"].startswith("cpu/"), summary["runtime"]
    assert summary["gpus"].startswith("0, 1 ("), summary["gpus"]
    assert "no CUDA device visible on the workers: encoded on the CPU" in summary["gpus"]
    given, tasks = summary["gpus"].split("(")[1].split(" encode")[0].split(" of ")
    assert given == tasks and int(tasks) >= 2  # every encode task was given a GPU
    gpu_profiles, stages, scopes = _stage_profiles(_event_log(events))
    on_gpus = {s for s, p in stages.items() if p in gpu_profiles}
    assert gpu_profiles and on_gpus, (gpu_profiles, stages)
    assert all("MapInArrow" in scopes[s] for s in on_gpus), {s: scopes[s] for s in on_gpus}
    others = set(stages) - on_gpus
    assert others and all(stages[s] == 0 for s in others)  # reads, plans, commits
    assert not any("MapInArrow" in scopes[s] for s in others)

    # the vectors: the encoder core's, run here on the same texts (what a local run's
    # tasks call; local Spark runs are compared with it in test_pipeline.py)
    from pipeline.encoder import Encoder
    from pipeline.preflight import preflight

    cfg = preflight(load_config(cfg_path)).cfg
    texts = {r["id"]: r["text"] for r in demo_rows(80)}
    a = sorted_table(spark, str(tmp_path / "cluster_out"))
    assert a["id"].tolist() == sorted(texts)
    local = Encoder(cfg.model, cfg.outputs).encode([texts[i] for i in a["id"]]).columns
    for col in ("emb_384", "emb_128", "emb_64"):
        assert cosine_rows(np.stack(a[col]), arrow_matrix(local[col])).min() >= 0.99999


@pytest.mark.cluster
def test_shared_nothing_cluster_lands_the_vectors_with_tables_and_model_in_the_bucket(
        s3_server, model_dir, st_reference, tmp_path):
    """A master and two workers on 127.0.0.1, each worker a node of its own (HOME, work,
    temp and scratch folders); the tables and the model only in the S3 server; `embed run`
    started from a third folder with a HOME of its own. Every worker copies the model from
    the bucket into its own cache; the vectors are sentence-transformers' (the suite's
    in-process runs check local tables against it: test_pipeline.py)."""
    from pipeline.cluster import Cluster
    from pipeline.demo import write_demo_delta

    bucket = s3_server.bucket("nodes")
    model = s3_server.upload_folder(model_dir, f"{bucket}/models/minilm")
    rows = 60
    write_demo_delta(f"{bucket}/docstrings", limit=rows)
    cluster = Cluster(tmp_path / "cluster", port=_free_port(), webui_port=_free_port())
    driver = tmp_path / "driver"
    (driver / "home").mkdir(parents=True)
    (driver / "run.yaml").write_text(
        "source: {path: s3://nodes/docstrings}\n"
        f"model: {{name_or_path: '{model}', parity_check: false}}\n"
        "outputs: [{name: emb, dim: 384}]\n"
        "sink: {path: s3://nodes/out}\n"
        f"spark: {{master: '{cluster.master_url}', partitions: 4,\n"
        "        conf: {spark.executor.memory: 1g, spark.cores.max: 2}}\n"
        "drift: {canary: {enabled: false}, distribution: {enabled: false}}\n")
    try:
        cluster.start(workers=2, cores=1, memory="2g", isolated=True)
        ran = subprocess.run([str(BIN / "embed"), "run", "--config", "run.yaml", "--json",
                              "--no-progress"], cwd=driver, env=_env(HOME=str(driver / "home")),
                             capture_output=True, text=True, timeout=900)
    finally:
        cluster.stop()
    assert ran.returncode == 0, tail(ran.stdout + ran.stderr)
    assert json.loads(ran.stdout.strip().splitlines()[-1])["rows_embedded"] == rows
    from pipeline import deltars

    table = deltars.dataset("s3://nodes/out").to_table(columns=["id", "emb"])
    order = np.argsort(table.column("id").to_numpy())
    got = np.stack(table.column("emb").to_numpy(zero_copy_only=False))[order]
    assert cosine_rows(got, st_reference[:rows]).min() >= 0.9999
    identity = deltars.open_table("s3://nodes/out").metadata().configuration
    assert identity["embed.model_path"] == "s3a://nodes/models/minilm"  # found again by search
    # the model was copied once per node, into that node's own cache
    for node in ("worker-0", "worker-1"):
        copies = list((tmp_path / "cluster" / node / "home").glob(
            ".cache/embed-pipeline/models/minilm-*/model.safetensors"))
        assert len(copies) == 1, node
    assert list((driver / "home").glob(".cache/embed-pipeline/models/minilm-*"))
    assert not list(tmp_path.rglob("_delta_log"))  # no table on any local disk


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def airflow_services(env: dict, logs: Path):
    """A real scheduler (LocalExecutor) and the api-server that its task processes
    report to (Airflow 3's execution API), as `airflow standalone` runs them; DAGs come
    from `dags reserialize`. The scheduler makes no runs of its own (use_job_schedule off):
    only the backfills that the test creates run."""
    procs = []
    try:
        for name in ("api-server", "scheduler"):
            out = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
            procs.append((subprocess.Popen([str(BIN / "airflow"), name], cwd=ROOT, env=env,
                                           stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True), out))
            if name == "api-server":  # tasks the scheduler starts report to it at once
                _wait_for_port(int(env["AIRFLOW__API__PORT"]), logs / f"{name}.log")
        yield
    finally:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, out in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.close()


def _wait_for_port(port: int, log: Path, timeout: float = 180) -> None:
    """Until something listens on 127.0.0.1:``port``: a task that starts before the API
    server does retries its first calls, and one whose retry lands twice is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port}: {log.read_text()[-2000:]}")


def _wait_for_backfill(db: Path, backfill_id: int, logs: Path, timeout: float = 900) -> dict:
    """{logical date: state} of a backfill's DAG runs (or why one was not created), once
    each has finished (read from Airflow's own database). Not the backfill's
    completed_at: the scheduler marks backfills complete on a fixed 30 s timer, up to
    30 s after their last run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(db)) as con:
            rows = con.execute(
                "SELECT substr(b.logical_date, 1, 10), coalesce(r.state, b.exception_reason) "
                "FROM backfill_dag_run b "
                "LEFT JOIN dag_run r ON b.dag_run_id = r.id WHERE b.backfill_id = ?",
                (backfill_id,)).fetchall()
        if rows and all(state not in (None, "queued", "running") for _, state in rows):
            return dict(rows)
        time.sleep(1)
    tails = {p.name: p.read_text()[-2000:] for p in logs.glob("*.log")}
    raise AssertionError(f"backfill {backfill_id} did not complete: {tails}")


def test_airflow_dag_runs_dates_as_partitions_and_refuses_dates_before_start(
        spark, deploy_source, tmp_path):
    """The real DAG: `airflow dags test` for a date before EMBED_START_DATE fails naming
    both dates and writes nothing; `airflow backfill create` of a date, run by a
    real scheduler, embeds exactly that partition, once; the date again
    succeeds as a recorded skip; a breach with on_breach: fail fails the run, untried
    again."""
    airflow_home = tmp_path / "airflow"
    out = str(tmp_path / "dag_out")
    cfg_path = write_config(tmp_path, deploy_source, out, drift=True,
                            extra="source: {partition_column: day}")
    api_port = _free_port()
    env = _env(
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "airflow_dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__API__PORT=str(api_port), AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET="embed-pipeline-test",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "local[2]"}',
        EMBED_CONFIG=str(cfg_path), EMBED_START_DATE="2024-01-01",
    )

    def airflow(*args, timeout=600, ok=True):
        proc = subprocess.run([str(BIN / "airflow"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert (proc.returncode == 0) == ok, (args, tail(proc.stdout), tail(proc.stderr))
        return proc.stdout + proc.stderr

    # DagBag: imports cleanly, with the expected task graph
    probe = subprocess.run([sys.executable, "-c", (
        "import json; from airflow.models.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'airflow_dags')!r})\n"
        "dag = bag.dags['embed_pipeline']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        " 'edges': sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),"
        " 'start': str(dag.start_date.date()), 'retries': dag.default_args['retries']}))")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    graph = json.loads(probe.stdout.strip().splitlines()[-1])
    assert graph["errors"] == {}
    assert graph["edges"] == [["check", "drift"], ["check", "publish"], ["drift", "publish"],
                              ["embed", "check"], ["publish", "maintain"],
                              ["validate", "check"], ["validate", "drift"],
                              ["validate", "embed"], ["validate", "maintain"],
                              ["validate", "publish"]]
    assert (graph["start"], graph["retries"]) == ("2024-01-01", 2)

    airflow("db", "migrate")
    airflow("dags", "reserialize")
    early = airflow("dags", "test", "embed_pipeline", "2023-12-31", ok=False)
    assert ("logical date 2023-12-31 is before the DAG's start_date 2024-01-01"
            in early), early[-3000:]
    assert not Path(out).exists()

    days = ["2024-01-02"]  # one DAG run of the scheduler's (each starts a JVM); the
    # breach run below embeds a second date (a date with no rows: test_dag_tasks.py)
    db = airflow_home / "airflow.db"
    # The backfill is created while no scheduler runs: Airflow's SQLite database takes
    # one writer at a time ("database is locked" otherwise); production runs Postgres.
    airflow("dags", "unpause", "embed_pipeline")  # a paused DAG's backfill stays queued
    airflow("backfill", "create", "--dag-id", "embed_pipeline", "--from-date", days[0],
            "--to-date", days[-1], "--max-active-runs", "1")
    with airflow_services(env, tmp_path):
        assert _wait_for_backfill(db, 1, tmp_path) == dict.fromkeys(days, "success")
    ids = spark.read.format("delta").load(out).select("id").toPandas()["id"]
    assert len(ids) == 8 and ids.is_unique
    assert (ids % 10 == 1).all()  # demo day = id % 10
    version = DeltaTable(out).version()

    # a committed date again (an Airflow retry, a re-run): the DAG succeeds with a
    # recorded skip and commits nothing (`dags test`: no scheduler start for it)
    again = airflow("dags", "test", "embed_pipeline", days[0])
    assert f"partition {days[0]} was already committed by run" in again, again[-3000:]
    assert DeltaTable(out).version() == version  # no commit

    # the config's drift policy decides: on_breach: fail, thresholds any run trips -> the
    # embed task exits 9, is not retried (one try), and the DAG run fails
    breach = tmp_path / "breach"
    breach.mkdir()
    breach_cfg = write_config(breach, deploy_source, out, drift=True, extra=(
        "source: {partition_column: day}\n"
        "drift: {distribution: {max_centroid_distance: 0.0, mmd_alpha: 1.0, on_breach: fail}}"))
    failed = airflow("dags", "test", "embed_pipeline", "2024-01-05", "-c",
                     json.dumps({"config": str(breach_cfg)}), ok=False)
    assert "not transient, so not retried" in failed, failed[-3000:]
    with contextlib.closing(sqlite3.connect(db)) as conn:  # `dags test`: the last run
        run_id, dag_state = conn.execute(
            "SELECT run_id, state FROM dag_run ORDER BY id DESC LIMIT 1").fetchone()
        tries = dict(conn.execute(
            "SELECT task_id, state || ':' || try_number FROM task_instance "
            "WHERE run_id = ?", (run_id,)).fetchall())
    assert tries.get("embed") == "failed:1", (tries, failed[-3000:])
    assert tries.get("publish") != "success:1" and dag_state == "failed", (tries, dag_state)

    runs = runs_table.latest(TablePaths.beside(out).runs, spark=spark, limit=10, output_path=out)
    assert list(runs["status"]) == ["succeeded", "skipped", "succeeded"]
    assert runs["drift_status"][0] == "breach"  # its rows are committed, recorded as such
    assert list(runs["rows_embedded"].fillna(0)) == [8, 0, 8]
    assert list(runs["partition"]) == ["2024-01-05", days[0], days[0]]
    assert spark.read.format("delta").load(out).count() == 16  # two dates, each once


def test_gpu_conf_parses_and_cuda_without_gpus_fails_clearly(deploy_source, tmp_path):
    conf = {}
    for line in (ROOT / "conf" / "spark-defaults.gpu.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split(None, 1)
            conf[key] = value.strip()
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert conf["spark.task.resource.gpu.amount"] == "1"
    script = ROOT / conf["spark.executor.resource.gpu.discoveryScript"]
    found = json.loads(subprocess.run([str(script)], capture_output=True, text=True,
                                      check=True).stdout)
    assert found["name"] == "gpu" and isinstance(found["addresses"], list)

    # the CLI in-process: the refusal comes before any Spark job (a subprocess would add
    # only an interpreter start; test_entrypoints.py runs `embed` as a process)
    import torch
    from click.testing import CliRunner

    from pipeline.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cfg_path = write_config(tmp_path, deploy_source, str(tmp_path / "out"))
    proc = CliRunner().invoke(main, ["run", "--config", str(cfg_path), "--set",
                                     "model.device=cuda", "--set", "spark.gpus_per_task=1"])
    assert proc.exit_code == 2, proc.output[-2000:]
    assert "model.device" in proc.stderr and "no CUDA device" in proc.stderr
    assert "Traceback" not in proc.output
    assert not (tmp_path / "out").exists()
