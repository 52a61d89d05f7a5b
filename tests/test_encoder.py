"""The Spark-free encoder core with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder import Encoder
from pipeline.encoder.batching import pad_batch, padding_efficiency, plan_batches
from pipeline.encoder.engine import AUTO_BATCH, batch_limits
from pipeline.encoder.model import pool
from pipeline.encoder.varlen import pack_batch
from tests.conftest import arrow_matrix, cosine_rows

OUTPUTS = (OutputSpec(name="emb_384", dim=384), OutputSpec(name="emb_128", dim=128),
           OutputSpec(name="emb_64", dim=64))


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(2)
    return Encoder(ModelConfig(), OUTPUTS)


def test_parity_with_sentence_transformers_every_column(encoder, demo_rows, st_reference):
    texts = pa.array([r["text"] for r in demo_rows])
    result = encoder.encode(texts)
    assert set(result.columns) == {"emb_384", "emb_128", "emb_64"}
    for spec in OUTPUTS:
        col = result.columns[spec.name]
        assert col.type == pa.list_(pa.float32(), spec.dim) and len(col) == len(demo_rows)
        ours = arrow_matrix(col)
        ref = st_reference[:, : spec.dim]  # truncate -> renormalize, the same way
        cos = cosine_rows(ours, ref)
        assert cos.min() >= 0.9999, (spec.name, cos.min())
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # auto on a CPU: the packed varlen path, which no linear layer pads
    assert encoder.runtime.attention == "varlen" and encoder.packed
    assert result.padding_efficiency == 1.0
    # batch limits left null: the CPU's
    assert (encoder.token_budget, encoder.max_batch_rows) == AUTO_BATCH["cpu"]


def test_batch_limits_by_device_and_config():
    assert batch_limits(ModelConfig(), "cuda:1") == AUTO_BATCH["cuda"]
    # never below one full-length row
    assert batch_limits(ModelConfig(max_length=8192), "cpu") == (8192, AUTO_BATCH["cpu"][1])
    assert batch_limits(ModelConfig(token_budget=512, max_batch_rows=8), "cuda:0") == (512, 8)


def test_rows_come_back_in_caller_order(encoder, demo_rows):
    texts = [r["text"] for r in demo_rows[:60]]
    forward = arrow_matrix(encoder.encode(texts).columns["emb_64"])
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = arrow_matrix(encoder.encode([texts[i] for i in perm]).columns["emb_64"])
    assert cosine_rows(shuffled, forward[perm]).min() >= 0.9999


def test_empty_batch_and_null_text(encoder):
    empty = encoder.encode([])
    assert all(len(c) == 0 for c in empty.columns.values())
    with pytest.raises(ValueError, match="null text"):
        encoder.encode(["fine", None])


# (config key, value, rows, min cosine vs sentence-transformers fp32): every attention
# backend that runs here at the fp32 threshold, the half precisions at theirs.
PARITY_CASES = [("attention", "eager", 64, 0.9999), ("attention", "sdpa", 64, 0.9999),
                ("attention", "varlen", 64, 0.9999),
                ("precision", "bf16", 32, 0.999), ("precision", "fp16", 32, 0.999)]


@pytest.mark.parametrize(("key", "value", "n", "threshold"), PARITY_CASES)
def test_backends_and_precisions_within_parity_threshold(key, value, n, threshold, demo_rows,
                                                         st_reference):
    enc = Encoder(ModelConfig(**{key: value}), OUTPUTS[:1])
    ours = arrow_matrix(enc.encode([r["text"] for r in demo_rows[:n]]).columns["emb_384"])
    assert getattr(enc.runtime, key) == value
    assert cosine_rows(ours, st_reference[:n]).min() >= threshold


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=300), max_size=400),
       budget=st.integers(min_value=256, max_value=5000),
       max_rows=st.integers(min_value=1, max_value=100))
def test_plan_batches_covers_each_row_once_within_budget(lengths, budget, max_rows):
    lengths = np.array(lengths, dtype=np.int64)
    batches = plan_batches(lengths, budget, max_rows)
    seen = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for idx in batches:
        assert 1 <= len(idx) <= max_rows
        # a batch over budget is allowed only as a single over-long row
        assert len(idx) * lengths[idx].max() <= budget or len(idx) == 1
    assert 0 < padding_efficiency(lengths, batches) <= 1.0 or not len(lengths)


@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=12), min_size=1, max_size=20))
def test_pad_batch_left_and_right(rows):
    lengths = np.array([len(r) for r in rows])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.array([t for r in rows for t in r])
    idx = np.arange(len(rows))[::-1]
    for left in (False, True):
        ids, mask = pad_batch(flat, offsets, lengths, idx, pad_id=0, left=left)
        for out_row, src in enumerate(idx):
            real = ids[out_row][mask[out_row] == 1].tolist()
            assert real == rows[src]
            pads = ids[out_row][mask[out_row] == 0].tolist()
            assert pads == [0] * (ids.shape[1] - len(rows[src]))


@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=12), min_size=1, max_size=20),
       st.randoms(use_true_random=False))
def test_pack_batch_concatenates_rows_with_restarting_positions(rows, rnd):
    lengths = np.array([len(r) for r in rows])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.array([t for r in rows for t in r])
    idx = np.array(rnd.sample(range(len(rows)), k=rnd.randint(1, len(rows))))
    ids, positions, cu = pack_batch(flat, offsets, lengths, idx)
    assert cu[0] == 0 and cu[-1] == len(ids) == lengths[idx].sum()
    for j, src in enumerate(idx):
        assert ids[cu[j]:cu[j + 1]].tolist() == rows[src]
        assert positions[cu[j]:cu[j + 1]].tolist() == list(range(len(rows[src])))


def test_fast_tokenize_gives_the_wrappers_ids_and_keeps_truncating(encoder, demo_rows):
    texts = [r["text"] for r in demo_rows[:200]] + ["word " * 2000, "", "ünï 🙂"]
    flat, offsets, lengths = encoder.tokenize(texts)
    ref = encoder.tokenizer(texts, truncation=True, max_length=encoder.cfg.max_length)
    assert [flat[o:o + n].tolist() for o, n in zip(offsets, lengths, strict=True)] == \
        ref["input_ids"]
    # the wrapper, called untruncated in between (as long-text chunking does),
    # re-sets the shared backend: the next tokenize still truncates
    encoder.tokenizer(texts[-3:], truncation=False)
    assert encoder.tokenize(texts[-3:])[2][0] == encoder.cfg.max_length


def test_last_token_pooling_left_and_right_padding_agree():
    torch.manual_seed(0)
    lengths = [5, 2, 7]
    width = max(lengths)
    states = [torch.randn(n, 4) for n in lengths]
    right = torch.zeros(3, width, 4)
    left = torch.zeros(3, width, 4)
    right_mask = torch.zeros(3, width, dtype=torch.long)
    left_mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(states):
        right[i, : len(s)] = s
        right_mask[i, : len(s)] = 1
        left[i, width - len(s):] = s
        left_mask[i, width - len(s):] = 1
    a = pool(right, right_mask, "last_token")
    b = pool(left, left_mask, "last_token")
    expected = torch.stack([s[-1] for s in states])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(pool(right, right_mask, "mean"),
                               torch.stack([s.mean(0) for s in states]))


def test_prefetch_overlaps_tokenizing_and_keeps_batch_order(encoder, demo_rows):
    texts = [r["text"] for r in demo_rows[:30]]
    batches = [pa.RecordBatch.from_arrays([pa.array(texts[i:i + 10])], names=["text"])
               for i in range(0, 30, 10)]
    seen = []
    for batch, prepared in encoder.prefetched(batches, lambda b: b.column("text")):
        assert prepared.n_rows == batch.num_rows
        seen.append(arrow_matrix(encoder.encode(prepared).columns["emb_64"]))
    direct = arrow_matrix(encoder.encode(texts).columns["emb_64"])
    assert cosine_rows(np.concatenate(seen), direct).min() >= 0.9999
    assert list(encoder.prefetched(iter([]))) == []
