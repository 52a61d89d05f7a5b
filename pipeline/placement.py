"""Where the encode stage runs: how many encode tasks at once, which GPU each one
uses, threads per worker and the token budget. A pure function of what the
cluster offers (:class:`ClusterView`), so every layout is unit-tested on CPUs.

Rules:

- **local, no GPU** (or ``model.device: cpu``): one encode task per task slot,
  ``cores // slots`` torch threads each, so workers x threads never exceeds the
  cores; the tokenizer runs in the task's thread.
- **local, G GPUs**: ``G x tasks_per_gpu`` encode tasks (at most the slots), and
  the encode stage has exactly that many partitions, so no more run at once: a
  local master cannot schedule GPUs (it refuses ResourceProfiles). Task ``p``
  uses GPU ``p % G``. Each task gets ``cores // tasks`` threads, for torch's
  host work and the tokenizer's parallel batch encode. ``tasks_per_gpu: 2``
  lets one task tokenize while the other runs the GPU; each then gets half the
  GPU's token budget.
- **cluster with executor GPUs**: the encode stage alone carries a
  ResourceProfile asking ``spark.task.resource.gpu.amount`` GPUs per task
  (``spark.gpus_per_task``; else ``1 / tasks_per_gpu``), so Spark runs at most
  ``executor GPUs / task amount`` encode tasks per executor and hands each its
  GPU address (TaskContext resources). Threads: executor cores / those tasks.
- **cluster without GPUs**: ``spark.task.cpus`` threads per task.

A Python worker keeps one encoder per model (``udf.get_encoder`` drops the old
one when a task asks for the same model on another GPU), so a worker never
holds two copies of a model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Literal

PlacementKind = Literal["local-cpu", "local-gpu", "cluster-cpu", "cluster-gpu"]
GpuFrom = Literal["none", "partition", "task-resources"]
# Per-GPU token budget when model.token_budget is null (engine.AUTO_BATCH["cuda"]).
GPU_TOKEN_BUDGET = 65536


@dataclass(frozen=True)
class ClusterView:
    """What the placement is decided from (read by ``observe`` from a live session)."""

    master: str  # local[N], local[*], spark://..., yarn, k8s://...
    machine_cores: int  # cores of this machine (local) or of one executor (clusters)
    slots: int  # concurrent tasks: N of local[N]; on clusters, executor cores / task cpus
    cuda_devices: int = 0  # torch.cuda.device_count() on this machine (local masters)
    executor_gpus: float = 0  # spark.executor.resource.gpu.amount
    task_gpus: float | None = None  # spark.gpus_per_task, else spark.task.resource.gpu.amount
    task_cpus: int = 1  # spark.task.cpus
    device: str = "auto"  # model.device
    tasks_per_gpu: int = 1  # spark.tasks_per_gpu
    token_budget: int | None = None  # model.token_budget

    @property
    def local(self) -> bool:
        return self.master == "local" or self.master.startswith("local[")


@dataclass(frozen=True)
class Placement:
    kind: PlacementKind
    encode_tasks: int | None  # concurrent encode tasks (local); None: Spark's scheduler
    gpus: int  # GPUs the encode tasks share (per executor on clusters)
    tasks_per_gpu: int
    gpu_from: GpuFrom
    torch_threads: int
    tokenizer_threads: int  # >1: the tokenizer's parallel batch encode (Rust threads)
    token_budget: int | None  # padded tokens per forward pass; None: the device default
    task_gpu_amount: float | None = None  # the encode stage's ResourceProfile (clusters)

    def gpu_for(self, partition: int, assigned: str | None) -> str | None:
        """The GPU address an encode task uses: Spark's (clusters), else partition % G."""
        if self.gpu_from == "task-resources":
            return assigned
        if self.gpu_from == "partition":
            return str(partition % self.gpus)
        return None

    @property
    def label(self) -> str:
        """One line for the run summary, the runs table and the commit metadata."""
        threads = f"{self.torch_threads} torch / {self.tokenizer_threads} tokenizer threads"
        if self.kind == "local-cpu":
            return f"local-cpu: {self.encode_tasks} encode tasks, {threads}"
        if self.kind == "cluster-cpu":
            return f"cluster-cpu: {threads} per task"
        per = f"{self.tasks_per_gpu} per GPU"
        if self.kind == "local-gpu":
            return (f"local-gpu: {self.encode_tasks} encode tasks on {self.gpus} GPU(s) "
                    f"({per}, GPU = partition % {self.gpus}), {threads}")
        return (f"cluster-gpu: {self.task_gpu_amount} GPU per encode task ({per}, address "
                f"from Spark), up to {self.gpus} GPU(s) per executor, {threads}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "label": self.label}, sort_keys=True)


def plan(view: ClusterView) -> Placement:
    """The placement for one run (see the module's rules)."""
    if view.local:
        gpus = view.cuda_devices if view.device != "cpu" else 0
        return _local_gpu(view, gpus) if gpus else _local_cpu(view)
    gpus = math.floor(view.executor_gpus) if view.device != "cpu" else 0
    return _cluster_gpu(view, gpus) if gpus else _cluster_cpu(view)


def _local_cpu(view: ClusterView) -> Placement:
    threads = max(1, view.machine_cores // max(1, view.slots))
    return Placement(kind="local-cpu", encode_tasks=view.slots, gpus=0, tasks_per_gpu=0,
                     gpu_from="none", torch_threads=threads, tokenizer_threads=1,
                     token_budget=view.token_budget)


def _local_gpu(view: ClusterView, gpus: int) -> Placement:
    tasks = max(1, min(view.slots, gpus * view.tasks_per_gpu))
    threads = max(1, view.machine_cores // tasks)
    return Placement(kind="local-gpu", encode_tasks=tasks, gpus=gpus,
                     tasks_per_gpu=view.tasks_per_gpu, gpu_from="partition",
                     torch_threads=threads, tokenizer_threads=threads,
                     token_budget=_gpu_budget(view, view.tasks_per_gpu))


def _cluster_gpu(view: ClusterView, gpus: int) -> Placement:
    amount = view.task_gpus or 1 / view.tasks_per_gpu
    per_gpu = max(1, round(1 / amount)) if amount < 1 else 1
    by_gpu = math.floor(gpus / amount + 1e-9)
    concurrent = max(1, min(view.slots, by_gpu))
    threads = max(1, view.machine_cores // concurrent)
    return Placement(kind="cluster-gpu", encode_tasks=None, gpus=gpus, tasks_per_gpu=per_gpu,
                     gpu_from="task-resources", torch_threads=threads,
                     tokenizer_threads=threads,
                     token_budget=_gpu_budget(view, per_gpu),
                     task_gpu_amount=amount)


def _cluster_cpu(view: ClusterView) -> Placement:
    threads = max(1, view.task_cpus)
    return Placement(kind="cluster-cpu", encode_tasks=None, gpus=0, tasks_per_gpu=0,
                     gpu_from="none", torch_threads=threads, tokenizer_threads=1,
                     token_budget=view.token_budget)


def _gpu_budget(view: ClusterView, tasks_per_gpu: int) -> int:
    """One GPU's token budget shared by its tasks (model.token_budget wins)."""
    return view.token_budget or GPU_TOKEN_BUDGET // max(1, tasks_per_gpu)


def local_slots(master: str, machine_cores: int) -> int | None:
    """N of local[N] / local[N,F] (local[*]: the machine's cores; local: 1), else None."""
    if master == "local":
        return 1
    match = re.match(r"local\[(\d+|\*)", master)
    if not match:
        return None
    return machine_cores if match.group(1) == "*" else int(match.group(1))
