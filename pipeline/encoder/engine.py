"""The encoder core: a batch of texts in, a dict of output columns (Arrow) out.

Knows nothing of Spark. One forward pass per token-budget batch serves every
output column; rows come back in the caller's order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder import attention
from pipeline.encoder.batching import pad_batch, padding_efficiency, plan_batches
from pipeline.encoder.model import inspect_model, pool
from pipeline.errors import ConfigError
from pipeline.outputs import cut, to_arrow

log = logging.getLogger(__name__)


@dataclass
class EncodeResult:
    columns: dict[str, pa.Array]
    n_tokens: np.ndarray  # tokens per row after truncation (prompt included)
    truncated: np.ndarray  # bool per row: the text reached max_length
    padding_efficiency: float
    seconds: float = 0.0


@dataclass
class EncoderStats:
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def validate_outputs(outputs: Sequence[OutputSpec], hidden_size: int) -> None:
    for i, spec in enumerate(outputs):
        if spec.dim > hidden_size:
            raise ConfigError(f"outputs[{i}].dim", f"{spec.dim} is larger than the model's "
                              f"hidden size {hidden_size} (column {spec.name!r})")


class Encoder:
    """Tokenizer + model + output specs, loaded once and reused for every batch."""

    def __init__(self, model_cfg: ModelConfig, outputs: Sequence[OutputSpec],
                 gpu_address: str | None = None):
        import torch
        from transformers import AutoTokenizer

        self.cfg = model_cfg
        self.outputs = tuple(outputs)
        self.info = inspect_model(model_cfg.name_or_path, model_cfg.allow_pickle)
        validate_outputs(self.outputs, self.info.hidden_size)
        device = attention.pick_device(model_cfg.device, gpu_address)
        precision = attention.pick_precision(model_cfg.precision, device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(self.info.path), local_files_only=True,
            trust_remote_code=model_cfg.trust_remote_code)
        self.model, backend = attention.load_model(
            self.info.path, model_cfg.attention, precision, device,
            trust_remote_code=model_cfg.trust_remote_code)
        self.runtime = attention.Runtime(device=device, precision=precision, attention=backend)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:  # decoder tokenizers often have none; the mask hides it anyway
            pad_id = self.tokenizer.eos_token_id or 0
        self.pad_id = int(pad_id)
        self.left_pad = getattr(self.tokenizer, "padding_side", "right") == "left"
        self.stats = EncoderStats()
        self._torch = torch

    # ------------------------------------------------------------------ stages
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Texts -> (flat token ids, row offsets, row lengths); no padding yet."""
        if not texts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        prompt = self.cfg.prompt
        if prompt:
            texts = [prompt + t for t in texts]
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length,
                             padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
        ids = enc["input_ids"]
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids), dtype=np.int64)
        if len(ids) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        flat = (np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(lengths.sum()))
                if len(ids) else np.zeros(0, dtype=np.int64))
        return flat, offsets, lengths

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One padded batch -> pooled [B, H] float32 (numpy)."""
        torch = self._torch
        device = self.runtime.device
        input_ids = torch.from_numpy(ids).to(device, non_blocking=True)
        attn = torch.from_numpy(mask).to(device, non_blocking=True)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attn)
            pooled = pool(out.last_hidden_state, attn, self.cfg.pooling)
        return pooled.cpu().numpy()

    def encode(self, texts: Sequence[str] | pa.Array) -> EncodeResult:
        """Encode texts; every output column in the caller's row order."""
        start = time.perf_counter()
        if isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = texts.to_pylist()
        if any(t is None for t in texts):
            raise ValueError("encode() got a null text; quarantine nulls before encoding")
        n = len(texts)
        flat, offsets, lengths = self.tokenize(texts)
        batches = plan_batches(lengths, self.cfg.token_budget, self.cfg.max_batch_rows)
        pooled_all = np.empty((n, self.info.hidden_size), dtype=np.float32)
        for idx in batches:
            ids, mask = pad_batch(flat, offsets, lengths, idx, self.pad_id, self.left_pad)
            pooled_all[idx] = self.forward(ids, mask)
        columns = {spec.name: to_arrow(cut(pooled_all, spec), spec) for spec in self.outputs}
        efficiency = padding_efficiency(lengths, batches)
        elapsed = time.perf_counter() - start
        self._account(lengths, batches, elapsed)
        return EncodeResult(columns=columns, n_tokens=lengths,
                            truncated=lengths >= self.cfg.max_length,
                            padding_efficiency=efficiency, seconds=elapsed)

    def _account(self, lengths: np.ndarray, batches: list[np.ndarray], seconds: float) -> None:
        s = self.stats
        s.rows += len(lengths)
        s.tokens += int(lengths.sum())
        s.padded_tokens += sum(int(lengths[i].max()) * len(i) for i in batches)
        s.batches += len(batches)
        s.seconds += seconds
