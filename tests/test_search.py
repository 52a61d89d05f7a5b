"""`embed search` on a real output table: the exact top-k equals a brute-force
cosine over Spark's read with sentence-transformers' query vector; delta-rs and
Spark readers agree; int8 is dequantized, binary rescored by a float column;
bad input gets one line and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.run import run
from tests.conftest import demo_table, write_config

QUERY = "parse command line arguments"
OUTPUTS = ("[{name: emb_384, dim: 384}, {name: emb_64, dim: 64, dtype: int8}, "
           "{name: emb_bits, dim: 384, dtype: binary}]")


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    source = demo_table(spark, tmp, 300)
    cfg = load_config(write_config(tmp, source, str(tmp / "out"), outputs=OUTPUTS))
    run(cfg, spark=spark)
    return {"path": cfg.sink.path, "source": source}


@pytest.fixture(scope="module")
def st_query(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode([QUERY])[0]


def _brute_force(spark, path: str, column: str, query: np.ndarray, k: int):
    pdf = spark.read.format("delta").load(path).select("id", column).toPandas()
    vecs = np.stack(pdf[column]).astype(np.float32)
    scores = vecs @ (query / np.linalg.norm(query)) / np.linalg.norm(vecs, axis=1)
    order = np.argsort(-scores)[:k]
    return pdf["id"].to_numpy()[order].tolist(), scores[order]


@pytest.mark.parametrize("reader", ["delta-rs", "spark"])
def test_top_k_is_the_exact_cosine_top_k(spark, table, st_query, reader):
    from pipeline.search import SearchOptions, search

    result = search(table["path"], "emb_384", QUERY, SearchOptions(k=10, reader=reader))
    want_ids, want_scores = _brute_force(spark, table["path"], "emb_384", st_query, 10)
    assert [h.id for h in result.hits] == want_ids
    assert np.allclose([h.score for h in result.hits], want_scores, atol=1e-4)
    assert (result.reader, result.rows) == (reader, 300)
    assert result.hits[0].snippet and "command" in result.hits[0].snippet.lower()


def test_int8_columns_are_dequantized_with_the_tables_ranges(spark, table):
    from pipeline.encoder.codec import dequantize
    from pipeline.search import SearchOptions, encode_query, open_table, query_encoder, search

    info = open_table(table["path"])
    spec = info.specs["emb_64"]
    query = encode_query(query_encoder(info, [spec], None, None), QUERY)["emb_64"]
    pdf = spark.read.format("delta").load(table["path"]).select("id", "emb_64").toPandas()
    vecs = dequantize(np.stack(pdf["emb_64"]).astype(np.int8), spec, info.calibration)
    scores = vecs @ query / np.linalg.norm(vecs, axis=1)
    want = pdf["id"].to_numpy()[np.argsort(-scores)[:5]].tolist()
    assert [h.id for h in search(table["path"], "emb_64", QUERY, SearchOptions(k=5)).hits] == want


def test_binary_columns_are_rescored_by_a_float_column(table):
    from pipeline.search import SearchOptions, search

    bits = search(table["path"], "emb_bits", QUERY, SearchOptions(k=5, rescore_factor=8))
    floats = search(table["path"], "emb_384", QUERY, SearchOptions(k=5))
    assert bits.rescored_with == "emb_384"
    # the rescored scores are the float column's cosines of those rows
    every = search(table["path"], "emb_384", QUERY, SearchOptions(k=300)).hits
    by_id = {h.id: h.score for h in every}
    assert all(abs(by_id[h.id] - h.score) < 1e-6 for h in bits.hits)
    assert bits.hits[0].id == floats.hits[0].id


def test_json_prints_one_object_per_hit(table):
    result = CliRunner().invoke(main, ["search", "--table", table["path"], "--column",
                                       "emb_384", "--k", "3", "--json", QUERY])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.splitlines()]
    assert len(hits) == 3 and set(hits[0]) == {"id", "score"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_bad_input_gets_one_line_and_a_non_zero_exit(table, tmp_path, model_dir):
    from pipeline.demo import random_weights_model

    other = random_weights_model(model_dir, tmp_path / "other")
    cases = [
        (["--table", str(tmp_path / "nope"), "--column", "emb_384", QUERY], "no Delta table"),
        (["--table", table["source"], "--column", "emb_384", QUERY], "not one embed made"),
        (["--table", table["path"], "--column", "emb_999", QUERY],
         "not an embedding column"),
        (["--table", table["path"], "--column", "emb_384", "  "], "the query is empty"),
        (["--table", table["path"], "--column", "emb_384", "--model", str(other), QUERY],
         "is not the one that made"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["search", *args])
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_binary_rescore_equals_a_numpy_reference(table):
    """Hamming top k x factor over the stored bits (earlier rows win ties, as the search
    reads them), rescored by cosine on emb_384: the same ids and scores."""
    from pipeline.search import (
        SearchOptions,
        _delta_rs_batches,
        decode,
        encode_query,
        open_table,
        query_encoder,
        search,
    )

    info = open_table(table["path"])
    bits_spec, float_spec = info.specs["emb_bits"], info.specs["emb_384"]
    q = encode_query(query_encoder(info, [bits_spec, float_spec], None, None), QUERY, info)
    batches = list(_delta_rs_batches(info.path, ["id", "emb_bits", "emb_384"]))
    ids = np.concatenate([b.column("id").to_numpy() for b in batches])
    bits = np.concatenate([decode(b.column("emb_bits"), bits_spec, info.calibration)
                           for b in batches])
    floats = np.concatenate([decode(b.column("emb_384"), float_spec, info.calibration)
                             for b in batches])
    query_bits = np.packbits(q["emb_bits"] > 0)
    hamming = np.unpackbits(bits ^ query_bits, axis=1).sum(axis=1)
    candidates = np.lexsort((np.arange(len(ids)), hamming))[:5 * 3]
    cosine = floats[candidates] @ q["emb_384"] / np.linalg.norm(floats[candidates], axis=1)
    want = candidates[np.argsort(-cosine, kind="stable")[:5]]
    got = search(table["path"], "emb_bits", QUERY, SearchOptions(k=5, rescore_factor=3))
    assert [h.id for h in got.hits] == ids[want].tolist()
    assert np.allclose([h.score for h in got.hits], np.sort(cosine)[::-1][:5], atol=1e-5)
