"""Pick the device, precision and attention backend (backends.TorchBackend loads them).

Backends, best first: flash-attn (the ``gpu`` extra, CUDA only) -> varlen (torch's
own varlen kernel on CUDA, a gathered SDPA elsewhere) -> torch SDPA -> eager.
``flash`` and ``varlen`` run packed (unpadded) batches, see ``varlen.py``.
``auto`` takes the first that imports, loads and passes the caller's check (the
engine checks that a packed forward matches a padded one); an explicit choice
that cannot run is an error, not a silent fallback. What actually ran is reported.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.encoder import varlen
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

HF_NAMES = {"flash": "flash_attention_2", "varlen": varlen.NAME, "sdpa": "sdpa",
             "eager": "eager"}
PACKED = frozenset({"flash", "varlen"})  # backends that take unpadded (packed) batches


@dataclass(frozen=True)
class Runtime:
    device: str
    precision: str  # fp32 | bf16 | fp16: what runs, never "auto"
    attention: str  # flash | sdpa | eager: what runs, never "auto"

    @property
    def label(self) -> str:
        """device/precision/attention, as runs, commits and canaries record it."""
        return f"{self.device}/{self.precision}/{self.attention}"


def pick_device(requested: str, gpu_address: str | None = None) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda:{gpu_address}" if gpu_address is not None else "cuda:0"
    if requested == "cuda":
        raise ConfigError("model.device", "cuda was asked for but no CUDA device is visible")
    return "cpu"


def cpu_info() -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its instruction-set flags) from /proc/cpuinfo; ("", {})
    where there is none."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return "", frozenset()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)
             if k.strip() in ("model name", "flags") and v}
    return field.get("model name", ""), frozenset(field.get("flags", "").split())


def cpu_has_fast_bf16() -> bool:
    """AVX512-bf16 or AMX: the CPUs on which bf16 matmuls beat fp32."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def pick_precision(requested: str, device: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def flash_available(device: str) -> bool:
    return device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None


def candidate_backends(requested: str, device: str) -> list[str]:
    if requested == "auto":
        order = ["flash", "varlen", "sdpa", "eager"]
        return [b for b in order if b != "flash" or flash_available(device)]
    if requested == "flash" and not flash_available(device):
        raise ConfigError("model.attention", "flash needs a CUDA device and the flash-attn "
                          "package (pip install 'embed-pipeline[gpu]'); allowed values: "
                          "auto, flash, varlen, sdpa, eager")
    return [requested]
