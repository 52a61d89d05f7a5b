"""Parity with sentence-transformers, proven for the model at hand.

The tests cover the families we know; the next model a user brings may hold a
module nobody tried. So the first run of a table (and ``embed validate
--parity``) encodes a slice of the canary texts, the long ones included,
through the engine and through sentence-transformers itself, on the same
device in the same precision, and compares row by row. Below the threshold
(0.9999 in fp32, 0.999 in bf16/fp16) the model is refused: a table is never
made of vectors that differ from the library's.

The reference is the library's own ``SentenceTransformer`` loaded from the
directory, set to what the engine resolved (max length, pooling, prompt), so
an explicit config value that differs from the model's checks the engine's
implementation of it too. Where sentence-transformers cannot load the
directory, the reference is transformers' own forward pass (eager attention,
padded) with sentence-transformers' Pooling module, and the result says so.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder.cuts import row_cosines
from pipeline.errors import ModelError

if TYPE_CHECKING:
    from pipeline.encoder.engine import Encoder
    from pipeline.encoder.model import ModelInfo

log = logging.getLogger(__name__)
ROWS = 32
LONGEST = 8  # of the ROWS, the longest canary texts (past max_length: truncation checked)
# the engine's precision -> the min cosine it must reach against sentence-transformers
# (int8: the onnx-int8 backend against the library in fp32)
FLOORS = {"fp32": 0.9999, "bf16": 0.999, "fp16": 0.999, "int8": 0.97}
Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class ParityResult:
    status: Status
    reference: str = ""  # what the engine was compared with
    rows: int = 0
    min_cosine: float = math.nan
    mean_cosine: float = math.nan
    threshold: float = math.nan
    runtime: str = ""
    cause: str = ""  # failed: the likeliest cause it could tell
    worst_row: int = -1

    def summary(self) -> str:
        if self.status == "skipped":
            return "skipped (model.parity_check: false)"
        verdict = "passed" if self.status == "passed" else "FAILED"
        text = (f"{verdict}: min cosine {self.min_cosine:.6f} (mean {self.mean_cosine:.6f}, "
                f"threshold {self.threshold}) against {self.reference} on {self.rows} canary "
                f"texts, {self.runtime}")
        return text + (f"; likeliest cause: {self.cause}" if self.cause else "")

    def to_json(self) -> str:
        return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                           for k, v in asdict(self).items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ParityResult:
        data: dict[str, Any] = json.loads(text)
        floats = ("min_cosine", "mean_cosine", "threshold")
        fields: dict[str, Any] = {k: (math.nan if v is None and k in floats else v)
                                  for k, v in data.items()}
        return cls(**fields)


SKIPPED = ParityResult(status="skipped")


def canary_slice(texts: Sequence[str], rows: int = ROWS) -> list[str]:
    """``rows`` of the canary texts: the LONGEST longest, and the rest spread evenly
    over the set (code, numbers, ten languages), in the set's order."""
    if len(texts) <= rows:
        return list(texts)
    by_length = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    chosen = set(by_length[:LONGEST])
    others = [i for i in range(len(texts)) if i not in chosen]
    step = len(others) / (rows - LONGEST)
    chosen |= {others[int(k * step)] for k in range(rows - LONGEST)}
    return [texts[i] for i in sorted(chosen)]


def parity_outputs(info: ModelInfo, pooling: str | None = None) -> tuple[OutputSpec, ...]:
    """The one column a dedicated parity encoder computes: the model's whole vector (a
    SparseEncoder's: its sparse vector, the model's own top-k)."""
    if info.modules.sparse:
        return (OutputSpec(name="parity", kind="sparse"),)
    return (OutputSpec(name="parity", dim=info.output_dim(pooling), normalize=False),)


def check_model(model: ModelConfig, texts: Sequence[str]) -> ParityResult:
    """Load the engine for ``model`` (resolved) and check it (no Spark)."""
    from pipeline.encoder.engine import Encoder
    from pipeline.encoder.model import inspect_model

    info = inspect_model(model.name_or_path, model.allow_pickle)
    pooling = None if model.pooling == "auto" else model.pooling
    return check(Encoder(model, parity_outputs(info, pooling)), texts)


def check(encoder: Encoder, texts: Sequence[str]) -> ParityResult:
    """The engine's vectors of ``texts`` against the reference's, row by row."""
    ours = encoder.model_vectors(list(texts))
    if ours is None:
        raise ValueError("this encoder does not compute the model's own vector")
    theirs, reference = reference_vectors(encoder, texts, encoder.prompt)
    cos = row_cosines(ours, theirs)
    floor = FLOORS[encoder.runtime.precision]
    failed = bool(len(cos)) and float(cos.min()) < floor
    result = ParityResult(
        status="failed" if failed else "passed", reference=reference, rows=len(texts),
        min_cosine=float(cos.min()) if len(cos) else 1.0,
        mean_cosine=float(cos.mean()) if len(cos) else 1.0, threshold=floor,
        runtime=encoder.runtime.label, worst_row=int(cos.argmin()) if len(cos) else -1)
    if failed:
        result = _with_cause(result, encoder, texts, ours, cos)
    log.info("parity: %s", result.summary())
    return result


def enforce(result: ParityResult, model_name: str) -> None:
    """A failed check is a ModelError (exit 4): the model is not run."""
    if result.status != "failed":
        return
    raise ModelError(f"parity check failed for model {model_name}: {result.summary()}; "
                     "its vectors would differ from sentence-transformers', so nothing was "
                     "written (model.parity_check: false skips the check)")


# --------------------------------------------------------------------------- the reference


def reference_vectors(encoder: Encoder, texts: Sequence[str],
                      prompt: str) -> tuple[np.ndarray, str]:
    """sentence-transformers' vectors of ``texts``, set up as the engine resolved the model;
    transformers' forward pass + sentence-transformers' Pooling where it cannot load it."""
    if encoder.splade is not None:
        return _sparse_reference(encoder, texts, prompt)
    try:
        model = _st_model(encoder)
    except Exception as exc:  # noqa: BLE001 - any load failure: the transformers reference
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else \
            type(exc).__name__
        log.warning("sentence-transformers cannot load %s (%s): comparing with transformers' "
                    "forward pass", encoder.info.path, reason)
        return _transformers_vectors(encoder, texts, prompt), (
            f"transformers' forward pass + {encoder.pooling} pooling (sentence-transformers "
            f"could not load the directory: {reason})")
    import sentence_transformers

    vectors = model.encode(list(texts), prompt=prompt, batch_size=8, convert_to_numpy=True,
                           show_progress_bar=False)
    label = f"sentence-transformers {sentence_transformers.__version__}"
    return np.asarray(vectors, np.float32), label


def _sparse_reference(encoder: Encoder, texts: Sequence[str],
                      prompt: str) -> tuple[np.ndarray, str]:
    """SparseEncoder's own document vectors, pruned to the engine's top-k, dense."""
    import sentence_transformers
    from sentence_transformers import SparseEncoder

    from pipeline.encoder.attention import torch_dtype

    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    model = SparseEncoder(str(encoder.info.path), device=encoder.runtime.device,
                          local_files_only=True, model_kwargs={"dtype": torch_dtype(
                              _reference_precision(encoder.runtime.precision))})
    vectors = model.encode_document(list(texts), prompt=prompt, batch_size=8,
                                    max_active_dims=encoder.sparse_keep,
                                    convert_to_sparse_tensor=False, show_progress_bar=False)
    label = f"sentence-transformers {sentence_transformers.__version__} SparseEncoder"
    return np.asarray(vectors.float().cpu().numpy(), np.float32), label


def _st_model(encoder: Encoder) -> Any:
    from sentence_transformers import SentenceTransformer

    from pipeline.encoder.attention import torch_dtype

    # its notes on default prompts and plain directories are for interactive use
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    model = SentenceTransformer(str(encoder.info.path), device=encoder.runtime.device,
                                local_files_only=True,
                                trust_remote_code=encoder.cfg.trust_remote_code,
                                model_kwargs={"dtype": torch_dtype(_reference_precision(
                                    encoder.runtime.precision))})
    model.max_seq_length = encoder.max_length
    _set_pooling(model, encoder.pooling)
    return model


def _reference_precision(precision: str) -> str:
    """The reference runs in the engine's precision; int8 weights: against fp32."""
    return precision if precision in ("fp32", "bf16", "fp16") else "fp32"


def _set_pooling(model: Any, pooling: str) -> None:
    """The reference pools as the engine was told to (the model's own, or the config's)."""
    from pipeline.encoder.stack import ENGINE_TO_ST_POOLING

    modes = tuple(ENGINE_TO_ST_POOLING[m] for m in pooling.split("+"))
    for module in model:
        if type(module).__name__ == "Pooling":
            module.pooling_mode = modes[0] if len(modes) == 1 else modes
            module.pooling_output_dimension = len(modes) * module.embedding_dimension


def _transformers_vectors(encoder: Encoder, texts: Sequence[str], prompt: str) -> np.ndarray:
    """AutoModel (eager, padded batches of 8) -> sentence-transformers' Pooling -> the
    engine's head (the stack a directory sentence-transformers cannot load declares)."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoModel

    from pipeline.encoder.attention import torch_dtype
    from pipeline.encoder.engine import load_tokenizer
    from pipeline.encoder.stack import ENGINE_TO_ST_POOLING

    info, device = encoder.info, encoder.runtime.device
    tok = load_tokenizer(info, encoder.cfg.trust_remote_code)
    model = AutoModel.from_pretrained(str(info.modules.transformer_dir),
                                      attn_implementation="eager",
                                      dtype=torch_dtype(_reference_precision(
                                          encoder.runtime.precision)),
                                      local_files_only=True,
                                      trust_remote_code=encoder.cfg.trust_remote_code,
                                      **info.modules.model_kwargs)
    model.eval().to(device)
    modes = tuple(ENGINE_TO_ST_POOLING[m] for m in encoder.pooling.split("+"))
    pooling = Pooling(info.hidden_size, pooling_mode=modes[0] if len(modes) == 1 else modes,
                      include_prompt=info.modules.include_prompt)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 8):
            batch = tok([prompt + t for t in texts[start:start + 8]], padding=True,
                        truncation=True, max_length=encoder.max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            features = {"token_embeddings": hidden, "attention_mask": batch["attention_mask"]}
            if encoder.prompt_skip:
                features["prompt_length"] = encoder.prompt_skip
            out.append(pooling(features)["sentence_embedding"].float().cpu().numpy())
    return encoder.head.apply(np.concatenate(out))


# --------------------------------------------------------------------------- the cause


def _with_cause(result: ParityResult, encoder: Encoder, texts: Sequence[str],
                ours: np.ndarray, cos: np.ndarray) -> ParityResult:
    """The likeliest cause of a failed check: truncation (only texts at the max length
    differ), the prompt, the pooling, the head, or the backbone's forward pass."""
    import dataclasses

    bad = cos < result.threshold
    _, _, lengths = encoder.tokenize(list(texts))
    if bad.any() and np.all(lengths[bad] >= encoder.max_length):
        cause = f"max length: only texts cut at {encoder.max_length} tokens differ"
    elif encoder.head.layers:
        cause = "the Dense head or the pooling before it"
    else:
        cause = (f"pooling ({encoder.pooling}) or the forward pass (attention "
                 f"{encoder.runtime.attention}; try model.attention: eager)")
    if encoder.prompt:
        try:
            alt, _ = reference_vectors(encoder, texts, "")
            if row_cosines(ours, alt).min() >= result.threshold:
                cause = (f"the prompt: the engine's vectors match sentence-transformers' without "
                         f"the prompt {encoder.prompt!r}")
        except Exception:  # noqa: BLE001 - the cause is a hint; the verdict stands
            pass
    return dataclasses.replace(result, cause=cause)
