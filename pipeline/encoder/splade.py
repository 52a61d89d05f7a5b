"""Sparse (SPLADE) vectors: a SparseEncoder's MLM head and SpladePooling, run in bounded memory.

sentence-transformers' SparseEncoder computes ``log(1 + relu(logits))`` over the
MLM head's vocabulary logits of every token and max- (or sum-) pools them over
the sequence. The logits of a batch are tokens x vocabulary (30,522 wide for
BERT vocabularies: 4,096 tokens are 500 MB in float32), so here the head's
transform runs once per batch, its decoder (hidden -> vocabulary) in blocks of
tokens, and each block is folded into the rows' pooled vectors at once: peak
memory is one block of logits plus one batch's pooled rows, whatever the
sequence length.

Rows leave as :class:`SparseRows` (CSR: ascending vocabulary ids per row and
their weights), pruned to the column's top-k (``max_active_dims``) as
``SparseEncoder.encode(max_active_dims=k)`` prunes.

The query side of an inference-free model (a Router whose query route is a
SparseStaticEmbedding) is a lookup: each distinct token of the query (no special
tokens) gets its static weight (:class:`StaticQuery`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encoder.stack import SpladeSpec
from pipeline.errors import ModelError

SPLADE = "splade"  # the engine's pooling name of a sparse column's group
# Logits computed at once: tokens x vocabulary floats (32 MB). A BERT vocabulary
# gives blocks of ~270 tokens; the benchmark reports the peak (bench/sparse.py).
LOGIT_BLOCK_FLOATS = 1 << 23


@dataclass
class SparseRows:
    """Rows of sparse vectors, CSR: row r is ``indices[offsets[r]:offsets[r+1]]`` (ascending
    vocabulary ids) with the same slice of ``values``."""

    indices: np.ndarray  # int32
    values: np.ndarray  # float32
    offsets: np.ndarray  # int64 [n + 1]
    width: int  # the vocabulary

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]], width: int) -> SparseRows:
        lengths = np.fromiter((len(i) for i, _ in rows), np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not rows:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), offsets, width)
        return cls(np.concatenate([i for i, _ in rows]).astype(np.int32, copy=False),
                   np.concatenate([v for _, v in rows]).astype(np.float32, copy=False),
                   offsets, width)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[r], self.offsets[r + 1]
        return self.indices[a:b], self.values[a:b]

    def take(self, rows: np.ndarray) -> SparseRows:
        return SparseRows.from_rows([self.row(int(r)) for r in rows], self.width)

    def dense(self) -> np.ndarray:
        """[n, width] float32 (for cosines of a few rows: the canary, tests)."""
        out = np.zeros((len(self), self.width), np.float32)
        rows = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        out[rows, self.indices] = self.values
        return out

    def active(self) -> np.ndarray:
        """Active dimensions per row."""
        return np.diff(self.offsets)

    def prune(self, k: int | None, min_weight: float = 0.0) -> SparseRows:
        """Each row's top ``k`` weights (None: all), those >= ``min_weight``; ids ascending."""
        if k is None and min_weight <= 0:
            return self
        rows = []
        for r in range(len(self)):
            idx, val = self.row(r)
            keep = val >= min_weight if min_weight > 0 else np.ones(len(val), bool)
            idx, val = idx[keep], val[keep]
            if k is not None and len(val) > k:
                top = np.sort(np.argpartition(-val, k - 1)[:k])
                idx, val = idx[top], val[top]
            rows.append((idx, val))
        return SparseRows.from_rows(rows, self.width)


def to_arrow(rows: SparseRows, dtype: str) -> pa.Array:
    """The stored column: struct<indices: list<int32>, values: list<float32> | binary>
    (float16 weights as little-endian bytes, as dense float16 columns are: Spark has no
    half-float type)."""
    offsets = pa.array(rows.offsets.astype(np.int32), pa.int32())
    indices = pa.ListArray.from_arrays(offsets, pa.array(rows.indices, pa.int32()))
    if dtype == "float16":
        data = rows.values.astype("<f2").view(np.uint8)
        values: pa.Array = pa.Array.from_buffers(
            pa.binary(), len(rows), [None, pa.array(offsets.to_numpy() * 2).buffers()[1],
                                     pa.array(data).buffers()[1]])
    else:
        values = pa.ListArray.from_arrays(offsets, pa.array(rows.values, pa.float32()))
    return pa.StructArray.from_arrays([indices, values], names=["indices", "values"])


def arrow_type(dtype: str) -> pa.DataType:
    values = pa.binary() if dtype == "float16" else pa.list_(pa.float32())
    return pa.struct([("indices", pa.list_(pa.int32())), ("values", values)])


def from_cells(cells: Sequence[Any], dtype: str, width: int) -> SparseRows:
    """Stored cells (dicts or Rows with indices / values, as Spark and pyarrow give them)
    -> SparseRows."""
    rows = []
    for cell in cells:
        get = cell.get if isinstance(cell, dict) else cell.__getitem__
        idx = np.asarray(get("indices"), np.int32)
        raw: Any = get("values")
        val = np.frombuffer(bytes(raw), "<f2").astype(np.float32) if dtype == "float16" \
            else np.asarray(raw, np.float32)
        rows.append((idx, val))
    return SparseRows.from_rows(rows, width)


def from_arrow(column: pa.Array | pa.ChunkedArray, dtype: str, width: int) -> SparseRows:
    """A stored column's Arrow batch -> SparseRows (no per-row Python for float32)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if dtype == "float16":
        return from_cells(column.to_pylist(), dtype, width)
    struct: Any = column
    indices, values = struct.field("indices"), struct.field("values")
    offsets = indices.offsets.to_numpy().astype(np.int64)
    flat_i = indices.values.to_numpy()[offsets[0]:offsets[-1]]
    # the two lists are arrays of their own: each is sliced by its own offsets
    value_offsets = values.offsets.to_numpy()
    flat_v = values.values.to_numpy()[value_offsets[0]:value_offsets[-1]]
    return SparseRows(flat_i.astype(np.int32), flat_v.astype(np.float32),
                      offsets - offsets[0], width)


# --------------------------------------------------------------------------- the MLM head


def _family_transform(mlm: Any) -> Callable[[Any], Any] | None:
    """The MLM head of ``mlm`` up to its decoder (hidden -> hidden), by family; None when
    the engine does not know the family's head."""
    if hasattr(mlm, "cls") and hasattr(mlm.cls, "predictions"):  # BERT and its kin
        return mlm.cls.predictions.transform
    head = getattr(mlm, "lm_head", None)
    if head is not None and hasattr(head, "dense") and hasattr(head, "layer_norm"):
        gelu = getattr(sys.modules[type(head).__module__], "gelu", None)  # RoBERTa, XLM-R, MPNet
        if gelu is not None:
            return lambda x: head.layer_norm(gelu(head.dense(x)))
    if hasattr(mlm, "vocab_transform"):  # DistilBERT
        return lambda x: mlm.vocab_layer_norm(mlm.activation(mlm.vocab_transform(x)))
    if hasattr(mlm, "head") and hasattr(mlm, "decoder"):  # ModernBERT
        return mlm.head
    return None


class SpladeHead:
    """The MLM head's transform and decoder of a SparseEncoder, and its SpladePooling."""

    def __init__(self, mlm: Any, spec: SpladeSpec, path: Path):
        transform = _family_transform(mlm)
        decoder = mlm.get_output_embeddings()
        if transform is None or decoder is None:
            raise ModelError(f"the masked-LM head of {path} ({mlm.config.model_type}) is not "
                             "one the engine runs (BERT, DistilBERT, RoBERTa, XLM-R, MPNet, "
                             "ModernBERT heads); nothing was encoded")
        self.transform = transform
        self.weight = decoder.weight  # [V, H]
        self.bias = decoder.bias
        self.spec = spec
        self.width = int(self.weight.shape[0])
        self.block = max(1, LOGIT_BLOCK_FLOATS // self.width)
        self.peak_block_bytes = 0  # the largest logits block computed (the benchmark's)

    def activate(self, logits: Any) -> Any:
        x = logits.relu_().log1p_()
        return x.log1p_() if self.spec.activation == "log1p_relu" else x

    def pool(self, states: Any, rows: Any, n_rows: int, keep: int | None) -> SparseRows:
        """Token states [N, H] of ``n_rows`` rows (``rows``: each token's row) -> each row's
        pooled SPLADE vector, its top ``keep`` weights (None: every nonzero one)."""
        import torch

        with torch.inference_mode():
            features = self.transform(states.to(self.weight.dtype))
            pooled = features.new_zeros((n_rows, self.width), dtype=torch.float32)
            for start in range(0, features.shape[0], self.block):
                logits = torch.nn.functional.linear(features[start:start + self.block],
                                                    self.weight, self.bias).float()
                self.peak_block_bytes = max(self.peak_block_bytes,
                                            logits.numel() * logits.element_size())
                weights = self.activate(logits)
                row = rows[start:start + self.block]
                if self.spec.strategy == "max":  # weights >= 0: zeros are max's identity
                    pooled.scatter_reduce_(0, row[:, None].expand_as(weights), weights, "amax")
                else:
                    pooled.index_add_(0, row, weights)
            return _sparse_rows(pooled, keep)


def _sparse_rows(pooled: Any, keep: int | None) -> SparseRows:
    """Dense pooled [B, V] (torch) -> SparseRows of each row's top ``keep`` nonzero weights."""
    import torch

    width = int(pooled.shape[1])
    if keep is not None and keep < width:
        values, ids = torch.topk(pooled, keep, dim=1)
        ids, order = torch.sort(ids, dim=1)
        values = torch.gather(values, 1, order)
    else:
        ids = torch.arange(width, device=pooled.device).expand_as(pooled)
        values = pooled
    nonzero = values > 0
    counts = nonzero.sum(1).cpu().numpy()
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SparseRows(ids[nonzero].to(torch.int32).cpu().numpy(),
                      values[nonzero].cpu().numpy().astype(np.float32, copy=False),
                      offsets, width)


def check_head(head: SpladeHead, mlm: Any, base_states: Any, inputs: dict[str, Any]) -> str | None:
    """Our transform + decoder must give the model's own logits (its full masked-LM forward)
    on a probe batch; a reason to refuse it otherwise."""
    import torch

    with torch.inference_mode():
        full = mlm(**inputs).logits.float()
        ours = torch.nn.functional.linear(head.transform(base_states), head.weight,
                                          head.bias).float()
    mask = inputs["attention_mask"].bool()
    diff = float((full[mask] - ours[mask]).abs().max())
    scale = float(full[mask].abs().max()) or 1.0
    if diff > 1e-3 * scale:
        return f"its masked-LM head computed apart gives other logits (max |diff| {diff:.3g})"
    return None


# --------------------------------------------------------------------------- the query side


class StaticQuery:
    """An inference-free model's query encoder: SparseStaticEmbedding's weight of each
    distinct token of the query (its own tokenizer, no special tokens, truncated)."""

    def __init__(self, spec: SpladeSpec):
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        assert spec.query_weights is not None and spec.query_tokenizer is not None
        self.weight = next(iter(load_file(str(spec.query_weights)).values())).astype(np.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.query_tokenizer),
                                                       local_files_only=True)

    def encode(self, texts: Sequence[str], prompt: str = "") -> SparseRows:
        ids = self.tokenizer([prompt + t for t in texts], add_special_tokens=False,
                             truncation=True)["input_ids"]
        rows = []
        for row in ids:
            idx = np.unique(np.asarray(row, np.int64)).astype(np.int32)
            val = self.weight[idx]
            nz = val != 0
            rows.append((idx[nz], val[nz]))
        return SparseRows.from_rows(rows, len(self.weight))
