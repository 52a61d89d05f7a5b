"""The run's stages and the bugs a review found: committed partitions are recorded
skips, the drift policy holds for every entry point, the weight fingerprint is
hashed once per process, calibration encodes on the executors, and a run leaves
the session and the cached encoders as it found them. Real Spark, Delta and model."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import backfill
from pipeline.cli import main
from pipeline.config import ModelConfig, OutputSpec, load_config
from pipeline.encoder import model as model_module
from pipeline.run import run
from pipeline.tables import runs as runs_table
from pipeline.tables.paths import TablePaths
from tests.conftest import write_config

MATERIALIZE = "spark.databricks.delta.merge.materializeSource"


@pytest.fixture(scope="module")
def daily_source(spark, tmp_path_factory, demo_rows):
    """90 docstrings over three days (2024-01-01..03), as Delta."""
    path = str(tmp_path_factory.mktemp("daily") / "src")
    pdf = pd.DataFrame(demo_rows[:90])[["id", "text"]]
    pdf["day"] = [f"2024-01-0{1 + i % 3}" for i in range(len(pdf))]
    spark.createDataFrame(pdf).write.format("delta").save(path)
    return path


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_committed_partition_is_a_recorded_skip(spark, daily_source, tmp_path):
    """A re-run of a committed partition (an Airflow retry) records one 'skipped' row,
    no 'running' row, no OpenLineage event, exits 0, and the DAG's check passes."""
    from pipeline.dag_tasks import check_run

    events = tmp_path / "events.jsonl"
    cfg_path = write_config(tmp_path, daily_source, str(tmp_path / "out"),
                            outputs="[{name: emb, dim: 32}]",
                            extra=f"lineage: {{transport: file, path: '{events}'}}\n")
    args = ["run", "--config", str(cfg_path), "--set", "source.partition_column=day",
            "--partition", "2024-01-02", "--no-progress"]
    first = CliRunner().invoke(main, [*args, "--json"])
    assert first.exit_code == 0, first.output
    committed_by = json.loads(first.output.strip().splitlines()[-1])["run_id"]
    n_events = len(_events(events))
    assert n_events == 2  # START, COMPLETE

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    runs_path = TablePaths.beside(str(tmp_path / "out")).runs
    records = spark.read.format("delta").load(runs_path).toPandas()
    skips = records[records.run_id != committed_by]
    assert list(skips.status) == ["skipped"], skips[["run_id", "status", "error"]]
    assert len(_events(events)) == n_events  # nothing ran: no START, no FAIL
    assert "nothing to do: partition 2024-01-02 is already committed" in again.output

    as_json = CliRunner().invoke(main, [*args, "--json"])
    summary = json.loads(as_json.output.strip().splitlines()[-1])
    assert summary["status"] == "skipped" and summary["rows_embedded"] == 0
    # the txn was read from the log with delta-rs: no Spark stage ran for the skip
    assert "spark_start" not in summary["stage_seconds"], summary["stage_seconds"]
    records = spark.read.format("delta").load(runs_path).toPandas()
    skips = records[records.run_id != committed_by]
    assert len(skips) == 2 and set(skips.status) == {"skipped"}
    assert (skips.partition == "2024-01-02").all()
    assert spark.read.format("delta").load(str(tmp_path / "out")).count() == 30

    checked = check_run(str(cfg_path), "2024-01-02")  # delta-rs, as the DAG's task reads
    assert checked["run_id"] == committed_by and checked["rows_embedded"] == 30
    assert checked["skipped_by"] == summary["run_id"]
    out = str(tmp_path / "out")
    # the one runs-table reader (delta-rs) agrees with Spark's own read of the events
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    local = runs_table.latest(runs_path, 5, out)
    last = Window.partitionBy("run_id").orderBy(F.col("event_time").desc())
    by_spark = (spark.read.format("delta").load(runs_path).filter(F.col("output_path") == out)
                .withColumn("_n", F.row_number().over(last)).filter("_n = 1")
                .orderBy(F.col("started_at").desc(), F.col("event_time").desc()).toPandas())
    assert list(local["run_id"]) == list(by_spark["run_id"]) and len(local) == 3
    assert local["run_id"][0] == summary["run_id"]  # the skips share a second: the latest first
    assert list(local["status"]) == list(by_spark["status"])


def test_partition_run_and_backfill_share_one_partition_id(spark, daily_source, tmp_path):
    cfg = load_config(write_config(tmp_path, daily_source, str(tmp_path / "out"),
                                   outputs="[{name: emb, dim: 32}]"),
                      ["source.partition_column=day"])
    fp = model_module.fingerprint(model_module.inspect_model(cfg.model.name_or_path))
    one = backfill.partition(cfg, fp, "2024-01-01")
    assert one.filter == "CAST(`day` AS STRING) = '2024-01-01'" and one.txn[1] == 1
    assert run(cfg, spark=spark, partition=one).rows_embedded == 30
    plans = backfill.plan(spark, cfg, fp, "2024-01-01", "2024-01-03")
    assert [(p.value, p.committed) for p in plans] == [
        ("2024-01-01", True), ("2024-01-02", False), ("2024-01-03", False)]
    assert plans[0].partition == one


def test_two_runs_of_one_partition_at_once_commit_it_once(spark, daily_source, tmp_path):
    """Whether the second run finds the partition committed at its start or Delta skips
    its write for the same txn id, it is a recorded skip, never a second copy."""
    cfg = load_config(write_config(tmp_path, daily_source, str(tmp_path / "out"),
                                   outputs="[{name: emb, dim: 32}]"),
                      ["source.partition_column=day"])
    fp = model_module.fingerprint(model_module.inspect_model(cfg.model.name_or_path))
    part = backfill.partition(cfg, fp, "2024-01-03")
    results: list = []

    def go():
        try:
            results.append(run(cfg, spark=spark, partition=part))
        except Exception as exc:  # recorded, so the assertion below names it
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(getattr(r, "status", repr(r)) for r in results) == ["skipped", "succeeded"], \
        results
    table = spark.read.format("delta").load(str(tmp_path / "out"))
    assert table.count() == 30 and table.select("id").distinct().count() == 30


def test_on_breach_fail_stops_a_backfill_with_exit_9(spark, daily_source, tmp_path):
    """drift.distribution.on_breach: fail holds for `embed backfill` too: the first
    partition that drifts is committed, recorded, and stops the backfill (exit 9).
    The thresholds here make any difference a breach. The weights are hashed once
    for the whole backfill."""
    out = tmp_path / "out"
    cfg_path = write_config(
        tmp_path, daily_source, str(out), outputs="[{name: emb, dim: 32}]", drift=True,
        extra="drift: {canary: {enabled: false}, distribution: {max_centroid_distance: 0.0,"
              " mmd_alpha: 1.0, on_breach: fail}}\n")
    model_module._hash_files.cache_clear()
    result = CliRunner().invoke(main, ["backfill", "--config", str(cfg_path),
                                       "--set", "source.partition_column=day",
                                       "--from", "2024-01-01", "--to", "2024-01-03"])
    assert result.exit_code == 9, result.output
    assert "drift breach" in result.output
    assert model_module._hash_files.cache_info().misses == 1
    cfg = load_config(cfg_path, ["source.partition_column=day"])
    fp = model_module.fingerprint(model_module.inspect_model(cfg.model.name_or_path))
    plans = backfill.plan(spark, cfg, fp, "2024-01-01", "2024-01-03")
    # day 1 had nothing to compare with; day 2 drifted from day 1 and stopped the rest
    assert [p.committed for p in plans] == [True, True, False]
    runs = runs_table.latest(TablePaths.beside(str(out)).runs, spark=spark, limit=10)
    assert sorted(runs.drift_status) == ["breach", "no_reference"]
    assert set(runs.status) == {"succeeded"}


def test_fingerprint_is_hashed_once_per_process_and_file_state(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    info = model_module.inspect_model(str(copy))
    model_module._hash_files.cache_clear()
    first = model_module.fingerprint(info)
    assert model_module.fingerprint(info) == first
    assert model_module._hash_files.cache_info()[:2] == (1, 1)  # hits, misses
    weights = info.weight_files[0]
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_module.fingerprint(info) == first  # touched: hashed again, same bytes
    assert model_module._hash_files.cache_info().misses == 2
    with open(weights, "r+b") as handle:  # same size, other bytes
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert model_module.fingerprint(info) != first


def test_calibration_encodes_on_the_executors(spark, demo_source, tmp_path, monkeypatch):
    """No encoder may be built in the driver's process (on a GPU cluster that is the
    driver's CPU): the sample goes through the executors' mapInArrow path."""
    import pipeline.encoder
    import pipeline.encoder.engine

    class NoDriverEncoder:
        def __init__(self, *args, **kwargs):
            raise AssertionError("an Encoder was built on the driver")

    monkeypatch.setattr(pipeline.encoder, "Encoder", NoDriverEncoder)
    monkeypatch.setattr(pipeline.encoder.engine, "Encoder", NoDriverEncoder)
    cfg = load_config(write_config(tmp_path, demo_source, str(tmp_path / "out"),
                                   outputs="[{name: q, dim: 64, dtype: int8}]"),
                      ["sink.calibration.size=50"])
    result = run(cfg, spark=spark)
    assert result.calibration == "fit" and result.rows_embedded > 0
    props = spark.sql(f"DESCRIBE DETAIL delta.`{cfg.sink.path}`").first()["properties"]
    ranges = json.loads(props["embed.calibration"])["q"]
    assert len(ranges["min"]) == 64 and all(lo < hi for lo, hi in zip(
        ranges["min"], ranges["max"], strict=True))
    again = run(cfg, spark=spark)  # nothing new: no sample encoded, the ranges stand
    assert (again.rows_embedded, again.calibration) == (0, "none")
    assert spark.sql(f"DESCRIBE DETAIL delta.`{cfg.sink.path}`").first()["properties"][
        "embed.calibration"] == props["embed.calibration"]


def test_a_run_restores_the_session_conf_it_changes(spark, demo_source, tmp_path):
    cfg = load_config(write_config(tmp_path, demo_source, str(tmp_path / "out"),
                                   outputs="[{name: emb, dim: 32}]"), ["spark.partitions=2"])
    spark.conf.set(MATERIALIZE, "auto")
    try:
        assert run(cfg, spark=spark).rows_embedded > 0  # a MERGE into a new table
        assert spark.conf.get(MATERIALIZE) == "auto"
    finally:
        spark.conf.unset(MATERIALIZE)
    more = load_config(write_config(tmp_path, demo_source, str(tmp_path / "out2"),
                                    outputs="[{name: emb, dim: 32}]"), ["spark.partitions=2"])
    assert run(more, spark=spark).rows_embedded > 0
    assert spark.conf.get(MATERIALIZE, None) is None
    assert spark.conf.get("spark.databricks.delta.commitInfo.userMetadata", None) is None


def test_one_cached_encoder_serves_two_calibrations(demo_rows):
    from pipeline.encoder.codec import quantize
    from pipeline.encoder.cuts import Calibration
    from pipeline.udf import get_encoder

    outputs = (OutputSpec(name="q", dim=64, dtype="int8"),)
    texts = [r["text"] for r in demo_rows[:16]]
    encoder = get_encoder(ModelConfig(), outputs, None)
    assert get_encoder(ModelConfig(), outputs, None) is encoder
    floats = encoder.encode_float(texts)[0]["q"]
    wide = Calibration({"q": (np.full(64, -1.0), np.full(64, 1.0))})
    narrow = Calibration.fit({"q": floats})
    a = encoder.encode(texts, wide).columns["q"]
    b = encoder.encode(texts, narrow).columns["q"]
    assert not hasattr(encoder, "calibration")
    for got, calibration in ((a, wide), (b, narrow)):
        want = quantize(floats, outputs[0], calibration)
        assert np.array_equal(np.asarray(got.values).reshape(-1, 64), want)
    assert not np.array_equal(np.asarray(a.values), np.asarray(b.values))
    with pytest.raises(ValueError, match="need calibration ranges"):
        encoder.encode(texts)
