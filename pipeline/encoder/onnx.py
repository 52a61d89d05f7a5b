"""ONNX Runtime on the CPU (``model.backend: onnx | onnx-int8``).

The graph is exported from the loaded torch model (``torch.onnx.export``, eager
attention, dynamic batch and sequence axes), with an output per layer a column
needs, and stops at the deepest one (2D Matryoshka columns keep working; the
pass exits early as the torch backend's does). ``onnx-int8`` rewrites it to int8
(pipeline.encoder.int8: activations quantized per token at run time, weights per
channel, LayerNorm outlier channels smoothed). Pooling, the model's Dense head,
truncation and quantization stay the engine's, as for torch.

Exported once per model and layer set, cached on disk (``model.onnx_cache``,
else ``$EMBED_ONNX_CACHE``, else ``~/.cache/embed-pipeline/onnx``) under a key of
the model fingerprint, the backend, the layers, the opset, the library versions
and the int8 calibration texts; made under a file lock and renamed into place, so concurrent Python
workers on one node export it once and the others wait for it. Export and
quantization are deterministic: the same model gives the same files. An
``onnx_cache`` in an object store (``s3://bucket/onnx``) is shared by the nodes: the
first to need a graph exports it there (the driver's preflight, as a rule), every
other node downloads it into its own cache once.

ONNX Runtime has no packed attention here: batches are padded, length-sorted and
token-budgeted, one intra-op thread per worker (workers x threads <= cores).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.encoder import attention
from pipeline.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
    from pipeline.encoder.backends import LoadRequest

log = logging.getLogger(__name__)
OPSET = 18
EXPORT_VERSION = "3"  # bump when the export below changes what it writes
BACKENDS = ("onnx", "onnx-int8")


def cache_dirs(cfg: ModelConfig) -> tuple[Path, str | None]:
    """(this node's cache folder, the shared one in an object store or None)."""
    configured = cfg.onnx_cache or os.environ.get("EMBED_ONNX_CACHE")
    if configured and not storage.is_local(configured):
        return storage.node_cache("onnx"), storage.normalize(configured)
    return Path(configured or storage.node_cache("onnx")).expanduser(), None


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


@functools.cache
def _calibration_digest() -> str:
    """The int8 calibration texts' digest (read once per process)."""
    from pipeline.encoder.int8 import CALIBRATION_FILE

    return hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ExportKey:
    """What an exported graph depends on: the model (its fingerprint), the layers it
    returns, the precision of its weights and the libraries that wrote it."""

    fingerprint: str
    layers: tuple[int, ...]  # the layers it returns (the last one: the model's output)
    num_layers: int
    backend: str  # onnx | onnx-int8

    @property
    def digest(self) -> str:
        blob = json.dumps({"fingerprint": self.fingerprint, "layers": self.layers,
                           "num_layers": self.num_layers, "opset": OPSET,
                           "export": EXPORT_VERSION, "versions": _versions(),
                           "calibration": _calibration_digest()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def files(self, root: Path) -> tuple[Path, Path, Path]:
        """(fp32 graph, the backend's graph, the metadata) under ``root``."""
        base = root / self.digest
        graph = base.with_suffix(".onnx")
        mine = graph if self.backend == "onnx" else base.with_suffix(".int8.onnx")
        return graph, mine, base.with_suffix(".json")


def ensure_graph(req: LoadRequest, key: ExportKey, root: Path,
                 shared: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The backend's graph for ``key`` (exported and quantized on first use, or fetched
    from the ``shared`` cache in an object store) and its metadata; ModelError where the
    architecture does not export."""
    graph, mine, meta_file = key.files(root)
    if mine.is_file() and meta_file.is_file():
        return mine, json.loads(meta_file.read_text())
    with storage.locked(root / f"{key.digest}.lock"):
        if shared and not (mine.is_file() and meta_file.is_file()):
            _fetch(shared, (mine, meta_file))
        if not (mine.is_file() and meta_file.is_file()):
            if not (graph.is_file() and meta_file.is_file()):  # another worker may have won
                _write_atomically(meta_file, json.dumps(_export(req, key, graph),
                                                        sort_keys=True).encode())
            if mine != graph and not mine.is_file():
                _quantize(req, graph, mine, json.loads(meta_file.read_text()))
            if shared:
                _publish(shared, (mine, meta_file))
        meta = json.loads(meta_file.read_text())
    return mine, meta


def _fetch(shared: str, files: tuple[Path, ...]) -> None:
    """The files from the shared cache into this node's, if all are there (the metadata
    is published last, so a graph with its metadata is whole)."""
    import pyarrow.fs as pafs

    fs, base = storage.settings().filesystem(shared)
    remote = [f"{base}/{f.name}" for f in files]
    if any(i.type != pafs.FileType.File for i in fs.get_file_info(remote)):
        return
    for path, src in zip(files, remote, strict=True):
        with fs.open_input_stream(src) as stream:
            _write_atomically(path, stream.read())


def _publish(shared: str, files: tuple[Path, ...]) -> None:
    """This node's graph and metadata into the shared cache (the metadata last)."""
    for path in files:
        storage.write_bytes(storage.join(shared, path.name), path.read_bytes())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _export(req: LoadRequest, key: ExportKey, graph: Path) -> dict[str, Any]:
    """The fp32 graph: the torch model (fp32, eager attention) cut after the deepest
    layer needed, returning each needed layer's states."""
    import inspect

    import torch
    from transformers import AutoModel

    from pipeline.encoder.backends import position_offset

    log.info("exporting %s to ONNX (layers %s)", req.path, key.layers)
    try:
        model = AutoModel.from_pretrained(str(req.path), dtype=torch.float32,
                                          attn_implementation="eager", local_files_only=True,
                                          trust_remote_code=req.trust_remote_code, **req.extra)
    except Exception as exc:  # noqa: BLE001 - one line, whatever transformers raised
        raise ModelError(f"cannot load {req.path} for the ONNX export: "
                         f"{str(exc).splitlines()[0]}") from None
    model.eval()
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    wrapper = _LayerOutputs(model, key, takes_positions)
    names = ["input_ids", "attention_mask"] + (["position_ids"] if takes_positions else [])
    example: tuple[Any, ...] = (torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]]),
                                torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    if takes_positions:
        example += (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2]]) + position_offset(model),)
    outputs = [f"layer_{layer}" for layer in key.layers]
    axes = {n: {0: "batch", 1: "tokens"} for n in names + outputs}
    tmp = graph.with_name(f".{graph.name}.{os.getpid()}.tmp")
    try:
        torch.onnx.export(wrapper, example, str(tmp), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - an architecture that does not export
        tmp.unlink(missing_ok=True)
        raise ModelError(f"model {req.path.name} ({model.config.model_type}) does not export "
                         f"to ONNX: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                         "use model.backend: torch") from None
    os.replace(tmp, graph)
    return {"inputs": names, "outputs": outputs, "layers": list(key.layers),
            "position_offset": position_offset(model), "model_type": model.config.model_type}


class _LayerOutputs:
    """A torch module returning the states of ``key.layers`` (cut after the deepest)."""

    def __new__(cls, model: Any, key: ExportKey, takes_positions: bool) -> Any:
        import torch

        from pipeline.encoder.backends import find_layers

        deepest = max(key.layers)
        if deepest < key.num_layers:  # early exit: the blocks past the deepest go
            blocks = find_layers(model, key.num_layers)
            del blocks[deepest:]
        last = key.num_layers if deepest == key.num_layers else None

        class LayerOutputs(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any,
                        position_ids: Any = None) -> tuple[Any, ...]:
                extra = {"position_ids": position_ids} if takes_positions else {}
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 output_hidden_states=True, **extra)
                return tuple(out.last_hidden_state if layer == last else out.hidden_states[layer]
                             for layer in key.layers)

        return LayerOutputs().eval()


def _quantize(req: LoadRequest, graph: Path, out: Path, meta: dict[str, Any]) -> None:
    """The int8 graph (pipeline.encoder.int8: per-token activations, per-channel
    weights, LayerNorm outliers smoothed on the fixed calibration texts)."""
    import onnx

    from pipeline.encoder import int8

    model = int8.quantize(onnx.load(str(graph)), _calibration_feeds(req, meta))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)


def _calibration_feeds(req: LoadRequest, meta: dict[str, Any],
                       rows: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """The calibration texts as the graph's inputs: padded batches of ``rows``."""
    from transformers import AutoTokenizer

    from pipeline.encoder import int8

    tokenizer = AutoTokenizer.from_pretrained(str(req.path), local_files_only=True,
                                              trust_remote_code=req.trust_remote_code)
    texts = int8.calibration_texts()
    for i in range(0, len(texts), rows):
        batch = tokenizer(texts[i:i + rows], padding=True, truncation=True, max_length=256,
                          return_tensors="np")
        yield _feed(meta, batch["input_ids"], batch["attention_mask"])


def _feed(meta: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs for one padded batch (position ids from the mask)."""
    feed = {"input_ids": ids.astype(np.int64, copy=False),
            "attention_mask": mask.astype(np.int64, copy=False)}
    if "position_ids" in meta["inputs"]:
        positions = np.clip(np.cumsum(feed["attention_mask"], axis=1) - 1, 0, None)
        feed["position_ids"] = positions + int(meta["position_offset"])
    return feed


class OnnxBackend:
    """An ONNX Runtime session over the exported graph (CPU, padded batches)."""

    def __init__(self, session: Any, meta: dict[str, Any], runtime: attention.Runtime,
                 path: Path):
        self.session = session
        self.path = path
        self.meta = meta
        self.runtime = runtime
        self.layers = [int(layer) for layer in meta["layers"]]

    packed = False

    @classmethod
    def load(cls, cfg: ModelConfig, req: LoadRequest, engine: Any) -> OnnxBackend:
        import onnxruntime as ort
        import torch

        if req.device != "cpu":
            raise ConfigError("model.backend", f"{cfg.backend} runs on the CPU only; this "
                              f"worker has {req.device}: use model.backend: torch on GPUs "
                              "(or model.device: cpu)")
        layers = tuple(sorted({layer for layer, _ in engine.groups}))
        key = ExportKey(fingerprint=engine.fingerprint, layers=layers,
                        num_layers=engine.info.num_layers, backend=cfg.backend)
        path, meta = ensure_graph(req, key, *cache_dirs(cfg))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the worker's share
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        precision = "int8" if cfg.backend == "onnx-int8" else "fp32"
        return cls(session, meta, attention.Runtime("cpu", precision, "onnx"), path)

    def use_layers(self, num_layers: int, inner: list[int], exit_layer: int | None) -> None:
        missing = set(inner) - set(self.layers)
        assert not missing, f"the graph returns layers {self.layers}, not {sorted(missing)}"

    def hidden(self, inputs: dict[str, Any]) -> dict[int, Any]:
        import torch

        feed = _feed(self.meta, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
        states = self.session.run(self.meta["outputs"], feed)
        return {layer: torch.from_numpy(s) for layer, s in zip(self.layers, states,
                                                                strict=True)}

    def to_device(self, *arrays: np.ndarray) -> list[Any]:
        import torch

        return [torch.from_numpy(a) for a in arrays]

    def free_cache(self) -> None:
        pass

    def position_offset(self) -> int:
        return int(self.meta["position_offset"])


def prepare(cfg: ModelConfig, info: Any, outputs: Any, fingerprint: str) -> Path:
    """The preflight's export (before Spark starts): an architecture that does not export
    fails here in one line; the graph is cached for the workers of this machine."""
    from pipeline.encoder.backends import LoadRequest
    from pipeline.encoder.model import resolve_layer

    layers = tuple(sorted({resolve_layer(s.layer, info.num_layers) for s in outputs}))
    req = LoadRequest(path=info.modules.transformer_dir, attention="eager", precision="fp32",
                      device="cpu", trust_remote_code=cfg.trust_remote_code,
                      extra=info.modules.model_kwargs)
    key = ExportKey(fingerprint=fingerprint, layers=layers, num_layers=info.num_layers,
                    backend=cfg.backend)
    return ensure_graph(req, key, *cache_dirs(cfg))[0]
