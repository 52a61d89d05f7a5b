"""Sparse (SPLADE) columns against sentence-transformers' own SparseEncoder.

Tiny random-weight SparseEncoder directories built and saved by the library
(tests/model_families.py: BERT max, DistilBERT sum with log1p_relu and prompts, an
inference-free Router) are run through the engine and through Spark into Delta;
each row's indices must equal ``encode_document(..., max_active_dims=k)``'s
nonzero ones and its values match within 1e-4 (relative); queries equal
``encode_query``; search and hybrid fusion equal numpy references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ModelConfig, OutputSpec, load_config
from pipeline.encoder import Encoder
from pipeline.encoder.splade import LOGIT_BLOCK_FLOATS, SparseRows, from_arrow
from pipeline.errors import ConfigError
from pipeline.run import run
from tests import model_families
from tests.conftest import demo_table, write_config

K = 48
TABLE_K = 1024  # the table's top-k: wide enough that the query's few tokens meet many rows
QUERY = "parse the command line arguments and return the options"


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory) -> dict[str, str]:
    return model_families.build_all(tmp_path_factory.mktemp("sparse"),
                                    model_families.SPARSE_FAMILIES)


@pytest.fixture(scope="module")
def texts(demo_rows) -> list[str]:
    return [r["text"] for r in demo_rows[:40]] + ["x", "Return the sum.", "数字 🙂"]


def st_rows(path: str, texts: list[str], k: int | None, query: bool = False) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device="cpu")
    encode = model.encode_query if query else model.encode_document
    return encode(texts, max_active_dims=k, convert_to_sparse_tensor=False).numpy()


def assert_rows_equal(rows: SparseRows, reference: np.ndarray) -> None:
    assert len(rows) == len(reference)
    for r in range(len(rows)):
        idx, val = rows.row(r)
        want = np.nonzero(reference[r])[0]
        assert np.array_equal(idx, want), f"row {r}: other active dimensions"
        np.testing.assert_allclose(val, reference[r][want], rtol=1e-4)


@pytest.mark.parametrize("family", model_families.SPARSE_FAMILIES)
@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_each_sparse_family_equals_encode_document(sparse_models, texts, family, attention):
    path = sparse_models[family]
    enc = Encoder(ModelConfig(name_or_path=path, attention=attention),
                  [OutputSpec(name="sp", kind="sparse", max_active_dims=K)])
    assert enc.packed == (attention == "auto")  # packed rows (varlen / flash), or padded
    rows = from_arrow(enc.encode(texts).columns["sp"], "float32", enc.info.vocab_size)
    assert_rows_equal(rows, st_rows(path, texts, K))
    assert rows.active().max() == K


def test_a_column_prunes_to_its_own_top_k_and_min_weight(sparse_models, texts):
    path = sparse_models["splade_bert_max"]
    enc = Encoder(ModelConfig(name_or_path=path),
                  [OutputSpec(name="wide", kind="sparse", max_active_dims=K),
                   OutputSpec(name="narrow", kind="sparse", max_active_dims=8, dtype="float16"),
                   OutputSpec(name="heavy", kind="sparse", max_active_dims=K, min_weight=0.4)])
    cols = enc.encode(texts).columns
    narrow = from_arrow(cols["narrow"], "float16", enc.info.vocab_size)
    ref = st_rows(path, texts, 8)
    for r in range(len(texts)):
        assert np.array_equal(narrow.row(r)[0], np.nonzero(ref[r])[0])
        np.testing.assert_allclose(narrow.row(r)[1], ref[r][ref[r] > 0], rtol=1e-3)
    heavy = from_arrow(cols["heavy"], "float32", enc.info.vocab_size)
    wide = from_arrow(cols["wide"], "float32", enc.info.vocab_size)
    for r in range(len(texts)):
        keep = wide.row(r)[1] >= 0.4
        assert np.array_equal(heavy.row(r)[0], wide.row(r)[0][keep])


def test_memory_stays_bounded_on_512_token_texts(sparse_models):
    """A batch of 512-token texts: the logits are computed a block of tokens at a time,
    never tokens x vocabulary at once; the rows still equal the library's."""
    path = sparse_models["splade_bert_max"]
    long_texts = ["the quick brown fox jumps over the lazy dog " * 80] * 6
    enc = Encoder(ModelConfig(name_or_path=path, max_length=512),
                  [OutputSpec(name="sp", kind="sparse", max_active_dims=K)])
    rows = from_arrow(enc.encode(long_texts).columns["sp"], "float32", enc.info.vocab_size)
    assert enc.splade is not None
    whole = 6 * 512 * enc.info.vocab_size * 4  # what one pass over the whole batch needs
    assert 0 < enc.splade.peak_block_bytes <= LOGIT_BLOCK_FLOATS * 4 < whole / 10
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device="cpu")
    model.max_seq_length = 512
    ref = model.encode_document(long_texts, max_active_dims=K,
                                convert_to_sparse_tensor=False).numpy()
    assert_rows_equal(rows, ref)


def test_passages_get_a_sparse_vector_each(sparse_models, demo_rows):
    """chunking.mode: split: each passage's row equals encode_document on its own text."""
    from pipeline.config import ChunkingConfig

    path = sparse_models["splade_distilbert_sum"]
    docs = sorted((r["text"] for r in demo_rows), key=len, reverse=True)[:6] + ["Tiny."]
    enc = Encoder(ModelConfig(name_or_path=path),
                  [OutputSpec(name="sp", kind="sparse", max_active_dims=K)],
                  chunking=ChunkingConfig(mode="split", max_tokens=40, overlap_tokens=8))
    enc.max_batch_rows = 5  # one document's passages land in several batches
    result = enc.encode(docs)
    rows = result.chunks
    assert rows is not None and len(rows.doc) > 2 * len(docs)
    pieces = [docs[d][a:b] for d, a, b in zip(rows.doc, rows.char_start, rows.char_end,
                                              strict=True)]
    got = from_arrow(result.columns["sp"], "float32", enc.info.vocab_size)
    assert_rows_equal(got, st_rows(path, pieces, K))


def test_queries_equal_encode_query(sparse_models):
    """The inference-free Router's query side is its static weights; the DistilBERT model's
    is the model with its query prompt."""
    from pipeline.encoder.splade import StaticQuery
    from pipeline.encoder.stack import read_stack
    queries = [QUERY, "how do I read a file", "数字"]
    router = sparse_models["splade_router"]
    spec = read_stack(Path(router)).splade
    assert spec is not None and spec.query_weights is not None
    assert_rows_equal(StaticQuery(spec).encode(queries), st_rows(router, queries, None, True))
    distil = sparse_models["splade_distilbert_sum"]
    enc = Encoder(ModelConfig(name_or_path=distil, prompt="query: "),
                  [OutputSpec(name="q", kind="sparse", max_active_dims=16)])
    rows = from_arrow(enc.encode(queries).columns["q"], "float32", enc.info.vocab_size)
    assert_rows_equal(rows, st_rows(distil, queries, 16, True))


def test_dense_and_sparse_mismatches_are_one_line_config_errors(sparse_models, model_dir):
    sparse = sparse_models["splade_bert_max"]
    with pytest.raises(ConfigError, match=r"outputs\[0\].kind.*SparseEncoder.*'emb'"):
        Encoder(ModelConfig(name_or_path=sparse), [OutputSpec(name="emb", dim=16)])
    with pytest.raises(ConfigError, match=r"outputs\[0\].kind.*dense model.*'sp'"):
        Encoder(ModelConfig(name_or_path=str(model_dir)), [OutputSpec(name="sp", kind="sparse")])
    with pytest.raises(ConfigError, match="model.backend.*does not run SparseEncoders"):
        Encoder(ModelConfig(name_or_path=sparse, backend="onnx"),
                [OutputSpec(name="sp", kind="sparse")])


def test_sparse_config_keys_are_checked(tmp_path):
    def load(outputs: str, extra: str = ""):
        return load_config(write_config(tmp_path, "src", "out", outputs=outputs, extra=extra))

    for bad, key in (("{name: sp, kind: sparse, dim: 64}", r"outputs\[0\].dim"),
                     ("{name: sp, kind: sparse, dtype: int8}", r"outputs\[0\].dtype"),
                     ("{name: sp, kind: sparse, max_active_dims: 0}",
                      r"outputs\[0\].max_active_dims"),
                     ("{name: sp, kind: sparse, layer: 2}", r"outputs\[0\].layer"),
                     ("{name: sp, kind: spares}", r"outputs\[0\].kind")):
        with pytest.raises(ConfigError, match=key):
            load(f"[{bad}]")
    with pytest.raises(ConfigError, match="model.long_text"):
        load("[{name: sp, kind: sparse}]", "model: {long_text: chunk}")


# --------------------------------------------------------------------------- Spark -> Delta


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory, sparse_models, model_dir):
    """A sparse table (the Router model, two columns, canary and drift on) run twice (the
    second run adds rows: canary compared, drift computed), and a dense table of the same
    ids for hybrid search."""
    tmp = tmp_path_factory.mktemp("sparse_tables")
    source = demo_table(spark, tmp, 160)
    outputs = (f"[{{name: sp, kind: sparse, max_active_dims: {TABLE_K}}}, "
               "{name: sp16, kind: sparse, max_active_dims: 16, dtype: float16}]")
    extra = f"model: {{name_or_path: {sparse_models['splade_router']}}}"
    cfg = load_config(write_config(tmp, source, str(tmp / "sparse"), outputs=outputs,
                                   extra=extra, drift=True, parity=True))
    first = run(cfg, spark=spark)
    more = demo_table(spark, tmp / "more", 220)
    cfg2 = load_config(write_config(tmp, more, str(tmp / "sparse"), outputs=outputs,
                                    extra=extra, drift=True))
    second = run(cfg2, spark=spark)
    dense = load_config(write_config(tmp / "more", more, str(tmp / "dense"),
                                     outputs="[{name: emb, dim: 384}]"))
    run(dense, spark=spark)
    return {"sparse": cfg2.sink.path, "dense": dense.sink.path, "source": more,
            "runs": (first, second), "drift": cfg2, "model": sparse_models["splade_router"]}


def test_sparse_rows_land_in_delta_equal_to_encode_document(spark, tables):
    from deltalake import DeltaTable

    first, second = tables["runs"]
    assert first.parity.startswith("passed") and (first.rows_embedded, second.rows_embedded) \
        == (160, 60)
    assert second.canary is not None and second.canary.verdict == "same_runtime"
    spark_rows = (spark.read.format("delta").load(tables["sparse"]).orderBy("id")
                  .select("id", "sp", "sp16").collect())
    arrow = DeltaTable(tables["sparse"]).to_pyarrow_table().sort_by("id")
    assert arrow.column("id").to_pylist() == [r.id for r in spark_rows]
    by_rs = from_arrow(arrow.column("sp"), "float32", 0)
    from pipeline.encoder.splade import from_cells

    by_spark = from_cells([r.sp for r in spark_rows], "float32", 0)
    assert np.array_equal(by_rs.indices, by_spark.indices)
    assert np.array_equal(by_rs.values, by_spark.values)
    texts = dict(spark.read.format("delta").load(tables["source"]).select("id", "text")
                 .rdd.map(tuple).collect())
    ordered = [texts[i] for i in arrow.column("id").to_pylist()]
    assert_rows_equal(by_rs, st_rows(tables["model"], ordered, TABLE_K))
    meta = {k.decode(): v.decode() for k, v in arrow.schema.field("sp16").metadata.items()}
    assert meta["embed.kind"] == "sparse" and meta["embed.vocab_size"] == "30522"
    assert (meta["embed.pooling"], meta["embed.query"]) == ("splade-max", "static")
    assert len(meta["embed.tokenizer"]) == 16


def test_another_top_k_into_the_same_table_is_refused(spark, tables, sparse_models, tmp_path):
    from pipeline.errors import SinkConflictError

    outputs = ("[{name: sp, kind: sparse, max_active_dims: 64}, "
               "{name: sp16, kind: sparse, max_active_dims: 16, dtype: float16}]")
    cfg = load_config(write_config(
        tmp_path, tables["source"], tables["sparse"], outputs=outputs,
        extra=f"model: {{name_or_path: {sparse_models['splade_router']}}}"))
    with pytest.raises(SinkConflictError, match="max_active_dims"):
        run(cfg, spark=spark)


def test_a_csr_matrix_from_delta_rs_in_a_few_lines(tables):
    """The README's snippet: a sparse column read with delta-rs -> scipy.sparse.csr_matrix."""
    import pyarrow.compute as pc
    import scipy.sparse
    from deltalake import DeltaTable

    col = DeltaTable(tables["sparse"]).to_pyarrow_table(columns=["sp"]).column("sp")
    col = col.combine_chunks()
    indptr = np.concatenate([[0], np.cumsum(pc.list_value_length(col.field("indices")))])
    matrix = scipy.sparse.csr_matrix(
        (pc.list_flatten(col.field("values")).to_numpy(),
         pc.list_flatten(col.field("indices")).to_numpy(), indptr), shape=(len(col), 30522))
    assert matrix.shape == (220, 30522) and matrix.nnz == 220 * TABLE_K


def test_drift_rows_for_sparse_columns(spark, tables):
    from pipeline.tables.paths import TablePaths

    drift = (spark.read.format("delta").load(TablePaths.of(tables["drift"]).drift)
             .filter("status != 'no_reference'").toPandas())
    assert sorted(drift["column"]) == ["sp", "sp16"]
    row = drift[drift["column"] == "sp"].iloc[0]
    assert row["active_mean"] == row["ref_active_mean"] == TABLE_K
    assert 0 < row["top_token_overlap"] <= 1 and row["l1_mean"] > 0


def test_search_ranks_by_the_exact_dot_product_and_fuses_by_rrf(spark, tables):
    from pipeline.hybrid import RRF_K, hybrid_search
    from pipeline.search import SearchOptions, search

    query = st_rows(tables["model"], [QUERY], None, query=True)[0]
    pdf = spark.read.format("delta").load(tables["sparse"]).select("id", "sp").toPandas()
    from pipeline.encoder.splade import from_cells

    dots = from_cells(list(pdf["sp"]), "float32", 30522).dense() @ query
    assert (dots > 0).sum() > 10 and len(np.unique(np.sort(dots)[-11:])) == 11  # no ties
    want = pdf["id"].to_numpy()[np.argsort(-dots)][:10].tolist()
    for reader in ("delta-rs", "spark"):
        got = search(tables["sparse"], "sp", QUERY, SearchOptions(k=10, reader=reader))
        assert [h.id for h in got.hits] == want
        assert np.allclose([h.score for h in got.hits], np.sort(dots)[::-1][:10], rtol=1e-5)
    fused, first, second = hybrid_search(tables["sparse"], "sp", f"{tables['dense']}:emb",
                                         QUERY, SearchOptions(k=5, snippets=False))
    ranks_a = {h.id: r for r, h in enumerate(first.hits, 1)}
    ranks_b = {h.id: r for r, h in enumerate(second.hits, 1)}
    rrf = {i: sum(1 / (RRF_K + r[i]) for r in (ranks_a, ranks_b) if i in r)
           for i in {*ranks_a, *ranks_b}}
    assert [h.id for h in fused] == sorted(rrf, key=lambda i: -rrf[i])[:5]
    assert all(h.ranks == (ranks_a.get(h.id), ranks_b.get(h.id)) for h in fused)


def test_search_cli_hybrid_and_explain(tables):
    runner = CliRunner()
    out = runner.invoke(main, ["search", "--table", tables["sparse"], "--column", "sp",
                               "--k", "3", "--explain", QUERY])
    assert out.exit_code == 0, out.output
    assert "query tokens:" in out.output and "exact dot product" in out.output
    out = runner.invoke(main, ["search", "--table", tables["sparse"], "--column", "sp", "--k",
                               "3", "--hybrid", f"{tables['dense']}:emb", "--json", QUERY])
    assert out.exit_code == 0, out.output
    assert len(out.output.strip().splitlines()) == 3 and '"ranks"' in out.output
    bad = runner.invoke(main, ["search", "--table", tables["sparse"], "--column", "sp",
                               "--hybrid", "nocolon", QUERY])
    assert bad.exit_code == 2 and "TABLE:COLUMN" in bad.output


def test_sizes_measures_a_sparse_columns_active_dimensions(sparse_models, tmp_path):
    import pandas as pd

    pd.DataFrame({"id": [1], "text": ["x"]}).to_parquet(tmp_path / "src.parquet")
    cfg = write_config(tmp_path, str(tmp_path / "src.parquet"), str(tmp_path / "never"),
                       outputs=f"[{{name: sp, kind: sparse, max_active_dims: {K}}}]",
                       extra=f"model: {{name_or_path: {sparse_models['splade_bert_max']}}}",
                       fmt="parquet")
    out = CliRunner().invoke(main, ["sizes", "--config", str(cfg), "--rows", "1000"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert f"~{K}.0 active" in out.output and f"{K * 8:,}" in out.output
    assert "int8 x 32 (dense)" in out.output


def test_search_explain_and_hybrid_read_an_s3_table_as_a_local_one(tables, s3_server):
    """The sparse and dense tables copied as they are into the S3 server (a Delta table's
    paths are relative): `embed search --explain` and `--hybrid` on the s3:// copies give
    the local tables' hits and token weights, read with delta-rs and pyarrow's S3."""
    from pathlib import Path

    from pipeline.hybrid import explain, hybrid_search
    from pipeline.search import SearchOptions, search

    bucket = s3_server.bucket("sparse-search")
    for name in ("sparse", "dense"):
        s3_server.upload_folder(Path(tables[name]), f"{bucket}/{name}")
    options = SearchOptions(k=3, snippets=False)
    found = {}
    for where, (sparse, dense) in (("local", (tables["sparse"], tables["dense"])),
                                   ("s3", (f"{bucket}/sparse", f"{bucket}/dense"))):
        hits = search(sparse, "sp", QUERY, options).hits
        why = explain(sparse, "sp", QUERY, hits, options)
        fused = hybrid_search(sparse, "sp", f"{dense}:emb", QUERY, options)[0]
        found[where] = ([(h.id, round(h.score, 6)) for h in hits], why.query_tokens,
                        why.matches, [(h.id, h.ranks) for h in fused])
    assert found["local"] == found["s3"]
    runner = CliRunner()  # and as typed
    out = runner.invoke(main, ["search", "--table", f"{bucket}/sparse", "--column", "sp",
                               "--k", "3", "--explain", QUERY])
    assert out.exit_code == 0 and "query tokens:" in out.output, out.output
