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


def test_injected_out_of_memory_splits_the_batch_and_keeps_every_row(encoder, demo_rows):
    texts = [r["text"] for r in demo_rows[:40]]
    expected = np.asarray(encoder.encode(texts).columns["e"].values).reshape(40, 64)
    real_forward = encoder.forward
    calls = {"n": 0}

    def failing_once(ids, mask):  # the allocator fails on the first, biggest batch
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(ids, mask)

    encoder.forward = failing_once
    try:
        splits_before = encoder.stats.oom_splits
        got = np.asarray(encoder.encode(texts).columns["e"].values).reshape(40, 64)
    finally:
        del encoder.forward
    assert encoder.stats.oom_splits == splits_before + 1
    assert encoder.token_budget == 512
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
