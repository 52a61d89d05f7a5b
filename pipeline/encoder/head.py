"""The model's head: what its module stack does after pooling (Dense layers, Normalize).

Applied to every output column's pooled vector, whatever its layer (2D
Matryoshka columns get the same head), before the column's own truncate or
projection, renormalization and quantization. Runs in float32 on the encoder's
device, in torch, whatever the backbone's precision.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from pipeline.encoder.stack import IDENTITY_ACTIVATIONS, DenseSpec, ModelStack
from pipeline.errors import ModelError


def _activation(path: str) -> Any:
    """The torch module class sentence-transformers saved (only torch's own)."""
    import torch

    if path in IDENTITY_ACTIVATIONS:
        return torch.nn.Identity()
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ModelError(f"activation {path!r} of a Dense module is not in this torch") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"activation {path!r} of a Dense module is not a torch.nn.Module")
    return cls()


def _load_weights(spec: DenseSpec) -> dict[str, Any]:
    import torch

    if spec.weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(spec.weights))
    return torch.load(str(spec.weights), map_location="cpu", weights_only=True)


class DenseLayer:
    """``activation(linear(x))`` (+ the residual), as sentence-transformers' Dense."""

    def __init__(self, spec: DenseSpec, device: str):
        import torch

        self.spec = spec
        self.linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.residual = None
        if spec.residual and spec.in_features != spec.out_features:
            self.residual = torch.nn.Linear(spec.in_features, spec.out_features, bias=False)
        state = _load_weights(spec)
        modules = {"linear": self.linear, "residual": self.residual}
        for name, module in modules.items():
            if module is None:
                continue
            wanted = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
            try:
                module.load_state_dict(wanted)
            except RuntimeError as exc:
                raise ModelError(f"the Dense weights {spec.weights} do not fit "
                                 f"{spec.in_features}->{spec.out_features}: "
                                 f"{str(exc).splitlines()[0]}") from None
            module.float().eval().to(device)
        self.activation = _activation(spec.activation)

    def __call__(self, x: Any) -> Any:
        out = self.activation(self.linear(x))
        if self.spec.residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


class Head:
    """The Dense layers and Normalize of a model, or nothing (then :meth:`apply` is a
    no-op): ``pooled [N, H] -> [N, D]``."""

    def __init__(self, stack: ModelStack, device: str = "cpu"):
        self.device = device
        self.layers = [DenseLayer(d, device) for d in stack.dense]
        self.normalize = stack.normalize

    @property
    def empty(self) -> bool:
        return not self.layers and not self.normalize

    def apply(self, pooled: np.ndarray, rows: int = 8192) -> np.ndarray:
        """The head over ``pooled`` (float32, numpy): the Dense layers ``rows`` at a time
        on the device, then Normalize."""
        out = pooled
        if self.layers:
            out = self._dense(pooled, rows)
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _dense(self, pooled: np.ndarray, rows: int) -> np.ndarray:
        import torch

        parts = [np.zeros((0, self.layers[-1].spec.out_features), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(pooled), rows):
                x = torch.from_numpy(np.ascontiguousarray(pooled[start:start + rows],
                                                          dtype=np.float32)).to(self.device)
                for layer in self.layers:
                    x = layer(x)
                parts.append(x.float().cpu().numpy())
        return np.concatenate(parts)
