"""End to end on real local Spark + Delta with the real model: parity, lineage
columns, incremental re-runs, identity conflicts, quarantine and reconciliation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import SinkConflictError
from pipeline.run import run
from pipeline.tables.paths import TablePaths
from tests.conftest import cosine_rows, read_vectors, write_config


@pytest.fixture(scope="module")
def first_run(spark, demo_source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(write_config(tmp, demo_source, str(tmp / "out")))
    return cfg, run(cfg, spark=spark)


def test_every_column_matches_sentence_transformers(spark, first_run, demo_rows, st_reference):
    cfg, result = first_run
    assert result.rows_read == result.rows_embedded == len(demo_rows)
    assert result.rows_quarantined == result.rows_skipped == 0
    for spec in cfg.outputs:
        ids, vecs = read_vectors(spark, cfg.sink.path, spec.name)
        assert ids.tolist() == [r["id"] for r in demo_rows]
        assert vecs.shape == (len(demo_rows), spec.dim)
        cos = cosine_rows(vecs, st_reference[:, : spec.dim])
        assert cos.min() >= 0.9999, (spec.name, float(cos.min()))


def test_table_carries_lineage_and_identity(spark, first_run):
    from delta.tables import DeltaTable

    cfg, result = first_run
    df = spark.read.format("delta").load(cfg.sink.path)
    assert {"id", "content_hash", "model", "model_fingerprint", "run_id", "embedded_at",
            "n_tokens", "truncated"} <= set(df.columns)
    rows = df.select("run_id", "model_fingerprint", "model").distinct().collect()
    assert [(r.run_id, r.model_fingerprint) for r in rows] == [
        (result.run_id, result.model_fingerprint)]
    table = DeltaTable.forPath(spark, cfg.sink.path)
    props = table.detail().collect()[0]["properties"]
    assert props["embed.model_fingerprint"] == result.model_fingerprint
    assert [o["dim"] for o in json.loads(props["embed.outputs"])] == [384, 128, 64]
    last = table.history(1).collect()[0]
    # the commit names the run, the runtime that made its vectors and where they ran
    assert json.loads(last["userMetadata"]) == {
        "run_id": result.run_id, "runtime": result.runtime,
        "placement": "local-cpu: 2 encode tasks, 1 torch / 1 tokenizer threads"}
    assert result.placement == json.loads(last["userMetadata"])["placement"]
    assert last["version"] == result.output_version
    dtypes = dict(df.dtypes)
    assert dtypes["emb_64"] == "array<float>"


def test_same_input_config_and_model_give_the_same_bytes(spark, first_run, demo_source,
                                                         tmp_path):
    """Two runs of one source with one config write identical vectors, bit for bit
    (same partitions -> same length-sorted batches -> same kernels)."""
    cfg, _ = first_run
    again = load_config(write_config(tmp_path, demo_source, str(tmp_path / "out")))
    assert again.to_dict()["outputs"] == cfg.to_dict()["outputs"]
    assert run(again, spark=spark).rows_embedded == len(read_vectors(spark, cfg.sink.path,
                                                                     "emb_64")[0])
    for spec in cfg.outputs:
        ids, first = read_vectors(spark, cfg.sink.path, spec.name)
        ids_again, second = read_vectors(spark, again.sink.path, spec.name)
        assert ids.tolist() == ids_again.tolist()
        differ = np.flatnonzero((first != second).any(axis=1))
        assert differ.size == 0, (spec.name, differ[:5].tolist(), float(
            np.abs(first - second).max()))


def test_rerun_skips_everything_and_writes_nothing(spark, first_run):
    cfg, first = first_run
    again = run(cfg, spark=spark)
    assert (again.rows_embedded, again.rows_skipped) == (0, first.rows_read)
    assert again.output_version is None
    assert spark.read.format("delta").load(cfg.sink.path).count() == first.rows_read


def test_other_output_specs_are_refused_before_writing(spark, first_run, tmp_path):
    from delta.tables import DeltaTable

    cfg, _ = first_run
    before = DeltaTable.forPath(spark, cfg.sink.path).history(1).collect()[0]["version"]
    other = load_config(write_config(tmp_path, cfg.source.path, cfg.sink.path,
                                     outputs="[{name: emb_32, dim: 32}]"))
    with pytest.raises(SinkConflictError, match="outputs"):
        run(other, spark=spark)
    assert DeltaTable.forPath(spark, cfg.sink.path).history(1).collect()[0]["version"] == before


def test_incremental_reencodes_only_changed_and_new_rows(spark, demo_rows, tmp_path):
    from pipeline.demo import write_demo_table

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_demo_table(spark, src, limit=100)
    cfg = load_config(write_config(tmp_path, src, out, outputs="[{name: emb_64, dim: 64}]"))
    first = run(cfg, spark=spark)
    assert first.rows_embedded == 100
    before = spark.read.format("delta").load(out).toPandas().set_index("id")

    # change 10 texts, add 10 new rows
    pdf = spark.read.format("delta").load(src).toPandas()
    pdf.loc[pdf.id < 10, "text"] = "Changed: " + pdf.loc[pdf.id < 10, "text"]
    new = pdf.head(10).assign(id=pdf.id.max() + 1 + np.arange(10), text="A new docstring " +
                              np.arange(10).astype(str))
    import pandas as pd

    spark.createDataFrame(pd.concat([pdf, new])).write.format("delta").mode("overwrite").save(src)
    second = run(cfg, spark=spark)
    assert (second.rows_read, second.rows_embedded, second.rows_skipped) == (110, 20, 90)
    after = spark.read.format("delta").load(out).toPandas().set_index("id")
    assert len(after) == 110 and after.index.is_unique
    changed = after.loc[range(10)]
    assert (changed.run_id == second.run_id).all()
    assert (changed.content_hash != before.loc[range(10), "content_hash"]).all()
    untouched = after.loc[range(10, 100)]
    assert (untouched.run_id == first.run_id).all()


def test_bad_rows_are_quarantined_with_reasons_and_counts_reconcile(spark, tmp_path):
    import pandas as pd

    rows = [
        (1, "a good docstring about files"),
        (2, None),             # null_text
        (3, ""),               # empty_text
        (4, "  \t\n\u00a0 "),  # empty_text (unicode whitespace)
        (None, "no id here"),  # null_id
        (5, "first copy"),     # duplicate_id
        (5, "second copy"),    # duplicate_id
        (6, "another good one"),
    ]
    src = str(tmp_path / "bad.parquet")
    spark.createDataFrame(pd.DataFrame(rows, columns=["id", "text"]).astype({"id": "Int64"}),
                          "id long, text string").write.parquet(src)
    cfg = load_config(write_config(tmp_path, src, str(tmp_path / "out"), fmt="parquet",
                                   outputs="[{name: emb_64, dim: 64}]"))
    result = run(cfg, spark=spark)
    assert (result.rows_read, result.rows_embedded, result.rows_quarantined) == (8, 2, 6)
    assert result.rows_read == result.rows_embedded + result.rows_quarantined + result.rows_skipped
    q = spark.read.format("delta").load(TablePaths.of(cfg).quarantine).toPandas()
    got = sorted(zip(q["id"].fillna("<null>"), q["reason"], strict=True))
    assert got == sorted([("2", "null_text"), ("3", "empty_text"), ("4", "empty_text"),
                          ("<null>", "null_id"), ("5", "duplicate_id"), ("5", "duplicate_id")])
    assert set(q["run_id"]) == {result.run_id}
    embedded = spark.read.format("delta").load(cfg.sink.path).select("id").toPandas()
    assert sorted(embedded["id"]) == [1, 6]


def test_demo_data_by_delta_rs_is_the_table_spark_writes(spark, demo_source, tmp_path):
    """`embed demo-data` writes with delta-rs (no JVM): the same rows and schema as
    write_demo_table's Spark write, and a table Spark updates and reads the change
    feed of (what the demo's incremental re-runs read)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    path = tmp_path / "docstrings"
    written = CliRunner().invoke(main, ["demo-data", "--out", str(path), "--limit", "500"])
    assert written.exit_code == 0 and "wrote 500 docstrings" in written.output, written.output
    ours = spark.read.format("delta").load(str(path))
    theirs = spark.read.format("delta").load(demo_source)  # 500 rows, by Spark
    assert ours.schema.simpleString() == theirs.schema.simpleString()
    assert ours.orderBy("id").collect() == theirs.orderBy("id").collect()
    spark.sql(f"UPDATE delta.`{path}` SET text = concat(text, ' (edited)') WHERE id = 7")
    changes = (spark.read.format("delta").option("readChangeFeed", "true")
               .option("startingVersion", 1).load(str(path)))
    assert sorted(r["_change_type"] for r in changes.filter("id = 7").collect()) == [
        "update_postimage", "update_preimage"]
