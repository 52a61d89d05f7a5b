"""Bad and hostile input: OOM mid-batch, fuzzed text through the core and through
Spark, empty partitions. Nothing crashes, every row is accounted for."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ModelConfig, OutputSpec, load_config
from pipeline.encoder import Encoder
from pipeline.run import run
from pipeline.tables.paths import TablePaths
from tests.conftest import cosine_rows, write_config

SPECS = (OutputSpec(name="e", dim=64),)


@pytest.fixture(scope="module")
def encoder():
    return Encoder(ModelConfig(max_length=128, token_budget=1024, max_batch_rows=16), SPECS)


def fuzz_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        lambda: "".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 200))),
        lambda: "".join(chr(rng.randint(0, 31)) for _ in range(rng.randint(1, 50))) + "x",
        lambda: "\u200b\ufeff" * rng.randint(1, 30) + "zero width",
        lambda: "x" * (1 << 20),  # 1 MB
        lambda: "💥" * rng.randint(1, 500),
        lambda: " ".join(rng.choice(["def", "class", "ünïcödé", "日本語", "\t", "\n"])
                         for _ in range(rng.randint(1, 300))),
    ]
    return [rng.choice(pools)() for _ in range(n)]


def test_fuzzed_text_through_the_core(encoder):
    texts = fuzz_texts(1, 60)
    result = encoder.encode(texts)
    vecs = np.asarray(result.columns["e"].values).reshape(60, 64)
    assert np.isfinite(vecs).all()
    assert (result.n_tokens <= 128).all() and result.truncated.any()


@pytest.mark.parametrize("backend", ["varlen", "sdpa"])  # packed and padded batches
def test_injected_out_of_memory_splits_the_batch_and_keeps_every_row(backend, demo_rows):
    encoder = Encoder(ModelConfig(max_length=128, token_budget=1024, max_batch_rows=16,
                                  attention=backend), SPECS)
    texts = [r["text"] for r in demo_rows[:40]]
    expected = np.asarray(encoder.encode(texts).columns["e"].values).reshape(40, 64)
    real_hidden = encoder.backend.hidden
    calls = {"n": 0}

    def failing_once(inputs):  # the allocator fails on the first batch
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_hidden(inputs)

    encoder.backend.hidden = failing_once  # the backend seam: where the model runs
    got = np.asarray(encoder.encode(texts).columns["e"].values).reshape(40, 64)
    assert encoder.stats.oom_splits == 1
    assert encoder.token_budget == 512
    assert calls["n"] > 2  # the failed batch ran again as two halves
    assert cosine_rows(got, expected).min() >= 0.9999


def test_fuzzed_source_through_spark_reconciles(spark, tmp_path):
    texts = fuzz_texts(2, 40) + ["", "   ", None, "ok"]
    pdf = pd.DataFrame({"id": np.arange(len(texts)), "text": texts})
    src = str(tmp_path / "fuzz")
    # 8 partitions for 44 rows, some of them empty after the encode repartition
    spark.createDataFrame(pdf).repartition(8).write.format("delta").save(src)
    cfg = load_config(write_config(tmp_path, src, str(tmp_path / "out"),
                                   outputs="[{name: e, dim: 32}]"),
                      ["model.max_length=64", "spark.partitions=6"])
    result = run(cfg, spark=spark)
    assert result.rows_read == 44 and result.rows_quarantined == 3
    assert result.rows_embedded == 41
    out = spark.read.format("delta").load(cfg.sink.path)
    assert out.count() == 41 and out.select("id").distinct().count() == 41


def test_long_text_chunking_is_the_token_weighted_mean_of_windows(demo_rows):
    from pipeline.config import ModelConfig

    cfg = ModelConfig(max_length=64, long_text="chunk", chunk_overlap=8, max_chunks=4)
    enc = Encoder(cfg, (OutputSpec(name="e", dim=384, normalize=False),))
    tok = enc.tokenizer
    long_text = " ".join(r["text"] for r in demo_rows[:3])
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4 * 62  # more than max_chunks windows: the rest is cut, and flagged
    short = "A short docstring."
    result = enc.encode([short, long_text])
    assert result.truncated.tolist() == [False, True]
    assert result.n_tokens[1] == len(ids) + 2

    plain = Encoder(ModelConfig(max_length=64), (OutputSpec(name="e", dim=384,
                                                            normalize=False),))
    window, stride = 62, 54
    pieces = [ids[s:s + window] for s in range(0, len(ids) - 8, stride)][:4]
    texts = [tok.decode(p) for p in pieces]
    vecs, _ = plain.encode_float(texts)
    weights = np.array([len(p) for p in pieces], dtype=np.float32)
    expected = (vecs["e"] * weights[:, None]).sum(0) / weights.sum()
    got = np.asarray(result.columns["e"].values).reshape(2, 384)[1]
    assert cosine_rows(got[None], expected[None])[0] >= 0.999
    # short rows are untouched by chunking
    alone, _ = plain.encode_float([short])
    assert cosine_rows(np.asarray(result.columns["e"].values).reshape(2, 384)[:1],
                       alone["e"])[0] >= 0.9999


def test_invalid_utf8_and_non_string_text_are_quarantined(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "text": pa.array([b"valid text", b"bad \xff\xfe bytes", "caf\u00e9".encode()],
                         pa.binary()),
    }), src)
    cfg = load_config(write_config(tmp_path, str(src), str(tmp_path / "out"), fmt="parquet",
                                   outputs="[{name: e, dim: 32}]"))
    result = run(cfg, spark=spark)
    assert (result.rows_read, result.rows_embedded, result.rows_quarantined) == (3, 2, 1)
    q = spark.read.format("delta").load(TablePaths.of(cfg).quarantine).collect()
    assert [(r.id, r.reason) for r in q] == [("2", "invalid_utf8")]
    assert q[0].raw_value.startswith("bad ")

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": [3.5, 4.0]}), numbers)
    cfg = load_config(write_config(tmp_path, str(numbers), str(tmp_path / "out2"),
                                   fmt="parquet", outputs="[{name: e, dim: 32}]"))
    result = run(cfg, spark=spark)
    assert (result.rows_embedded, result.rows_quarantined) == (0, 2)
    quarantined = spark.read.format("delta").load(TablePaths.of(cfg).quarantine).collect()
    reasons = {r.reason for r in quarantined}
    assert reasons == {"text_not_string"}
