"""What an encoder did: rows, tokens, padding, batches, time, and the runtime that ran.

One type for every use: the encoder keeps a running total; a Spark task reports
its share as ``after - before``; the driver's accumulator sums the tasks'
shares with ``+``. Light on purpose (no torch, no numpy): the driver imports it
to build the accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_KEPT = ("runtime", "peak_rss_mb", "gpus")  # not counters: a difference keeps the later value


def _combine(name: str, a: Any, b: Any) -> Any:
    if name in ("runtime", "gpus"):
        return a | b
    if name == "peak_rss_mb":
        return max(a, b)
    return a + b


@dataclass(frozen=True)
class EncoderStats:
    rows: int = 0  # forward units (rows, or windows of chunked rows)
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # tokens the linear layers computed on (== tokens when packed)
    batches: int = 0
    oom_splits: int = 0
    seconds: float = 0.0  # in encode(): the forward passes, pooling, quantization
    prepare_seconds: float = 0.0  # in prepare(): tokenizing (on a prefetch thread)
    # CPU time of the threads that ran prepare() and encode() (they overlap in wall
    # time): what the encoder cost the machine, against what the pipeline around it did
    cpu_seconds: float = 0.0
    runtime: frozenset[str] = field(default_factory=frozenset)  # device/precision/attention
    peak_rss_mb: float = 0.0  # the largest resident set of a worker that reported (max)
    # GPU addresses Spark (or the local placement) gave the encoders, whether or not
    # CUDA was there to use them (runtime says what ran); the tasks that reported, and
    # those of them that were given a GPU
    gpus: frozenset[str] = field(default_factory=frozenset)
    tasks: int = 0
    gpu_tasks: int = 0

    def __add__(self, other: EncoderStats) -> EncoderStats:
        return EncoderStats(**{f.name: _combine(f.name, getattr(self, f.name),
                                                getattr(other, f.name))
                               for f in fields(self)})

    def __sub__(self, other: EncoderStats) -> EncoderStats:
        """What happened since ``other`` (an earlier snapshot); keeps this runtime and peak."""
        return EncoderStats(**{f.name: (getattr(self, f.name) if f.name in _KEPT else
                                        getattr(self, f.name) - getattr(other, f.name))
                               for f in fields(self)})

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0

    @property
    def gpu_summary(self) -> str:
        """The GPUs the encode tasks were given, and what ran where none was usable:
        a task given a GPU on a worker without CUDA encodes on the CPU (device: auto)."""
        if not self.gpus:
            return ""
        line = (f"{', '.join(sorted(self.gpus))} ({self.gpu_tasks} of {self.tasks} encode "
                "tasks given a GPU)")
        if self.runtime and all(r.startswith("cpu") for r in self.runtime):
            line += "; no CUDA device visible on the workers: encoded on the CPU"
        return line

    @property
    def runtime_label(self) -> str:
        return ", ".join(sorted(self.runtime)) or "-"

    def to_json(self) -> str:
        """One line of JSON (sets as sorted lists): a task's share, sent with its rows
        where the session has no accumulators (a Spark Connect client)."""
        import json

        return json.dumps({f.name: sorted(v) if isinstance(v := getattr(self, f.name), frozenset)
                           else v for f in fields(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EncoderStats:
        import json

        data: dict[str, Any] = json.loads(text)
        values: dict[str, Any] = {f.name: frozenset(data[f.name]) if f.name in ("runtime", "gpus")
                                  else data[f.name] for f in fields(cls) if f.name in data}
        return cls(**values)
