"""Spark adapter: run the encoder core inside ``mapInArrow``.

``mapInArrow`` (rather than ``mapInPandas``) hands the core Arrow batches and
takes Arrow back, so no vector is ever boxed into a pandas object. The model is
loaded once per Python worker (module-level cache, like
``pyspark.ml.functions.predict_batch_udf``) and reused across batches and,
with ``spark.python.worker.reuse``, across tasks. Each task uses the GPU Spark
assigned it (TaskContext resources), else cuda:0 / CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import pyarrow as pa

from pipeline.config import ModelConfig, OutputSpec
from pipeline.outputs import Calibration, spark_type, to_arrow, to_spark_arrow

log = logging.getLogger(__name__)
_ENCODERS: dict = {}


def get_encoder(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...], gpu: str | None,
                calibration: Calibration | None = None):
    """The worker's encoder for this model and outputs: loaded once, reused by the
    warm-up, the canary and every encode task (int8 ranges are set per call)."""
    key = (model_cfg, outputs, gpu)
    if key not in _ENCODERS:
        from pipeline.encoder import Encoder

        _ENCODERS[key] = Encoder(model_cfg, outputs, gpu_address=gpu)
    encoder = _ENCODERS[key]
    encoder.calibration = calibration or Calibration()
    return encoder


def task_gpu() -> str | None:
    """The first GPU address Spark assigned to this task, if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpus = ctx.resources().get("gpu")
    return gpus.addresses[0] if gpus and gpus.addresses else None


def float_specs(outputs: tuple[OutputSpec, ...]) -> tuple[OutputSpec, ...]:
    """The same columns before quantization (what the canary compares)."""
    return tuple(dataclasses.replace(s, dtype="float32") for s in outputs)


def output_schema(id_type, outputs: tuple[OutputSpec, ...], raw: bool = False):
    from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

    fields = [StructField("id", id_type, True), StructField("content_hash", StringType(), True)]
    fields += [StructField(s.name, spark_type(s), False)
               for s in (float_specs(outputs) if raw else outputs)]
    fields += [StructField("n_tokens", IntegerType(), False),
               StructField("truncated", BooleanType(), False)]
    return StructType(fields)


def make_encode_fn(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...], torch_threads: int,
                   stats_acc=None, calibration: Calibration | None = None, raw: bool = False):
    """The function given to ``mapInArrow``; it closes over plain, picklable config.

    ``raw``: emit every column as float32 before quantization (the canary), from
    the same cached encoder as the run's own encode tasks.
    """
    raw_specs = float_specs(outputs)

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        encoder = get_encoder(model_cfg, outputs, task_gpu(), calibration)
        before = dataclasses.replace(encoder.stats)  # the encoder counts; report this task's share
        for batch, prepared in encoder.prefetched(batches, lambda b: b.column("text")):
            if raw:
                floats, result = encoder.encode_float(prepared)
                columns = {s.name: to_arrow(floats[s.name], s) for s in raw_specs}
            else:
                result = encoder.encode(prepared)
                columns = result.columns
            arrays = [batch.column("id"), batch.column("content_hash")]
            arrays += [to_spark_arrow(columns[s.name]) for s in outputs]
            arrays += [pa.array(result.n_tokens, pa.int32()), pa.array(result.truncated)]
            names = ["id", "content_hash", *(s.name for s in outputs), "n_tokens", "truncated"]
            yield pa.RecordBatch.from_arrays(arrays, names=names)
        if stats_acc is not None:
            rt, now = encoder.runtime, encoder.stats
            stats_acc.add({"rows": now.rows - before.rows, "tokens": now.tokens - before.tokens,
                           "padded_tokens": now.padded_tokens - before.padded_tokens,
                           "encode_seconds": now.seconds - before.seconds,
                           "runtime": {runtime_label(rt)}})

    return encode_batches


def _zero_stats() -> dict:
    return {"rows": 0, "tokens": 0, "padded_tokens": 0, "encode_seconds": 0.0, "runtime": set()}


def runtime_label(runtime) -> str:
    """device/precision/attention, as runs, commits and canaries record it."""
    return f"{runtime.device}/{runtime.precision}/{runtime.attention}"


class WarmUp(threading.Thread):
    """The warm-up job's thread; ``runtimes`` holds what the workers loaded."""

    def __init__(self, job):
        super().__init__(target=job, name="embed-warm-workers", daemon=True)
        self.runtimes: set[str] = set()


def warm_workers(spark, cfg, torch_threads: int) -> WarmUp:
    """Start every task slot's Python worker and load the model, in the background.

    Spark starts Python workers lazily, at the first Python task: each then
    imports torch and transformers and loads the model (seconds) while its
    core idles. This runs that start-up concurrently with the driver's source
    read and plan; the encode stage then finds warm, reused workers. Each
    worker reports the runtime it loaded (device/precision/attention).
    """
    slots = max(1, spark.sparkContext.defaultParallelism)
    outputs, model_cfg = cfg.outputs, cfg.model

    def warm(batches):
        import torch

        torch.set_num_threads(torch_threads)
        encoder = get_encoder(model_cfg, outputs, task_gpu())
        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"runtime": [runtime_label(encoder.runtime)]})

    def job():
        try:
            rows = (spark.range(slots, numPartitions=slots).mapInArrow(warm, "runtime string")
                    .collect())
            thread.runtimes = {r.runtime for r in rows}
        except Exception as exc:  # a failed warm-up only costs time, never the run
            log.warning("worker warm-up failed: %s", exc)

    thread = WarmUp(job)
    thread.start()
    return thread


def is_local(spark) -> bool:
    return spark.sparkContext.master.startswith("local")


def gpu_profile(spark, cfg):
    """A ResourceProfile asking ``gpus_per_task`` GPUs for the encode stage only.

    None on local masters (Spark refuses ResourceProfiles there) or when no GPUs
    are asked for; reading and writing stages keep the default profile.
    """
    if not cfg.gpus_per_task or is_local(spark):
        return None
    from pyspark.resource import (
        ExecutorResourceRequests,
        ResourceProfileBuilder,
        TaskResourceRequests,
    )

    gpus_per_executor = spark.conf.get("spark.executor.resource.gpu.amount", "1")
    executor = ExecutorResourceRequests().resource("gpu", float(gpus_per_executor))
    task_req = TaskResourceRequests().resource("gpu", cfg.gpus_per_task)
    return ResourceProfileBuilder().require(executor).require(task_req).build


def check_gpu_request(spark, cfg) -> None:
    """device: cuda needs a GPU somewhere: on this machine (local) or on executors."""
    if cfg.model.device != "cuda":
        return
    import torch

    from pipeline.errors import ConfigError

    cluster_gpus = spark.conf.get("spark.executor.resource.gpu.amount", None)
    if is_local(spark) and not torch.cuda.is_available():
        raise ConfigError("model.device", "cuda was asked for but this machine has no CUDA "
                          "device (local master); use device: auto to run on the CPU")
    if not is_local(spark) and not cluster_gpus:
        raise ConfigError("model.device", "cuda was asked for but the cluster requests no "
                          "GPUs: set spark.executor.resource.gpu.amount (see "
                          "conf/spark-defaults.gpu.conf) or use device: auto")


def stats_accumulator(sc):
    """Encoder statistics summed over tasks: rows, tokens, padding, what runtime ran."""
    from pyspark.accumulators import AccumulatorParam

    class StatsParam(AccumulatorParam):
        def zero(self, value):
            return _zero_stats()

        def addInPlace(self, a, b):
            for key, value in b.items():
                a[key] = a[key] | value if key == "runtime" else a[key] + value
            return a

    return sc.accumulator(_zero_stats(), StatsParam())
