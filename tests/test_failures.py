"""Exactly-once under kill -9, backfills, concurrent runs; counts from the runs table.

Real subprocesses, real signals (SIGKILL to the whole process group: driver,
JVM and Python workers), real Delta tables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.errors import ConcurrentRunError
from pipeline.run import run
from pipeline.tables import runs as runs_table
from pipeline.tables.paths import TablePaths
from tests.conftest import ROOT, cosine_rows, write_config

BIN = Path(sys.executable).parent


def _spawn(args) -> subprocess.Popen:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _commits(table: Path) -> list[str]:
    log = table / "_delta_log"
    return sorted(p.read_text() for p in log.glob("*.json")) if log.is_dir() else []


def _wait_for(predicate, timeout=300, poll=0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _content(spark, path: str) -> pd.DataFrame:
    pdf = spark.read.format("delta").load(path).select("id", "content_hash", "emb").toPandas()
    return pdf.sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def kill_source(spark, tmp_path_factory):
    from pipeline.demo import write_demo_table

    path = tmp_path_factory.mktemp("kill") / "src"
    write_demo_table(spark, str(path), limit=400)
    return str(path)


def test_kill_minus_9_then_rerun_equals_an_uninterrupted_run(spark, kill_source, tmp_path):
    out = tmp_path / "out"
    cfg_path = write_config(tmp_path, kill_source, str(out), outputs="[{name: emb, dim: 64}]")
    reference = run(load_config(cfg_path, [f"sink.path={tmp_path / 'ref'}"]), spark=spark)
    cmd = [str(BIN / "embed"), "run", "--config", str(cfg_path), "--no-progress"]

    # 1: as soon as the output table exists (the encode + commit job is starting)
    proc = _spawn(cmd)
    assert _wait_for(lambda: len(_commits(out)) >= 1), proc.communicate()[0][-3000:]
    _kill_group(proc)
    # 2: a few seconds after the run recorded itself: reading, encoding or committing
    runs_log = tmp_path / "_embedding_runs"
    before = len(_commits(runs_log))
    proc = _spawn(cmd)
    assert _wait_for(lambda: len(_commits(runs_log)) > before), proc.communicate()[0][-3000:]
    time.sleep(4)
    _kill_group(proc)
    rows = spark.read.format("delta").load(str(out)).count()
    assert rows in (0, 400), rows  # a commit is all or nothing

    final = run(load_config(cfg_path), spark=spark)
    assert final.rows_embedded + final.rows_skipped == 400
    got, want = _content(spark, str(out)), _content(spark, str(tmp_path / "ref"))
    assert len(got) == 400 and got["id"].is_unique
    assert got["id"].tolist() == want["id"].tolist()
    assert got["content_hash"].tolist() == want["content_hash"].tolist()
    assert cosine_rows(np.stack(got["emb"]), np.stack(want["emb"])).min() >= 0.99999
    assert reference.rows_embedded == 400

    # the killed runs stay 'running' (no end time); the last one succeeded
    runs = runs_table.latest(TablePaths.beside(str(out)).runs, spark=spark, limit=10,
                               output_path=str(out))
    assert sorted(runs["status"]) == ["running", "running", "succeeded"]


def test_backfill_killed_after_two_partitions_resumes_exactly(spark, tmp_path, demo_rows):
    src, out = str(tmp_path / "src"), tmp_path / "out"
    days = [f"2024-01-0{d}" for d in range(1, 5)]
    pdf = pd.DataFrame(demo_rows[:120])[["id", "text"]]
    pdf["day"] = [days[i % 4] for i in range(len(pdf))]
    spark.createDataFrame(pdf).write.format("delta").save(src)
    cfg_path = write_config(tmp_path, src, str(out), outputs="[{name: emb, dim: 64}]")
    cmd = [str(BIN / "embed"), "backfill", "--config", str(cfg_path),
           "--set", "source.partition_column=day", "--from", "2024-01-01", "--to", "2024-01-04"]

    def txn_commits():
        return sum('"txn"' in c for c in _commits(out))

    proc = _spawn(cmd)
    assert _wait_for(lambda: txn_commits() >= 2), proc.communicate()[0][-3000:]
    _kill_group(proc)
    done_before = txn_commits()
    # a kill lands between commits; on a very fast machine all 4 may already be done
    assert 2 <= done_before <= 4

    # the re-run in-process (the CLI as typed, in this session: what it resumes from
    # is on disk, not in the killed process; no second JVM start for it)
    from click.testing import CliRunner

    from pipeline.cli import main

    second = CliRunner().invoke(main, cmd[1:])
    assert second.exit_code == 0, second.output[-3000:]
    assert f"{4 - done_before} to do" in second.output
    assert txn_commits() == 4
    table = spark.read.format("delta").load(str(out))
    assert table.count() == 120 and table.select("id").distinct().count() == 120

    # a third pass finds every partition committed (in-process: the plan the CLI
    # prints its "N to do" from; no third JVM start)
    from pipeline import backfill
    from pipeline.encoder.model import fingerprint, inspect_model

    cfg = load_config(cfg_path, ["source.partition_column=day"])
    plans = backfill.plan(spark, cfg, fingerprint(inspect_model(cfg.model.name_or_path)),
                          "2024-01-01", "2024-01-04")
    assert [p.value for p in plans] == days and all(p.committed for p in plans)
    assert backfill.run_backfill(spark, cfg, plans) == []
    assert txn_commits() == 4

    # every partition's run is recorded; a run killed between its commit and its
    # final record stays 'running' (which is what happened), the rest succeeded
    runs = runs_table.latest(TablePaths.beside(str(out)).runs, spark=spark, limit=50,
                               output_path=str(out))
    assert set(runs["partition"]) == set(days)
    ok = runs[runs.status == "succeeded"]
    assert len(ok) >= 4 - done_before and ok["rows_embedded"].sum() <= 120


def test_backfill_dry_run_and_parallel_partitions(spark, tmp_path, demo_rows):
    from pipeline import backfill
    from pipeline.encoder.model import fingerprint, inspect_model

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    pdf = pd.DataFrame(demo_rows[:60])[["id", "text"]]
    pdf["month"] = ["2024-0" + str(1 + i % 4) for i in range(60)]
    spark.createDataFrame(pdf).write.format("delta").save(src)
    cfg = load_config(write_config(tmp_path, src, out, outputs="[{name: emb, dim: 32}]",
                                   drift=True), ["source.partition_column=month"])
    fp = fingerprint(inspect_model(cfg.model.name_or_path))
    plans = backfill.plan(spark, cfg, fp, "2024-02", "2024-04")
    assert [(p.value, p.rows, p.committed) for p in plans] == [
        ("2024-02", 15, False), ("2024-03", 15, False), ("2024-04", 15, False)]
    # --dry-run's plan, read with delta-rs (no JVM), is Spark's
    assert backfill.plan_without_spark(cfg, fp, "2024-02", "2024-04") == plans
    results = backfill.run_backfill(spark, cfg, plans, parallelism=3)
    assert sorted(r.rows_embedded for r in results) == [15, 15, 15]
    # the canary runs once per backfill (first partition), distribution drift per partition
    assert [r.canary.verdict if r.canary else None for r in results] == [
        "baseline", None, None]
    assert results[0].drift_status == "no_reference"
    # partitions after the first (table existing) are still blind appends: no conflicts
    writes = spark.sql(f"DESCRIBE HISTORY delta.`{out}`").filter("operation = 'WRITE'").collect()
    assert len(writes) == 3 and all(w["isBlindAppend"] for w in writes)
    done = backfill.plan(spark, cfg, fp, "2024-02", "2024-04")
    assert all(p.committed for p in done)
    assert backfill.plan_without_spark(cfg, fp, "2024-01", "2024-04") == [
        backfill.plan(spark, cfg, fp, "2024-01", "2024-01")[0], *done]
    assert spark.read.format("delta").load(out).count() == 45


def test_incremental_counts_come_from_the_runs_table(spark, tmp_path, demo_rows):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    base = pd.DataFrame(demo_rows[:100])[["id", "text"]]
    spark.createDataFrame(base).write.format("delta").save(src)
    cfg = load_config(write_config(tmp_path, src, out, outputs="[{name: emb, dim: 32}]"),
                      ["sink.deletes=delete"])
    run(cfg, spark=spark)
    changed = base.copy()
    changed.loc[changed.id < 10, "text"] = "rewritten " + changed.loc[changed.id < 10, "text"]
    changed = changed[changed.id != 99]  # one row deleted at the source
    added = pd.DataFrame({"id": range(1000, 1010), "text": [f"new doc {i}" for i in range(10)]})
    spark.createDataFrame(pd.concat([changed, added])).write.format("delta") \
        .mode("overwrite").save(src)
    second = run(cfg, spark=spark)
    runs = runs_table.latest(TablePaths.beside(out).runs, spark=spark, limit=5, output_path=out)
    rec = runs[runs.run_id == second.run_id].iloc[0]
    assert rec.status == "succeeded"
    assert (rec.rows_read, rec.rows_embedded, rec.rows_skipped, rec.rows_deleted) == (
        109, 20, 89, 1)
    # the config as it ran: the model's own pooling, max length and prompt filled in
    from pipeline.preflight import preflight

    assert rec.output_version is not None
    assert rec.config_hash == preflight(cfg).cfg.config_hash() != cfg.config_hash()
    table = spark.read.format("delta").load(out)
    assert table.count() == 109 and table.filter("id = 99").count() == 0


def test_two_runs_at_once_never_double_rows(spark, kill_source, tmp_path):
    out = str(tmp_path / "out")
    cfg = load_config(write_config(tmp_path, kill_source, out, outputs="[{name: emb, dim: 32}]"),
                      ["spark.partitions=2"])
    outcomes: list = []

    def go():
        try:
            outcomes.append(run(cfg, spark=spark))
        except ConcurrentRunError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2, outcomes  # a thread that died of anything else fails here
    table = spark.read.format("delta").load(out)
    assert table.count() == 400 and table.select("id").distinct().count() == 400
    errors = [o for o in outcomes if isinstance(o, ConcurrentRunError)]
    assert all("another run holds this table" in str(e) for e in errors)
    # whoever lost, a re-run completes with nothing left to do
    again = run(cfg, spark=spark)
    assert again.rows_embedded == 0 and again.rows_skipped == 400


def test_two_processes_at_once_conflict_cleanly_or_both_succeed(spark, tmp_path, demo_rows):
    """Two `embed run` processes on one new output table: Delta's commit check, not
    an in-process lock, must keep rows single."""
    src, out = tmp_path / "src", tmp_path / "out"
    spark.createDataFrame(pd.DataFrame(demo_rows[:120])[["id", "text"]]).write.format("delta") \
        .save(str(src))
    cfg_path = write_config(tmp_path, str(src), str(out), outputs="[{name: emb, dim: 32}]")
    cmd = [str(BIN / "embed"), "run", "--config", str(cfg_path), "--no-progress",
           "--set", "spark.master=local[1]"]
    procs = [_spawn(cmd) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 7]), (codes, [o[-2000:] for o in outputs])
    if codes == [0, 7]:
        assert any("another run holds this table" in o for o in outputs)
    table = spark.read.format("delta").load(str(out))
    assert table.count() == 120 and table.select("id").distinct().count() == 120
