"""The runtimes that run a model's forward pass, behind one interface the engine calls.

A backend takes one batch (ids and mask, or packed ids, positions and cu_seqlens,
already on its device) and returns the hidden states of the layers the output
columns need, as torch tensors: the engine pools them, applies the head, cuts and
quantizes, the same way whatever ran the pass.

- :class:`TorchBackend` (``model.backend: torch``): transformers' AutoModel with
  the attention backend that loads and passes the engine's check (flash ->
  varlen -> SDPA -> eager, see attention.py); hooks capture shallower layers and
  stop the pass after the deepest one needed (early exit).
- ``onnx`` / ``onnx-int8`` (pipeline.encoder.onnx): ONNX Runtime on the CPU, a graph
  exported from the torch model with an output per needed layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.encoder import attention, varlen
from pipeline.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """What to load and how: the Transformer module's folder, the attention backend
    asked for, the precision and device picked, and the model's own keywords."""

    path: Path
    attention: str
    precision: str
    device: str
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # its model_args / config_args
    task: str = "feature-extraction"  # fill-mask: a SparseEncoder's masked-LM model


class Backend(Protocol):
    runtime: attention.Runtime

    @property
    def packed(self) -> bool:
        """It takes packed (unpadded) batches: cu_seqlens instead of a mask."""

    def use_layers(self, num_layers: int, inner: list[int], exit_layer: int | None) -> None:
        """Return the states of ``inner`` layers too; stop after ``exit_layer``."""

    def hidden(self, inputs: dict[str, Any]) -> dict[int, Any]:
        """One batch (tensors on the device) -> {layer: hidden states tensor}."""

    def to_device(self, *arrays: np.ndarray) -> list[Any]:
        """numpy arrays -> tensors on the backend's device."""

    def free_cache(self) -> None:
        """Release cached device memory (after an out-of-memory split)."""

    def position_offset(self) -> int:
        """Where the model's position ids start (RoBERTa-style: padding index + 1)."""


class _EarlyExit(Exception):
    """Raised by the hook on the deepest layer any column needs: skip the rest."""


def find_layers(model: Any, num_layers: int) -> Any:
    """The model's ModuleList of transformer blocks (encoder.layer, layers, h, ...)."""
    import torch

    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} transformer layers of "
                     f"{type(model).__name__}; per-layer outputs need them")


def position_offset(model: Any) -> int:
    """Where the model's position ids start: RoBERTa-style embeddings (an int
    padding_idx next to a learned position table) count from padding_idx + 1, and a
    packed batch must say so (sentence-transformers' rule for flattened batches)."""
    import torch

    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(
                getattr(module, "position_embeddings", None), torch.nn.Embedding):
            return padding_idx + 1
    return 0


def to_device(device: str, arrays: tuple[np.ndarray, ...]) -> list[Any]:
    import torch

    tensors = [torch.from_numpy(a) for a in arrays]
    if device.startswith("cuda"):
        # page-locked host memory: the copies run asynchronously on the stream
        tensors = [t.pin_memory() for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


class TorchBackend:
    """transformers' AutoModel in torch, with layer hooks and early exit."""

    def __init__(self, model: Any, runtime: attention.Runtime):
        self.model = model
        self.runtime = runtime
        self._captured: dict[int, Any] = {}
        self._last = 0
        self._exit: int | None = None
        self.mlm: Any = None  # fill-mask: the masked-LM model whose base is ``model``

    @property
    def packed(self) -> bool:
        return self.runtime.attention in attention.PACKED

    @classmethod
    def load(cls, req: LoadRequest,
             check: Callable[[TorchBackend], str | None] | None = None) -> TorchBackend:
        """The first attention backend that loads and that ``check`` does not refuse
        (``check`` returns a reason to refuse it)."""
        from transformers import AutoModel, AutoModelForMaskedLM

        auto = AutoModelForMaskedLM if req.task == "fill-mask" else AutoModel
        dtype = attention.torch_dtype(req.precision)
        errors = []
        for name in attention.candidate_backends(req.attention, req.device):
            if name == "varlen":
                varlen.register()
            try:
                model = auto.from_pretrained(
                    str(req.path), dtype=dtype, attn_implementation=attention.HF_NAMES[name],
                    trust_remote_code=req.trust_remote_code, local_files_only=True,
                    **req.extra)
            except (ValueError, ImportError, NotImplementedError) as exc:
                errors.append(f"{name}: {str(exc).splitlines()[0]}")
                log.info("attention backend %s unavailable: %s", name, exc)
                continue
            model.eval().to(req.device)
            runtime = attention.Runtime(req.device, req.precision, name)
            # fill-mask: the base model runs the pass (as AutoModel would), the head apart
            candidate = cls(model.base_model if req.task == "fill-mask" else model, runtime)
            candidate.mlm = model if req.task == "fill-mask" else None
            reason = check(candidate) if check else None
            if not reason:
                return candidate
            errors.append(f"{name}: {reason}")
            log.warning("attention backend %s refused: %s", name, reason)
            del model, candidate
            if req.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # the next candidate loads into this memory
        raise ModelError(f"no attention backend could load {req.path}: " + "; ".join(errors))

    def use_layers(self, num_layers: int, inner: list[int], exit_layer: int | None) -> None:
        """Hooks that capture intermediate layers and stop at the deepest one needed.

        The last layer comes from the model's own output (decoders apply a final
        norm there); a shallower layer is its block's raw output, which is what
        ``hidden_states[k]`` of a full pass holds. Once per model (the packed probe
        sets them up first)."""
        if self._last:
            return
        self._last, self._exit = num_layers, exit_layer
        if not inner:
            return
        blocks = find_layers(self.model, num_layers)
        for layer in inner:
            blocks[layer - 1].register_forward_hook(self._hook(layer))

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self._captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == self._exit:
                raise _EarlyExit
        return hook

    def hidden(self, inputs: dict[str, Any]) -> dict[int, Any]:
        import torch

        self._captured = {}
        with torch.inference_mode():
            try:
                self._captured[self._last] = self.model(**inputs).last_hidden_state
            except _EarlyExit:
                pass
        return self._captured

    def to_device(self, *arrays: np.ndarray) -> list[Any]:
        return to_device(self.runtime.device, arrays)

    def free_cache(self) -> None:
        if self.runtime.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def position_offset(self) -> int:
        return position_offset(self.model)

    @property
    def is_float32(self) -> bool:
        import torch

        return next(self.model.parameters()).dtype == torch.float32

