"""The encoder core: a batch of texts in, a dict of output columns (Arrow) out.

Knows nothing of Spark. One forward pass per token-budget batch serves every
output column; rows come back in the caller's order.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from pipeline.config import ChunkingConfig, ModelConfig, OutputSpec
from pipeline.encoder import attention
from pipeline.encoder import chunking as chunker
from pipeline.encoder.backends import Backend, LoadRequest, TorchBackend
from pipeline.encoder.batching import pad_batch, padded_tokens, plan_batches
from pipeline.encoder.codec import quantize, to_arrow
from pipeline.encoder.cuts import Calibration, cut, needs_calibration, row_cosines
from pipeline.encoder.head import Head
from pipeline.encoder.model import (
    ModelInfo,
    inspect_model,
    pool,
    pool_packed,
    pool_spans,
    resolve,
    resolve_layer,
)
from pipeline.encoder.splade import SPLADE, SparseRows, SpladeHead, check_head
from pipeline.encoder.splade import to_arrow as sparse_arrow
from pipeline.encoder.stats import EncoderStats
from pipeline.encoder.varlen import pack_batch
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# model.token_budget / max_batch_rows when the config leaves them null, by device.
# CPU: measured with bench/encode.py --limit 1000 on 2 cores, engine / ST fp32:
# 2048/32 1.51x, 4096/64 1.56x, 16384/256 1.37x (big batches leave the caches).
# CUDA: a small model's forward is ~100 kernel launches whatever the batch, so
# a batch must carry ~1000 rows for the GPU, not the launches, to set the pace;
# a batch that does not fit is split by the out-of-memory retry.
AUTO_BATCH = {"cpu": (4096, 64), "cuda": (65536, 1024)}


def batch_limits(model_cfg: ModelConfig, device: str) -> tuple[int, int]:
    """(token budget, row cap) for this device: the config's, or AUTO_BATCH's."""
    budget, rows = AUTO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    return (max(model_cfg.max_length or 0, model_cfg.token_budget or budget),
            model_cfg.max_batch_rows or rows)


@dataclass
class ChunkRows:
    """Per output row of a chunked batch (chunking.mode split or late): which input
    document it is a passage of, and where in that document's text it lies."""

    doc: np.ndarray  # int64: the input row
    chunk_index: np.ndarray  # int32: 0.. within the document
    chunk_count: np.ndarray  # int32: the document's chunks
    char_start: np.ndarray  # int32: text[char_start:char_end] is the passage
    char_end: np.ndarray
    n_tokens: np.ndarray  # int32: the passage's own tokens (no special tokens, no prompt)


@dataclass
class Spans:
    """Late chunking: output row r is the mean of unit ``unit[r]``'s token states
    ``[start[r], end[r])`` (positions within the unit)."""

    unit: np.ndarray
    start: np.ndarray
    end: np.ndarray


@dataclass
class EncodeResult:
    columns: dict[str, pa.Array]
    n_tokens: np.ndarray  # tokens per row after truncation (prompt included)
    truncated: np.ndarray  # bool per row: the text reached max_length
    padding_efficiency: float
    seconds: float = 0.0
    chunks: ChunkRows | None = None  # chunked: the rows are passages (see ChunkRows)


@dataclass
class Prepared:
    """A tokenized batch: units (rows, or windows of chunked rows) ready to run."""

    n_rows: int
    flat: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    owner: np.ndarray
    weights: np.ndarray
    total: np.ndarray
    cut_off: np.ndarray
    chunks: ChunkRows | None = None  # chunking: the output rows are these passages
    spans: Spans | None = None  # late chunking: each output row's token span


@dataclass
class EncodeInfo:
    n_tokens: np.ndarray  # per row: tokens of the whole text (all windows when chunked)
    truncated: np.ndarray  # per row: text was cut (max_length, or past max_chunks)
    unit_lengths: np.ndarray  # per forward unit (row or window)
    batches: list
    chunks: ChunkRows | None = None


def utf8_clean(texts: Sequence[str]) -> list[str]:
    """Lone surrogates (possible in Python str, never in UTF-8 data) are not text the
    Rust tokenizer takes: replaced, as a UTF-8 decoder would (one character each, so
    character offsets still hold)."""
    return [t.encode("utf-8", "replace").decode("utf-8") for t in texts]


def flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token id lists -> (flat ids, row offsets, row lengths)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows), dtype=np.int64)
    if len(rows) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    # chain.from_iterable walks the rows in C: 2-3x a generator over tokens.
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                       count=int(lengths.sum()))
    return flat, offsets, lengths


def _chunk_rows(plans: list[list[chunker.Chunk]]) -> ChunkRows:
    counts = np.fromiter((len(p) for p in plans), dtype=np.int32, count=len(plans))
    flat = [c for p in plans for c in p]

    def column(values: Iterable[int]) -> np.ndarray:
        return np.fromiter(values, dtype=np.int32, count=len(flat))

    return ChunkRows(
        doc=np.repeat(np.arange(len(plans), dtype=np.int64), counts),
        chunk_index=np.concatenate([np.arange(k, dtype=np.int32) for k in counts])
        if len(plans) else np.zeros(0, np.int32),
        chunk_count=np.repeat(counts, counts),
        char_start=column(c.char_start for c in flat),
        char_end=column(c.char_end for c in flat),
        n_tokens=column(c.n_tokens for c in flat))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def validate_outputs(outputs: Sequence[OutputSpec], info: ModelInfo,
                     model_pooling: str | None = None) -> None:
    """Each column's dim fits the model's vector (after pooling and its Dense head) and
    its layer the model's depth."""
    num_layers = info.num_layers
    for i, spec in enumerate(outputs):
        if _check_kind(i, spec, info):
            continue
        width = info.output_dim(spec.pooling or model_pooling)
        if spec.dim > width:
            head = " after its Dense head" if info.modules.dense else ""
            raise ConfigError(f"outputs[{i}].dim", f"{spec.dim} is larger than the model's "
                              f"output dimension {width}{head} (column {spec.name!r})")
        dense = info.modules.dense
        pooled = info.hidden_size * len((spec.pooling or model_pooling or "mean").split("+"))
        if dense and pooled != dense[0].in_features:
            raise ConfigError(f"outputs[{i}].pooling", f"{spec.pooling} gives {pooled} "
                              f"features; the model's Dense head takes {dense[0].in_features} "
                              f"(column {spec.name!r})")
        if spec.layer is not None and not 1 <= resolve_layer(spec.layer, num_layers) <= num_layers:
            raise ConfigError(f"outputs[{i}].layer", f"{spec.layer} is beyond the model's depth "
                              f"of {num_layers} layers (allowed: 1..{num_layers} or "
                              f"-1..-{num_layers}; column {spec.name!r})")


def _check_kind(i: int, spec: OutputSpec, info: ModelInfo) -> bool:
    """A sparse column needs a SparseEncoder, a dense one a model that pools; True: sparse."""
    sparse = info.modules.splade is not None
    if spec.kind == "sparse" and not sparse:
        raise ConfigError(f"outputs[{i}].kind", f"sparse needs a sentence-transformers "
                          f"SparseEncoder (an MLM head and SpladePooling); {info.name} is a "
                          f"dense model (column {spec.name!r})")
    if spec.kind == "dense" and sparse:
        raise ConfigError(f"outputs[{i}].kind", f"{info.name} is a SparseEncoder: its vectors "
                          "are sparse over the vocabulary, not a dense cut; set kind: sparse "
                          f"(column {spec.name!r})")
    return sparse


def load_tokenizer(info: ModelInfo, trust_remote_code: bool = False) -> Any:
    """The Transformer module's tokenizer, as sentence-transformers sets it up
    (``do_lower_case``: a Lowercase normalizer in front of the model's own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.modules.transformer_dir),
                                        local_files_only=True,
                                        trust_remote_code=trust_remote_code,
                                        **info.modules.tokenizer_kwargs)
    backend = getattr(tok, "_tokenizer", None)
    if info.modules.do_lower_case and backend is not None:
        from tokenizers.normalizers import Lowercase
        from tokenizers.normalizers import Sequence as NormalizerSequence

        current = backend.normalizer
        if current is None or "Lowercase" not in repr(current) and \
                "lowercase=True" not in repr(current):
            rest: list[Any] = []
            if isinstance(current, NormalizerSequence):
                rest = list(cast(Any, current))
            elif current is not None:
                rest = [current]
            backend.normalizer = NormalizerSequence([Lowercase(), *rest])
    return tok


class Encoder:
    """Tokenizer + model + output specs, loaded once and reused for every batch."""

    def __init__(self, model_cfg: ModelConfig, outputs: Sequence[OutputSpec],
                 gpu_address: str | None = None, chunking: ChunkingConfig | None = None):
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker per load is noise in job logs
        self.info = inspect_model(model_cfg.name_or_path, model_cfg.allow_pickle)
        resolved = resolve(model_cfg, self.info)
        self.cfg, self.warnings = resolved.cfg, resolved.warnings
        self.max_length: int = self.cfg.max_length or 0
        self.pooling: str = self.cfg.pooling
        self.outputs = tuple(outputs)
        self.chunking = chunking if chunking is not None and chunking.enabled else None
        validate_outputs(self.outputs, self.info, self.pooling)
        device = attention.pick_device(model_cfg.device, gpu_address)
        if gpu_address is not None and device == "cpu":
            log.warning("GPU %s was assigned to this task but no CUDA device is visible: "
                        "encoding on the CPU (model.device: auto; cuda would fail)", gpu_address)
        precision = attention.pick_precision(model_cfg.precision, device)
        if device.startswith("cuda"):
            # The GPU waits on the tokenizer: let it use the otherwise idle cores,
            # as many as this worker's share (torch's thread count, which the Spark
            # adapter sets to cores / concurrent tasks), so that several GPU workers
            # on one node do not each start a thread per core. (On CPU the cores
            # belong to torch: Python workers x threads <= cores.)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            os.environ.setdefault("RAYON_NUM_THREADS", str(torch.get_num_threads()))
        self.tokenizer = load_tokenizer(self.info, model_cfg.trust_remote_code)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:  # decoder tokenizers often have none; the mask hides it anyway
            pad_id = self.tokenizer.eos_token_id or 0
        self.pad_id = int(pad_id)
        self.left_pad = getattr(self.tokenizer, "padding_side", "right") == "left"
        self._plan_layers()
        self.head = Head(self.info.modules, device)
        self.position_offset = 0  # until the model is loaded (the probe sets it first)
        self.splade: SpladeHead | None = None
        self.backend = self._load_backend(LoadRequest(
            path=self.info.modules.transformer_dir, attention=model_cfg.attention,
            precision=precision, device=device, trust_remote_code=model_cfg.trust_remote_code,
            extra=self.info.modules.model_kwargs, task=self.info.modules.transformer_task))
        self.runtime = self.backend.runtime
        # Running totals; a caller's share of them is ``after - before``. prepare() runs
        # on a prefetch thread, encode() on the caller's: one lock for both.
        self.stats = EncoderStats(runtime=frozenset({self.runtime.label}),
                                  gpus=frozenset({gpu_address}) if gpu_address else frozenset())
        self._stats_lock = threading.Lock()
        self.token_budget, self.max_batch_rows = batch_limits(self.cfg, device)
        if self.chunking is not None:
            chunker.check_fits(self.chunking, self.max_length, self.chunk_budget()[0],
                               self.info.window)
        self.backend.use_layers(self.info.num_layers, self.inner_layers, self.exit_layer)

    def _load_backend(self, req: LoadRequest) -> Backend:
        """The backend model.backend names (torch: its packed attention probed by
        :meth:`check_packed`; onnx, onnx-int8: pipeline.encoder.onnx)."""
        if self.cfg.backend == "torch":
            return TorchBackend.load(req, self._check_backend)
        if req.task == "fill-mask":
            raise ConfigError("model.backend", f"{self.cfg.backend} does not run SparseEncoders "
                              f"({self.info.name}); use model.backend: torch")
        from pipeline.encoder import onnx

        return onnx.OnnxBackend.load(self.cfg, req, self)

    @property
    def prompt(self) -> str:
        """The document prompt put before every text (resolved: never None)."""
        return self.cfg.prompt or ""

    @functools.cached_property
    def prompt_skip(self) -> int:
        """Leading tokens left out of pooling: the prompt's, where the model's Pooling
        says include_prompt: false (sentence-transformers' prompt length: the prompt
        tokenized with special tokens, less a trailing special token)."""
        if self.info.modules.include_prompt or not self.prompt:
            return 0
        ids = self.tokenizer(self.prompt)["input_ids"]
        return len(ids) - int(bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids))

    def _count(self, delta: EncoderStats) -> None:
        with self._stats_lock:
            self.stats += delta

    @property
    def packed(self) -> bool:
        """Batches run unpadded (rows concatenated, cu_seqlens): flash or varlen."""
        return self.backend.packed

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of what shapes the vectors (pipeline.encoder.model.fingerprint)."""
        from pipeline.encoder.model import fingerprint

        return fingerprint(self.info)

    @property
    def model(self) -> Any:
        """The torch model (torch backend)."""
        return getattr(self.backend, "model", None)

    def _plan_layers(self) -> None:
        """The (layer, pooling) groups the columns need, the shallower layers to capture,
        and the early-exit layer: when no column needs the last layer, the forward pass
        stops after the deepest needed block."""
        L = self.info.num_layers
        self.spec_group = {s.name: (L, SPLADE) if s.kind == "sparse" else
                           (resolve_layer(s.layer, L), s.pooling or self.pooling)
                           for s in self.outputs}
        self.groups = sorted(set(self.spec_group.values()))
        inner = sorted({layer for layer, _ in self.groups if layer < L})
        self.exit_layer = max(inner) if inner and max(layer for layer, _ in self.groups) < L \
            else None
        self.layers_run = self.exit_layer or L
        self.inner_layers = inner

    # ------------------------------------------------------------------ stages
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Texts -> (flat token ids, row offsets, row lengths); no padding yet."""
        if not texts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        prompt = self.prompt
        if prompt:
            texts = [prompt + t for t in texts]
        try:
            ids = self._token_ids(list(texts))
        except (TypeError, UnicodeError):
            ids = self._token_ids(utf8_clean(texts))
        return flatten(ids)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length, special tokens added.

        A fast tokenizer's Rust backend is called directly (``encode_batch_fast``:
        no offsets, no Python wrapper; ~1.5x the wrapper's speed, same ids); the
        wrapper serves tokenizers without one.
        """
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                  padding=False, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
        # The wrapper re-sets these on each of its own calls; so do we.
        backend.no_padding()
        backend.enable_truncation(self.max_length,
                                  direction=getattr(self.tokenizer, "truncation_side", "right"))
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]

    def prefetched(self, items: Iterable, texts_of: Callable = lambda item: item) -> Iterator:
        """Yield (item, prepared) with the NEXT item tokenized in a thread while the
        caller runs the model on the current one (CPU and model work overlap).

        ``texts_of(item)`` gives an item's texts (a Spark adapter passes Arrow
        record batches and their text column). The fast tokenizer releases the GIL.
        """
        from concurrent.futures import ThreadPoolExecutor

        items = iter(items)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            current = next(items, None)
            if current is None:
                return
            future = pool.submit(self.prepare, texts_of(current))
            while current is not None:
                following = next(items, None)
                prepared = future.result()
                if following is not None:
                    future = pool.submit(self.prepare, texts_of(following))
                yield current, prepared
                current = following

    @functools.cached_property
    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text ([CLS] / [SEP], BOS / EOS)."""
        probe = "hello world"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe)["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i], full[i + len(bare):]
        return [], []

    def chunk_long_rows(self, texts: Sequence[str], flat: np.ndarray, offsets: np.ndarray,
                        lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Split rows that hit max_length into overlapping windows (long_text: chunk).

        Returns (flat, offsets, lengths) over units (rows or windows), each unit's
        owner row and weight (its real tokens), and per row its total tokens and
        whether text was still cut (more than max_chunks windows).
        """
        n = len(lengths)
        owner = np.arange(n)
        weights = lengths.astype(np.float32)
        total, cut_off = lengths.copy(), lengths >= self.max_length
        long_rows = np.nonzero(cut_off)[0] if self.cfg.long_text == "chunk" else \
            np.zeros(0, dtype=np.int64)
        if not len(long_rows):
            return flat, offsets, lengths, owner, weights, total, cut_off
        tok = self.tokenizer
        prefix, suffix = self._special_tokens
        window = self.max_length - len(prefix) - len(suffix)
        stride = window - self.cfg.chunk_overlap
        prompt = self.prompt
        full = tok([prompt + texts[int(i)] for i in long_rows], add_special_tokens=False,
                   truncation=False, return_attention_mask=False)["input_ids"]
        keep = np.ones(n, dtype=bool)
        keep[long_rows] = False
        units = [flat[offsets[i]:offsets[i] + lengths[i]] for i in np.nonzero(keep)[0]]
        unit_owner = list(np.nonzero(keep)[0])
        unit_weight = list(lengths[keep].astype(np.float32))
        cut_off = np.zeros(n, dtype=bool)
        for row, ids in zip(long_rows, full, strict=True):
            starts = list(range(0, max(len(ids) - self.cfg.chunk_overlap, 1), stride))
            cut_off[row] = len(starts) > self.cfg.max_chunks
            for start in starts[: self.cfg.max_chunks]:
                piece = ids[start:start + window]
                units.append(np.asarray(prefix + list(piece) + suffix))
                unit_owner.append(row)
                unit_weight.append(float(len(piece)))
            total[row] = len(ids) + len(prefix) + len(suffix)
        lengths = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
        offsets = np.zeros(len(units), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return (np.concatenate(units).astype(np.int64), offsets, lengths,
                np.asarray(unit_owner), np.asarray(unit_weight, dtype=np.float32), total,
                cut_off)

    def forward(self, ids: np.ndarray, mask: np.ndarray, backend: Backend | None = None,
                spans: tuple[np.ndarray, ...] | None = None) -> dict[tuple[int, str], np.ndarray]:
        """One padded batch -> {(layer, pooling): pooled [B, H] float32 (numpy)}.

        ``spans`` (late chunking): (row in batch, start, end) per output row; each is
        the mean of that row's token states [start, end) instead of a row's pooling.
        """
        backend = backend or self.backend
        input_ids, attn = backend.to_device(ids, mask)
        kwargs = {}
        if self.left_pad:
            # Left padding shifts real tokens right: positions must come from the
            # mask, or the same text gets other position embeddings than unpadded.
            kwargs["position_ids"] = (attn.cumsum(1) - 1).clamp(min=0)
        skip = self.prompt_skip
        pooler = lambda h, mode: pool(h, attn, mode, skip)  # noqa: E731
        if spans is not None:
            width = ids.shape[1]
            row, lo, hi = spans
            base = row * width + ((width - mask[row].sum(1)) if self.left_pad else 0)
            starts, ends = backend.to_device(base + lo, base + hi)
            pooler = lambda h, mode: pool_spans(h.reshape(-1, h.shape[-1]), starts, ends)  # noqa: E731
        def tokens(h: Any) -> tuple[Any, Any, int]:
            real = attn.bool()
            return h[real], real.nonzero()[:, 0], int(h.shape[0])

        return self._pool(backend.hidden({"input_ids": input_ids, "attention_mask": attn,
                                          **kwargs}), pooler, tokens)

    def forward_packed(self, ids: np.ndarray, positions: np.ndarray, cu: np.ndarray,
                       backend: Backend | None = None,
                       spans: tuple[np.ndarray, ...] | None = None
                       ) -> dict[tuple[int, str], np.ndarray]:
        """One packed batch (no padding; rows delimited by ``cu``) -> as :meth:`forward`."""
        backend = backend or self.backend
        input_ids, position_ids, cu_dev = backend.to_device(ids[None], positions[None], cu)
        longest = int(np.diff(cu).max()) if len(cu) > 1 else 0
        skip = self.prompt_skip
        pooler = lambda h, mode: pool_packed(h[0], cu_dev, mode, skip)  # noqa: E731
        if spans is not None:
            row, lo, hi = spans
            base = cu[row].astype(np.int64)
            starts, ends = backend.to_device(base + lo, base + hi)
            pooler = lambda h, mode: pool_spans(h[0], starts, ends)  # noqa: E731
        def tokens(h: Any) -> tuple[Any, Any, int]:
            import torch

            lens = cu_dev[1:] - cu_dev[:-1]
            rows = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
            return h[0], rows, len(lens)

        return self._pool(backend.hidden(
            {"input_ids": input_ids, "position_ids": position_ids, "cu_seq_lens_q": cu_dev,
             "cu_seq_lens_k": cu_dev, "max_length_q": longest, "max_length_k": longest}),
            pooler, tokens)

    def _pool(self, hidden: dict[int, Any], pooler: Callable[[Any, str], Any],
              tokens: Callable[[Any], tuple[Any, Any, int]]) -> dict[tuple[int, str], Any]:
        """The captured layers' states -> pooled float32 (numpy) per (layer, pooling); a
        sparse column's group -> SparseRows (``tokens``: a batch's real token states, each
        one's row, and the rows)."""
        import torch

        out: dict[tuple[int, str], Any] = {}
        with torch.inference_mode():
            for layer, mode in self.groups:
                if mode == SPLADE:
                    assert self.splade is not None
                    out[(layer, mode)] = self.splade.pool(*tokens(hidden[layer]),
                                                          keep=self.sparse_keep)
                else:
                    out[(layer, mode)] = pooler(hidden[layer], mode).cpu().numpy()
        return out

    @functools.cached_property
    def sparse_keep(self) -> int | None:
        """Weights a batch keeps per row: the largest top-k the sparse columns ask for
        (None: one wants them all); each column prunes to its own after."""
        wanted = [self.sparse_k(s) for s in self.outputs if s.kind == "sparse"]
        return None if not wanted or None in wanted else max(k for k in wanted if k)

    def sparse_k(self, spec: OutputSpec) -> int | None:
        """A sparse column's top-k: its max_active_dims, else the model's own."""
        return spec.max_active_dims or self.info.modules.max_active_dims

    def _check_backend(self, backend: Backend) -> str | None:
        """A SparseEncoder's head is set up on the candidate backend and checked against
        its own masked-LM forward; then the packed check."""
        mlm = getattr(backend, "mlm", None)
        if mlm is not None:
            spec = self.info.modules.splade
            assert spec is not None
            self.splade = SpladeHead(mlm, spec, self.info.path)
            reason = self._check_splade(backend, mlm)
            if reason:
                return reason
        return self.check_packed(backend)

    def _check_splade(self, backend: Backend, mlm: Any) -> str | None:
        assert self.splade is not None
        backend.use_layers(self.info.num_layers, self.inner_layers, self.exit_layer)
        flat, offsets, lengths = self.tokenize(["a", "The quick brown fox jumps over it."])
        ids, mask = pad_batch(flat, offsets, lengths, np.arange(2), self.pad_id, self.left_pad)
        input_ids, attn = backend.to_device(ids, mask)
        inputs = {"input_ids": input_ids, "attention_mask": attn}
        states = backend.hidden(inputs)[self.info.num_layers]
        return check_head(self.splade, mlm, states, inputs)

    def check_packed(self, backend: Backend) -> str | None:
        """A packed backend must give what a padded batch gives, on this model, here.

        Run once at load on a few texts of unlike lengths: a model whose layers
        drop the packing arguments (or mis-position packed rows) is refused, and
        ``auto`` moves on to the padded backends.
        """
        if not backend.packed:
            return None
        backend.use_layers(self.info.num_layers, self.inner_layers, self.exit_layer)
        probe = ["a", "The quick brown fox jumps over the lazy dog. " * 6,
                 "Return the sum of a and b.", "Ünïcödé, 数字 and emoji 🙂 " * 3]
        flat, offsets, lengths = self.tokenize(probe)
        idx = np.arange(len(probe))
        self.position_offset = backend.position_offset()
        try:
            packed = self.forward_packed(*pack_batch(flat, offsets, lengths, idx,
                                                     self.position_offset), backend=backend)
            padded = self.forward(*pad_batch(flat, offsets, lengths, idx, self.pad_id,
                                             self.left_pad), backend=backend)
        except Exception as exc:  # noqa: BLE001 - any failure means "not this backend"
            return f"packed forward failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        floor = 0.9999 if backend.runtime.precision == "fp32" else 0.999
        for group, a in packed.items():
            b = padded[group]
            if isinstance(a, SparseRows):
                a, b = a.dense(), b.dense()
            cos = row_cosines(a, b)
            if not np.all(cos >= floor):
                return (f"packed rows differ from padded ones (min cosine {cos.min():.6f} < "
                        f"{floor}); the model does not keep packed rows apart")
        return None

    @functools.cached_property
    def _prompt_ids(self) -> list[int]:
        prompt = self.prompt
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []

    def document_tokens(self, texts: Sequence[str]) -> list[chunker.DocTokens]:
        """Each text's tokens with character offsets and word starts: no special tokens,
        no truncation (chunking needs the whole document)."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None:
            raise ConfigError("chunking.mode", "needs a fast tokenizer (character offsets); "
                              f"{type(self.tokenizer).__name__} has none")
        backend.no_padding()
        backend.no_truncation()
        try:
            encodings = backend.encode_batch(list(texts), add_special_tokens=False)
        except (TypeError, UnicodeError):  # lone surrogates: as tokenize() does
            encodings = backend.encode_batch(utf8_clean(texts), add_special_tokens=False)
        return [chunker.DocTokens.from_encoding(e) for e in encodings]

    def chunk_budget(self) -> tuple[int, int]:
        """(tokens around a chunk or macro-window: special tokens + prompt, the content
        tokens a unit of model.max_length holds)."""
        prefix, suffix = self._special_tokens
        around = len(prefix) + len(suffix) + len(self._prompt_ids)
        return around, self.max_length - around

    def prepare_chunks(self, texts: Sequence[str]) -> Prepared:
        """Documents -> passages: ``split`` makes each chunk a unit of its own; ``late``
        makes units of macro-windows and each chunk a token span of one of them."""
        assert self.chunking is not None
        cfg = self.chunking
        prefix, suffix = self._special_tokens
        head = prefix + self._prompt_ids
        docs = self.document_tokens(texts)
        plans = [chunker.plan_chunks(t, d, cfg) for t, d in zip(texts, docs, strict=True)]
        units: list[list[int]] = []
        spans: list[tuple[int, int, int]] = []  # late: (unit, start, end) per passage
        for doc, chunks in zip(docs, plans, strict=True):
            ids = doc.ids.tolist()
            if cfg.mode == "split":
                units += [head + ids[c.start:c.end] + suffix for c in chunks]
            else:
                spans += self._late_units(ids, chunks, head, suffix, units)
        rows = _chunk_rows(plans)
        flat, offsets, lengths = flatten(units)
        n = len(rows.doc)
        late = None
        if cfg.mode == "late":
            table = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
            late = Spans(table[:, 0], table[:, 1], table[:, 2])
        return Prepared(n, flat, offsets, lengths, owner=np.arange(len(units)),
                        weights=lengths.astype(np.float32), total=rows.n_tokens.astype(np.int64),
                        cut_off=np.zeros(n, dtype=bool), chunks=rows, spans=late)

    @functools.cached_property
    def _late_window(self) -> tuple[int, int]:
        """Late chunking: (document tokens a macro-window holds, left context it gives)."""
        assert self.chunking is not None
        _, room = self.chunk_budget()
        return room, chunker.late_context(room, self.chunking.max_tokens)

    def _late_units(self, ids: list[int], chunks: list[chunker.Chunk], head: list[int],
                    suffix: list[int], units: list[list[int]]) -> list[tuple[int, int, int]]:
        """Append one document's macro-windows to ``units``; return each passage's span
        (unit, start, end) in unit positions (past the special tokens and prompt)."""
        windows, owner = chunker.macro_windows(chunks, len(ids), *self._late_window)
        first = len(units)
        units += [head + ids[a:b] + suffix for a, b in windows]
        spans = []
        for c, w in zip(chunks, owner, strict=True):
            a = windows[w][0]
            if c.end > c.start:
                spans.append((first + w, len(head) + c.start - a, len(head) + c.end - a))
            else:  # a text of no tokens: its unit's own mean
                spans.append((first + w, 0, len(units[first + w])))
        return spans

    def prepare(self, texts: Sequence[str] | pa.Array) -> Prepared:
        """CPU stage: tokenize (and chunk) a batch. Thread-safe to run ahead of
        :meth:`encode` on the previous batch: the fast tokenizer releases the GIL."""
        rows = texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
        if any(t is None for t in rows):
            raise ValueError("encode() got a null text; quarantine nulls before encoding")
        strings = cast("Sequence[str]", rows)
        start, cpu = time.perf_counter(), time.thread_time()
        if self.chunking is not None:
            prepared = self.prepare_chunks(strings)
        else:
            flat, offsets, lengths = self.tokenize(strings)
            units = self.chunk_long_rows(strings, flat, offsets, lengths)
            prepared = Prepared(len(strings), flat=units[0], offsets=units[1],
                                lengths=units[2], owner=units[3], weights=units[4],
                                total=units[5], cut_off=units[6])
        self._count(EncoderStats(prepare_seconds=time.perf_counter() - start,
                                 cpu_seconds=time.thread_time() - cpu))
        return prepared

    def encode_float(self, texts: Sequence[str] | pa.Array | Prepared,
                     calibration: Calibration | None = None, pca: str = "project"
                     ) -> tuple[dict[str, Any], EncodeInfo]:
        """Texts (or a prepared batch) -> ({column: float32 [N, dim], or SparseRows}, info).

        ``info``: per-row tokens and cut-off flags, and the unit lengths and
        batches (for padding statistics). ``reduce: pca`` columns use the
        projections in ``calibration``; ``pca`` (see ``cuts.cut``) asks for the
        full pooled vector (to fit one) or a truncation (the canary) instead.
        """
        prep = texts if isinstance(texts, Prepared) else self.prepare(texts)
        vectors, batches = self.vectors(prep)
        projections = calibration.projections if calibration else {}
        floats = {s.name: vectors[self.spec_group[s.name]].prune(self.sparse_k(s), s.min_weight)
                  if s.kind == "sparse" else
                  cut(vectors[self.spec_group[s.name]], s, projections.get(s.name), pca)
                  for s in self.outputs}
        return floats, EncodeInfo(n_tokens=prep.total, truncated=prep.cut_off,
                                  unit_lengths=prep.lengths, batches=batches,
                                  chunks=prep.chunks)

    def vectors(self, prep: Prepared) -> tuple[dict[tuple[int, str], Any], list]:
        """The model's vectors of a prepared batch, per (layer, pooling): pooled per unit
        (or span, late chunking), through the model's head (Dense, Normalize), and for
        long_text: chunk the token-weighted mean of a row's windows; and the batches."""
        n_rows, lengths = prep.n_rows, prep.lengths
        batches = plan_batches(lengths, self.token_budget, self.max_batch_rows)
        vectors = {group: units if group[1] == SPLADE else self.head.apply(units)
                   for group, units in self._pooled(prep, batches).items()}
        if prep.spans is None and len(lengths) != n_rows:  # long_text chunk: window mean
            owner, weights = prep.owner, prep.weights
            row_weight = np.bincount(owner, weights=weights, minlength=n_rows)[:, None]
            for group, units in vectors.items():
                rows = np.zeros((n_rows, units.shape[1]), dtype=np.float64)
                np.add.at(rows, owner, units * weights[:, None])
                vectors[group] = (rows / row_weight).astype(np.float32)
        return vectors, batches

    def _pooled(self, prep: Prepared, batches: list) -> dict[tuple[int, str], Any]:
        """Every batch through the model, pooled per unit (late: per span); a batch that
        runs out of memory is halved and both halves retried."""
        lengths = prep.lengths
        n = len(lengths)
        # late chunking pools spans (one per output row), else each unit is pooled
        width = prep.n_rows if prep.spans is not None else n
        pooled: dict[tuple[int, str], Any] = {
            g: [None] * width if g[1] == SPLADE else
            np.empty((width, self.info.hidden_size * len(g[1].split("+"))), dtype=np.float32)
            for g in self.groups}
        where = np.full(n, -1, dtype=np.int64)  # a unit's row in the current batch
        pending = list(reversed(batches))
        while pending:
            idx = pending.pop()
            where[idx] = np.arange(len(idx))
            targets = idx if prep.spans is None else np.nonzero(where[prep.spans.unit] >= 0)[0]
            try:
                out = self._forward_units(prep, idx, where, targets)
            except Exception as exc:
                where[idx] = -1
                if not is_out_of_memory(exc) or len(idx) == 1:
                    raise
                # Halve the batch and retry both halves; later batches of this
                # encoder plan with half the budget. No row is lost or repeated.
                self._count(EncoderStats(oom_splits=1))
                self.token_budget = max(self.max_length, self.token_budget // 2)
                log.warning("out of memory on a batch of %d rows x %d tokens: splitting it, "
                            "token budget now %d", len(idx), int(lengths[idx].max()),
                            self.token_budget)
                self.backend.free_cache()
                half = len(idx) // 2
                pending += [idx[half:], idx[:half]]
                continue
            where[idx] = -1
            for group, vecs in out.items():
                if isinstance(vecs, SparseRows):  # a list of (ids, weights) per unit
                    for slot, target in enumerate(targets):
                        pooled[group][target] = vecs.row(slot)
                else:
                    pooled[group][targets] = vecs
        return {g: SparseRows.from_rows(v, self.info.vocab_size) if g[1] == SPLADE else v
                for g, v in pooled.items()}

    @property
    def model_group(self) -> tuple[int, str]:
        """(last layer, the model's pooling): the vector sentence-transformers returns."""
        return self.info.num_layers, SPLADE if self.splade is not None else self.pooling

    @property
    def has_model_vectors(self) -> bool:
        """Whether :meth:`model_vectors` can run: a column at the last layer with the
        model's pooling, and plain rows (no passages, no window means)."""
        return (self.chunking is None and self.cfg.long_text == "truncate"
                and self.model_group in self.groups and self.exit_layer is None)

    def model_vectors(self, texts: Sequence[str]) -> np.ndarray | None:
        """The model's own vectors (last layer, its pooling and head) of plain rows, as
        sentence-transformers' encode returns them; None where this encoder does not
        compute them (see :attr:`has_model_vectors`)."""
        if not self.has_model_vectors:
            return None
        vectors, _ = self.vectors(self.prepare(texts))
        found = vectors[self.model_group]
        return found.dense() if isinstance(found, SparseRows) else found

    def _forward_units(self, prep: Prepared, idx: np.ndarray, where: np.ndarray,
                       targets: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
        """One batch of units through the model: pooled per unit, or (late chunking)
        per span of the output rows ``targets``."""
        flat, offsets, lengths = prep.flat, prep.offsets, prep.lengths
        spans = None
        if prep.spans is not None:
            s = prep.spans
            spans = (where[s.unit[targets]], s.start[targets], s.end[targets])
        if self.packed:
            return self.forward_packed(*pack_batch(flat, offsets, lengths, idx,
                                                   self.position_offset), spans=spans)
        return self.forward(*pad_batch(flat, offsets, lengths, idx, self.pad_id,
                                       self.left_pad), spans=spans)

    def encode(self, texts: Sequence[str] | pa.Array | Prepared,
               calibration: Calibration | None = None) -> EncodeResult:
        """Encode texts; every output column in the caller's row order.

        ``calibration``: the int8/uint8 ranges of the output table (needed when a
        column is int8/uint8). An argument, not encoder state: one cached encoder
        serves runs into tables with other ranges.
        """
        missing = [s.name for s in needs_calibration(self.outputs)
                   if calibration is None or s.name not in calibration.ranges]
        if missing:
            raise ValueError(f"int8/uint8 columns {missing} need calibration ranges")
        start, cpu = time.perf_counter(), time.thread_time()
        floats, info = self.encode_float(texts, calibration)
        columns = {s.name: sparse_arrow(floats[s.name], s.dtype) if s.kind == "sparse" else
                   to_arrow(quantize(floats[s.name], s, calibration), s)
                   for s in self.outputs}
        lengths = info.unit_lengths
        real = int(lengths.sum())
        # Packed batches: no linear layer sees a padded token.
        padded = real if self.packed else padded_tokens(lengths, info.batches)
        elapsed = time.perf_counter() - start
        self._count(EncoderStats(rows=len(lengths), tokens=real, padded_tokens=padded,
                                 batches=len(info.batches), seconds=elapsed,
                                 cpu_seconds=time.thread_time() - cpu))
        return EncodeResult(columns=columns, n_tokens=info.n_tokens, truncated=info.truncated,
                            padding_efficiency=real / padded if padded else 1.0,
                            seconds=elapsed, chunks=info.chunks)
