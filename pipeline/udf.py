"""Spark adapter: run the encoder core inside ``mapInArrow``.

``mapInArrow`` (rather than ``mapInPandas``) hands the core Arrow batches and
takes Arrow back, so no vector is ever boxed into a pandas object. The model is
loaded once per Python worker (module-level cache, like
``pyspark.ml.functions.predict_batch_udf``) and reused across batches and,
with ``spark.python.worker.reuse``, across tasks. Each task uses the GPU Spark
assigned it (TaskContext resources), else cuda:0 / CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import ModelConfig, OutputSpec

_ENCODERS: dict = {}


def get_encoder(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...], gpu: str | None):
    key = (model_cfg, outputs, gpu)
    if key not in _ENCODERS:
        from pipeline.encoder import Encoder

        _ENCODERS[key] = Encoder(model_cfg, outputs, gpu_address=gpu)
    return _ENCODERS[key]


def task_gpu() -> str | None:
    """The first GPU address Spark assigned to this task, if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpus = ctx.resources().get("gpu")
    return gpus.addresses[0] if gpus and gpus.addresses else None


def output_schema(id_type, outputs: tuple[OutputSpec, ...]):
    from pyspark.sql.types import (
        ArrayType,
        BooleanType,
        FloatType,
        IntegerType,
        StringType,
        StructField,
        StructType,
    )

    fields = [StructField("id", id_type, True), StructField("content_hash", StringType(), True)]
    fields += [StructField(s.name, ArrayType(FloatType(), False), False) for s in outputs]
    fields += [StructField("n_tokens", IntegerType(), False),
               StructField("truncated", BooleanType(), False)]
    return StructType(fields)


def _as_list_array(fixed: pa.FixedSizeListArray) -> pa.ListArray:
    """Spark's ArrayType travels as an Arrow list; rewrap the fixed-size values (no copy)."""
    n, dim = len(fixed), fixed.type.list_size
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, fixed.values)


def make_encode_fn(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...], torch_threads: int,
                   stats_acc=None):
    """The function given to ``mapInArrow``; it closes over plain, picklable config."""

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        encoder = get_encoder(model_cfg, outputs, task_gpu())
        rows = tokens = padded = 0
        seconds = 0.0
        for batch in batches:
            result = encoder.encode(batch.column("text"))
            arrays = [batch.column("id"), batch.column("content_hash")]
            arrays += [_as_list_array(result.columns[s.name]) for s in outputs]
            arrays += [pa.array(result.n_tokens, pa.int32()), pa.array(result.truncated)]
            names = ["id", "content_hash", *(s.name for s in outputs), "n_tokens", "truncated"]
            rows += batch.num_rows
            tokens += int(result.n_tokens.sum())
            padded += int(round(result.n_tokens.sum() / max(result.padding_efficiency, 1e-9)))
            seconds += result.seconds
            yield pa.RecordBatch.from_arrays(arrays, names=names)
        if stats_acc is not None:
            rt = encoder.runtime
            stats_acc.add({"rows": rows, "tokens": tokens, "padded_tokens": padded,
                           "encode_seconds": seconds,
                           "runtime": {f"{rt.device}/{rt.precision}/{rt.attention}"}})

    return encode_batches


def _zero_stats() -> dict:
    return {"rows": 0, "tokens": 0, "padded_tokens": 0, "encode_seconds": 0.0, "runtime": set()}


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
