"""ONNX Runtime on the CPU (``model.backend: onnx | onnx-int8``).

The graph is exported from the loaded torch model (``torch.onnx.export``, eager
attention, dynamic batch and sequence axes), with an output per layer a column
needs, and stops at the deepest one (2D Matryoshka columns keep working; the
pass exits early as the torch backend's does). ``onnx-int8`` quantizes its
weights (ONNX Runtime's dynamic quantization: int8 weights per channel,
activations quantized per batch at run time). Pooling, the model's Dense head,
truncation and quantization stay the engine's, as for torch.

Exported once per model and layer set, cached on disk (``model.onnx_cache``,
else ``$EMBED_ONNX_CACHE``, else ``~/.cache/embed-pipeline/onnx``) under a key of
the model fingerprint, the backend, the layers, the opset and the library
versions; made under a file lock and renamed into place, so concurrent Python
workers on one node export it once and the others wait for it. Export and
quantization are deterministic: the same model gives the same files.

ONNX Runtime has no packed attention here: batches are padded, length-sorted and
token-budgeted, one intra-op thread per worker (workers x threads <= cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.encoder import attention
from pipeline.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
    from pipeline.encoder.backends import LoadRequest

log = logging.getLogger(__name__)
OPSET = 18
EXPORT_VERSION = "2"  # bump when the export below changes what it writes
BACKENDS = ("onnx", "onnx-int8")


def cache_dir(cfg: ModelConfig) -> Path:
    configured = cfg.onnx_cache or os.environ.get("EMBED_ONNX_CACHE")
    return Path(configured or Path.home() / ".cache" / "embed-pipeline" / "onnx").expanduser()


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


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
                           "export": EXPORT_VERSION, "versions": _versions()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def files(self, root: Path) -> tuple[Path, Path, Path]:
        """(fp32 graph, the backend's graph, the metadata) under ``root``."""
        base = root / self.digest
        graph = base.with_suffix(".onnx")
        mine = graph if self.backend == "onnx" else base.with_suffix(".int8.onnx")
        return graph, mine, base.with_suffix(".json")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock (fcntl) on ``path``: other processes wait here."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_graph(req: LoadRequest, key: ExportKey, root: Path) -> tuple[Path, dict[str, Any]]:
    """The backend's graph for ``key`` (exported and quantized on first use) and its
    metadata; ModelError where the architecture does not export."""
    graph, mine, meta_file = key.files(root)
    if mine.is_file() and meta_file.is_file():
        return mine, json.loads(meta_file.read_text())
    with _locked(root / f"{key.digest}.lock"):
        if not (graph.is_file() and meta_file.is_file()):  # another worker may have won
            meta = _export(req, key, graph)
            _write_atomically(meta_file, json.dumps(meta, sort_keys=True).encode())
        if mine != graph and not mine.is_file():
            _quantize(graph, mine, key.num_layers)
    return mine, json.loads(meta_file.read_text())


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


_LAYER = re.compile(r"/(?:layer|layers|h|block|blocks)\.(\d+)/")


def fp32_nodes(graph: Any, num_layers: int) -> list[str]:
    """The MatMuls kept in fp32 by ``onnx-int8``: the feed-forward down projections (a
    weight wider in than out: intermediate -> hidden, whose inputs are the activations
    with the widest range) and every MatMul of the first and the last layer. Measured on
    all-MiniLM-L6-v2 and the 240 canary texts (bench/encode.py, README "CPU clusters"):
    every MatMul in int8 gave min cosine 0.964 to fp32; this, 0.980."""
    weights = {w.name: tuple(w.dims) for w in graph.graph.initializer}
    keep = []
    for node in graph.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        shape = next((weights[i] for i in node.input if i in weights), None)
        layer = _LAYER.search(node.name)
        edge = layer is not None and int(layer.group(1)) in (0, num_layers - 1)
        if shape is not None and (edge or (len(shape) == 2 and shape[0] > shape[1])):
            keep.append(node.name)
    return keep


def _quantize(graph: Path, out: Path, num_layers: int) -> None:
    """int8 weights, per channel (ONNX Runtime's dynamic quantization of the weight
    MatMuls), but for :func:`fp32_nodes`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = fp32_nodes(onnx.load(str(graph), load_external_data=False), num_layers)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    quantize_dynamic(str(graph), str(tmp), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep,
                     extra_options={"MatMulConstBOnly": True})
    os.replace(tmp, out)


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
        path, meta = ensure_graph(req, key, cache_dir(cfg))
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

        ids = inputs["input_ids"].numpy().astype(np.int64, copy=False)
        mask = inputs["attention_mask"].numpy().astype(np.int64, copy=False)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.meta["inputs"]:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feed["position_ids"] = positions + int(self.meta["position_offset"])
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
    return ensure_graph(req, key, cache_dir(cfg))[0]
