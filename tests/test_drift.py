"""Lineage and drift on real Spark + Delta with the real model: canary parity
(same runtime, bf16, another model), distribution drift (a random split of the
same data vs shuffled tokens), OpenLineage events from the file transport, the
runs table, and the HTML report."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import deltars, drift, drift_stats
from pipeline.config import load_config
from pipeline.errors import CanaryError
from pipeline.run import run
from pipeline.tables import runs as runs_table
from pipeline.tables.paths import TablePaths
from tests.conftest import write_config

SPLIT = 300  # rows per side of the random split


def _append(spark, path: str, rows: list[dict], mode: str = "append") -> None:
    frame = pd.DataFrame(rows)[["id", "text"]]
    spark.createDataFrame(frame, "id long, text string").coalesce(1).write.format("delta") \
        .mode(mode).save(path)


@pytest.fixture(scope="module")
def random_model(model_dir, tmp_path_factory):
    """MiniLM's shape, tokenizer and files with random weights: another model."""
    from pipeline.demo import random_weights_model

    return random_weights_model(model_dir, tmp_path_factory.mktemp("random-minilm"))


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory, random_model):
    """Five runs on one table: A, + B (same data), + shuffled tokens, + rows in bf16,
    then a different model. Returns the config, results and the failure."""
    from pipeline.demo import demo_rows, shuffled_words

    tmp = tmp_path_factory.mktemp("drift")
    rows = demo_rows(2 * SPLIT + 50)
    random.Random(7).shuffle(rows)
    a, b, extra = rows[:SPLIT], rows[SPLIT:2 * SPLIT], rows[2 * SPLIT:]
    source = str(tmp / "src")
    _append(spark, source, a, mode="overwrite")
    events = tmp / "lineage" / "events.jsonl"
    cfg_path = write_config(
        tmp, source, str(tmp / "out" / "emb"),
        outputs="[{name: emb_384, dim: 384}, {name: emb_64, dim: 64, dtype: int8}]",
        extra=f"lineage: {{transport: file, path: '{events}'}}\n", drift=True)
    cfg = load_config(cfg_path)
    results = {"baseline": run(cfg, spark=spark)}
    _append(spark, source, b)
    results["split"] = run(cfg, spark=spark)
    _append(spark, source, shuffled_words(rows[:200], id_offset=100_000))
    results["shuffled"] = run(cfg, spark=spark)
    _append(spark, source, [{**r, "id": 200_000 + r["id"]} for r in extra])
    results["bf16"] = run(load_config(cfg_path, ["model.precision=bf16"]), spark=spark)
    _append(spark, source, [{"id": 300_000 + r["id"], "text": r["text"]} for r in extra])
    version_before = spark.sql(f"DESCRIBE HISTORY delta.`{cfg.sink.path}`").first()["version"]
    with pytest.raises(CanaryError) as failure:
        run(load_config(cfg_path, [f"model.name_or_path={random_model}"]), spark=spark)
    version_after = spark.sql(f"DESCRIBE HISTORY delta.`{cfg.sink.path}`").first()["version"]
    return {"cfg": cfg, "results": results, "failure": failure.value, "events": events,
            "versions": (version_before, version_after)}


def test_second_run_same_runtime_and_no_drift_on_a_random_split(runs):
    first, split = runs["results"]["baseline"], runs["results"]["split"]
    assert first.canary.verdict == "baseline" and first.drift_status == "no_reference"
    assert split.rows_embedded == SPLIT
    assert split.canary.verdict == "same_runtime"
    assert min(c.min_cosine for c in split.canary.columns) >= 0.9999
    assert split.drift_status == "ok", split.drift_summary
    assert split.drift.reference_runs == [first.run_id]


def test_shuffled_tokens_are_flagged(runs):
    shuffled = runs["results"]["shuffled"]
    assert shuffled.canary.verdict == "same_runtime"
    assert shuffled.drift_status == "breach"
    for name, stats in shuffled.drift.columns.items():
        assert stats.flags, name
        assert stats.mmd_p_value < 0.01, name


def test_bf16_run_is_runtime_changed_and_proceeds(runs):
    bf16 = runs["results"]["bf16"]
    assert "bf16" in bf16.runtime
    assert bf16.canary.verdict == "runtime_changed", bf16.canary_summary
    assert 0.999 <= min(c.min_cosine for c in bf16.canary.columns) < 0.9999
    assert bf16.rows_embedded == 50


def test_another_model_fails_the_canary_and_writes_nothing(spark, runs):
    message = str(runs["failure"])
    assert "model or its weights changed" in message and "Nothing was written" in message
    before, after = runs["versions"]
    assert before == after
    out = spark.read.format("delta").load(runs["cfg"].sink.path)
    assert out.count() == 2 * SPLIT + 200 + 50


def test_runs_table_records_lineage_and_the_failure(spark, runs):

    cfg, results = runs["cfg"], runs["results"]
    table = runs_table.latest(TablePaths.beside(cfg.sink.path).runs, spark=spark, limit=10)
    by_id = {r.run_id: r for r in table.itertuples()}
    for result in results.values():
        row = by_id[result.run_id]
        assert row.status == "succeeded" and row.lineage_run_id == result.lineage_run_id
        assert json.loads(row.canary)["verdict"] == result.canary.verdict
        assert row.drift_status == result.drift_status
        assert json.loads(row.versions)["embed-pipeline-git"] != ""
    failed = table[table["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].iloc[0].startswith("CanaryError: canary:")


def test_openlineage_events_follow_the_spec(runs):
    """Every event of the five runs (four that succeeded, one that failed) against the
    official schemas and the spec's rules (tests/openlineage_spec.py)."""
    from pipeline import lineage
    from tests.openlineage_spec import validate_event

    events = [json.loads(line) for line in runs["events"].read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"] * 4 + ["START", "FAIL"]
    version = lineage.package_version()
    for event in events:
        validate_event(event)
        assert event["producer"] == f"{lineage.REPO}/tree/v{version}"
        facet = event["run"]["facets"][lineage.EMBEDDING_FACET_KEY]
        assert facet["_producer"] == event["producer"]
        # the facet's schema URL names this release's tag and the file the package ships
        assert facet["_schemaURL"].split("#")[0].endswith(
            f"/v{version}/{lineage.EMBEDDING_FACET_FILE}")
        assert "embedding" not in event["run"]["facets"]


def test_openlineage_events_carry_the_run(runs):
    events = [json.loads(line) for line in runs["events"].read_text().splitlines()]
    results = list(runs["results"].values())
    for i, event in enumerate(events):
        assert {"eventTime", "producer", "schemaURL", "run", "job", "inputs", "outputs"} \
            <= event.keys()
        uuid.UUID(event["run"]["runId"])
        assert event["job"] == {**event["job"], "namespace": "embed", "name": "embed.emb"}
        assert event["inputs"][0]["namespace"] == "file"
        assert event["outputs"][0]["name"] == runs["cfg"].sink.path
        facet = event["run"]["facets"]["embedPipeline_embedding"]
        assert [o["dim"] for o in facet["outputs"]] == [384, 64]
        if event["eventType"] == "COMPLETE":
            result = results[i // 2]
            assert event["run"]["runId"] == result.lineage_run_id
            assert facet["embedRunId"] == result.run_id and facet["runtime"] == result.runtime
            out = event["outputs"][0]
            # row counts are output facets (the spec), not dataset facets
            assert "outputStatistics" not in out["facets"]
            assert out["outputFacets"]["outputStatistics"]["rowCount"] == result.rows_embedded
            assert {f["name"] for f in out["facets"]["schema"]["fields"]} >= {
                "id", "emb_384", "emb_64"}
            assert event["inputs"][0]["facets"]["version"]["datasetVersion"] == str(
                result.source_version)
    assert "model or its weights changed" in events[-1]["run"]["facets"]["errorMessage"][
        "message"]


def test_drift_command_prints_and_writes_a_report(runs, tmp_path):
    from pipeline.cli import main

    cfg, shuffled = runs["cfg"], runs["results"]["shuffled"]
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["drift", "--table", cfg.sink.path, "--run",
                                       shuffled.run_id, "--out", str(out), "--fail-on-breach"])
    assert result.exit_code == 9, result.output
    assert "breach" in result.output and "emb_384" in result.output
    # the error line names the checks that tripped, as the DAG's drift task does
    assert re.search(r"drifted: [^\n]*emb_\d+: (centroid_distance|mmd|drifted_share)",
                     result.output), result.output
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 3 * 2  # 3 plots x 2 columns
    assert shuffled.run_id in html
    ok = CliRunner().invoke(main, ["drift", "--table", cfg.sink.path, "--run",
                                   runs["results"]["split"].run_id, "--out", str(out),
                                   "--fail-on-breach"])
    assert ok.exit_code == 0, ok.output


# --------------------------------------------------------------------------- statistics


def test_statistics_flag_a_shift_and_not_a_same_distribution_sample():
    from pipeline.config import DistributionConfig

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 800, 64))
    same = drift_stats.column_drift(x, y, DistributionConfig())
    assert same.flags == [] and same.mmd_p_value > 0.05
    assert (same.n_current, same.n_reference) == (800, 800)
    y[:, :16] += 0.4
    shifted = drift_stats.column_drift(x, y, DistributionConfig())
    assert shifted.mmd_p_value < 0.01 and 0.2 <= shifted.drifted_share <= 0.3
    assert len(shifted.flags) == 3


def test_ks_pvalues_equal_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(1)
    x, y = np.round(rng.normal(size=(300, 8)) * 2), np.round(rng.normal(size=(200, 8)) * 2)
    expected = stats.ks_2samp(x, y, axis=0, method="asymp").pvalue
    assert np.allclose(drift_stats.ks_pvalues(x, y), expected, atol=1e-12)


def test_canary_set_is_varied():
    texts = drift.canary_texts()
    assert 200 <= len(texts) <= 400 and len(set(texts)) == len(texts)
    lengths = sorted(len(t.split()) for t in texts)
    assert lengths[0] <= 2 and lengths[-1] >= 300


def test_dag_drift_task_follows_the_configs_policy(spark, runs, tmp_path):
    """The config's on_breach is the one policy: fail -> the DAG's drift task fails on a
    breach (and only then); warn -> the breach is reported, the task succeeds."""
    import dataclasses

    from pipeline.dag_tasks import check_drift
    from pipeline.errors import DriftBreach

    cfg = runs["cfg"]
    policies = {}
    for policy in ("fail", "warn"):
        d = dataclasses.replace(cfg.drift, distribution=dataclasses.replace(
            cfg.drift.distribution, on_breach=policy))
        path = tmp_path / f"{policy}.yaml"
        path.write_text(json.dumps(dataclasses.replace(cfg, drift=d).to_dict()))  # JSON: YAML
        policies[policy] = str(path)
    ok = check_drift(policies["fail"], runs["results"]["split"].run_id)
    assert ok["status"] == "ok" and ok["canary"] == "same_runtime" and ok["flags"] == []
    shuffled = runs["results"]["shuffled"].run_id
    with pytest.raises(DriftBreach, match=f"run {shuffled} drifted: emb_384: "):
        check_drift(policies["fail"], shuffled)
    warned = check_drift(policies["warn"], shuffled)
    assert warned["status"] == "breach" and warned["flags"]


def _delta_rs(path: str):
    from deltalake import DeltaTable

    return DeltaTable(path)


def test_delta_rs_reads_every_table_as_spark_does(spark, runs):
    """The output, runs, canary, drift and sample tables through delta-rs (`deltalake`):
    the same schema (column metadata included), rows and vectors as Spark's read, and
    every commit tagged with JSON userMetadata naming its run."""

    cfg = runs["cfg"]
    tables = {"output": cfg.sink.path, "runs": TablePaths.beside(cfg.sink.path).runs,
              "canary": TablePaths.of(cfg).canary, "drift": TablePaths.of(cfg).drift,
              "samples": TablePaths.of(cfg).samples}
    for name, path in tables.items():
        theirs, ours = _delta_rs(path), spark.read.format("delta").load(path)
        assert json.loads(theirs.schema().to_json()) == json.loads(ours.schema.json()), name
        assert deltars.arrow_dataset(theirs).count_rows() == ours.count(), name
        history = theirs.history()
        tags = [json.loads(h["userMetadata"]) for h in history if h.get("userMetadata")]
        writes = [h for h in history if h["operation"] in ("WRITE", "MERGE")]
        assert len(tags) == len(writes) and all(t["run_id"] for t in tags), (name, history)

    arrow = deltars.dataset(cfg.sink.path).to_table().sort_by("id")
    pdf = spark.read.format("delta").load(cfg.sink.path).toPandas().sort_values("id")
    assert arrow.column("id").to_pylist() == pdf["id"].tolist()
    for column in ("emb_384", "emb_64"):
        assert np.array_equal(np.stack(arrow.column(column).to_numpy(zero_copy_only=False)),
                              np.stack(pdf[column].to_numpy())), column
    # delta-rs' own scan too, in a process of its own: it may abort at interpreter exit
    # (pipeline/deltars.py), so the child reports and leaves with os._exit
    script = ("import json, os, sys, numpy as np\nfrom deltalake import DeltaTable\n"
              "t = DeltaTable(sys.argv[1]).to_pyarrow_table(columns=['id', 'emb_384'])\n"
              "v = np.stack(t.column('emb_384').to_numpy(zero_copy_only=False))\n"
              "print(json.dumps([t.num_rows, float(v.astype(np.float64).sum())]), flush=True)\n"
              "os._exit(0)\n")
    child = subprocess.run([sys.executable, "-c", script, cfg.sink.path], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    rows, total = json.loads(child.stdout)
    assert rows == len(pdf)
    assert total == pytest.approx(float(np.stack(pdf["emb_384"]).astype(np.float64).sum()))


def _spark_drift_rows(spark, path: str, out: str, run_id: str | None) -> pd.DataFrame:
    """The reference: one run's drift rows (default: the latest computed) read by Spark."""
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(path).filter(F.col("output_path") == out)
    run_id = run_id or df.orderBy(F.col("computed_at").desc()).first()["run_id"]
    return df.filter(F.col("run_id") == run_id).toPandas()


def test_drift_report_readers_without_spark_equal_sparks(spark, runs):
    """`embed drift` and the DAG's drift task read the drift rows and the stored samples
    with delta-rs (no JVM): the same rows, and the same seeded order, as Spark's read."""
    cfg, shuffled = runs["cfg"], runs["results"]["shuffled"]
    path, out = TablePaths.of(cfg).drift, cfg.sink.path
    for run_id in (None, shuffled.run_id, runs["results"]["split"].run_id):
        ours = drift.latest(None, path, out, run_id).sort_values("column")
        theirs = _spark_drift_rows(spark, path, out, run_id).sort_values("column")
        assert len(ours) == 2 and list(ours["run_id"]) == list(theirs["run_id"]), run_id
        for name in ("column", "status", "mmd2", "flags", "reference_runs"):
            assert list(ours[name]) == list(theirs[name]), (run_id, name)
    refs = json.loads(drift.latest(None, path, out, shuffled.run_id)["reference_runs"].iloc[0])
    wanted, keep = [shuffled.run_id, *refs], ["run_id", "content_hash", "emb_64"]
    ours = drift._stored_samples(None, TablePaths.of(cfg).samples, wanted, keep, 7)
    theirs = drift.stored_samples_spark(spark, TablePaths.of(cfg).samples, wanted, keep, 7)
    assert len(ours) > 100 and set(ours["run_id"]) == set(wanted)
    assert list(ours.sort_values("_key")["content_hash"]) == list(
        theirs.sort_values("_key")["content_hash"])
    assert dict(zip(ours["content_hash"], ours["_key"], strict=True)) == dict(
        zip(theirs["content_hash"], theirs["_key"], strict=True))


def test_column_metadata_says_how_to_decode_each_vector(runs):
    fields = {f.name: f for f in _delta_rs(runs["cfg"].sink.path).schema().fields}
    assert fields["emb_384"].metadata == {
        "embed.dim": 384, "embed.dtype": "float32", "embed.length": 384, "embed.layer": "last",
        "embed.reduce": "truncate", "embed.normalize": True, "embed.pooling": "mean",
        "embed.encoding": "float32 array"}
    assert {k: fields["emb_64"].metadata[k] for k in ("embed.dim", "embed.dtype",
                                                     "embed.length")} == {
        "embed.dim": 64, "embed.dtype": "int8", "embed.length": 64}
    assert fields["id"].metadata == {}
