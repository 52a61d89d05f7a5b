"""Spark adapter: run the encoder core inside ``mapInArrow``.

``mapInArrow`` (rather than ``mapInPandas``) hands the core Arrow batches and
takes Arrow back, so no vector is ever boxed into a pandas object. The model is
loaded once per Python worker (module-level cache, like
``pyspark.ml.functions.predict_batch_udf``) and reused across batches and,
with ``spark.python.worker.reuse``, across tasks. Each task uses the GPU Spark
assigned it (TaskContext resources), else the one ``pipeline.placement`` gives
its partition, else the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import session, storage
from pipeline.config import (
    CHUNK_COLUMNS,
    CHUNK_TEXT,
    ChunkingConfig,
    ModelConfig,
    OutputSpec,
    RunConfig,
)
from pipeline.encoder.codec import to_arrow
from pipeline.encoder.cuts import Calibration
from pipeline.encoder.splade import from_arrow as sparse_from_arrow
from pipeline.encoder.splade import to_arrow as sparse_arrow
from pipeline.encoder.stats import EncoderStats
from pipeline.errors import PipelineError, raised_on_worker
from pipeline.outputs import column_metadata, spark_type, to_spark_arrow
from pipeline.placement import ClusterView, Placement, local_slots
from pipeline.placement import plan as plan_placement
from pipeline.storage import StorageSettings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from pipeline.encoder import Encoder
    from pipeline.encoder.parity import ParityResult

log = logging.getLogger(__name__)
_ENCODERS: dict = {}


def get_encoder(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...], gpu: str | None,
                chunking: ChunkingConfig | None = None) -> Encoder:
    """The worker's encoder for this model, outputs and chunking: loaded once, reused by
    the warm-up, the canary, the calibration sample and every encode task. Never
    mutated per call (int8 ranges are an argument of ``encode``)."""
    key = (model_cfg, outputs, gpu, chunking)
    if key not in _ENCODERS:
        from pipeline.encoder import Encoder

        # One copy of a model per worker: a reused worker that gets another GPU (or
        # other outputs) drops the copy it holds before loading the new one.
        for old in [k for k in _ENCODERS if k[0].name_or_path == model_cfg.name_or_path]:
            del _ENCODERS[old]
        _free_cuda_cache()
        _ENCODERS[key] = Encoder(model_cfg, outputs, gpu_address=gpu, chunking=chunking)
    return _ENCODERS[key]


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placed_model(model_cfg: ModelConfig, placement: Placement) -> ModelConfig:
    """The model config the workers load: the placement's token budget (one GPU's
    budget shared by its tasks) where the config leaves it null."""
    if placement.token_budget is None or model_cfg.token_budget is not None:
        return model_cfg
    return dataclasses.replace(model_cfg, token_budget=placement.token_budget)


def task_encoder(model_cfg: ModelConfig, outputs: tuple[OutputSpec, ...],
                 placement: Placement, chunking: ChunkingConfig | None = None,
                 stores: StorageSettings | None = None) -> Encoder:
    """This task's encoder, on the GPU its placement gives it, with its thread count.
    ``stores``: the driver's storage settings (a model in an object store is copied to
    this node with them; credentials are the node's own)."""
    import os

    import torch
    from pyspark import TaskContext

    if stores is not None:
        storage.use(stores)
    if torch.get_num_threads() != placement.torch_threads:
        torch.set_num_threads(placement.torch_threads)
    if placement.tokenizer_threads > 1:
        os.environ["RAYON_NUM_THREADS"] = str(placement.tokenizer_threads)
    ctx = TaskContext.get()
    gpu = placement.gpu_for(ctx.partitionId() if ctx else 0, task_gpu())
    return get_encoder(placed_model(model_cfg, placement), outputs, gpu, chunking)


def task_gpu() -> str | None:
    """The first GPU address Spark assigned to this task, if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpus = ctx.resources().get("gpu")
    return gpus.addresses[0] if gpus and gpus.addresses else None


def float_specs(outputs: tuple[OutputSpec, ...]) -> tuple[OutputSpec, ...]:
    """The same columns before quantization (what the canary and calibration use)."""
    return tuple(dataclasses.replace(s, dtype="float32") for s in outputs)


def output_schema(id_type: Any, outputs: tuple[OutputSpec, ...], raw: bool = False,
                  model_pooling: str = "mean", chunks: Chunked | None = None,
                  sparse_meta: dict[str, Any] | None = None) -> StructType:
    """The encode stage's rows; stored columns carry their decoding in the column
    metadata (outputs.column_metadata), which Delta keeps in the table's schema.
    Chunked: one row per passage, keyed (id, chunk_index), with its place in the text."""
    from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

    fields = [StructField("id", id_type, True)]
    if chunks is not None:
        fields += [StructField(c, IntegerType(), False) for c in CHUNK_COLUMNS]
        if chunks.store_text:
            fields.append(StructField(CHUNK_TEXT, StringType(), True))
    fields.append(StructField("content_hash", StringType(), True))
    fields += [StructField(s.name, spark_type(s), False, metadata=None if raw else {
        **column_metadata(s, model_pooling), **(sparse_meta or {} if s.kind == "sparse" else {})})
        for s in (float_specs(outputs) if raw else outputs)]
    fields += [StructField("n_tokens", IntegerType(), False),
               StructField("truncated", BooleanType(), False)]
    return StructType(fields)


@dataclasses.dataclass(frozen=True)
class Chunked:
    """A chunked run's encode stage: its chunking, and whether passages' texts are kept."""

    chunking: ChunkingConfig
    store_text: bool = False

    @classmethod
    def of(cls, cfg: RunConfig) -> Chunked | None:
        return cls(cfg.chunking, cfg.sink.store_chunk_text) if cfg.chunking.enabled else None


def chunk_arrays(batch: pa.RecordBatch, result: Any, chunks: Chunked | None
                 ) -> tuple[list, Any]:
    """The id and chunk columns of an encoded batch, and the take() index that repeats
    each input row once per passage (None when not chunked)."""
    if chunks is None:
        return [batch.column("id")], None
    rows = result.chunks
    take = pa.array(rows.doc)
    arrays = [batch.column("id").take(take)]
    arrays += [pa.array(getattr(rows, c), pa.int32()) for c in CHUNK_COLUMNS]
    if chunks.store_text:
        texts = batch.column("text").to_pylist()
        arrays.append(pa.array([texts[d][s:e] for d, s, e in zip(
            rows.doc, rows.char_start, rows.char_end, strict=True)], pa.string()))
    return arrays, take


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    """What an encode task runs; plain, picklable config the mapInArrow function closes
    over. ``raw``: emit every column as float32 before quantization (the canary, the
    calibration sample), from the same cached encoder as the run's encode tasks;
    ``pca``: what ``reduce: pca`` columns emit then (``outputs.cut``); ``carry``: an
    input column passed through as it is (sink.partition_by); ``chunks``: one row per
    passage (id and carry repeated per passage)."""

    model: ModelConfig
    outputs: tuple[OutputSpec, ...]
    placement: Placement
    calibration: Calibration | None = None
    raw: bool = False
    pca: str = "project"
    carry: str | None = None
    chunks: Chunked | None = None
    # each output batch carries its encoder statistics in STATS_COLUMN (JSON on its
    # first row), for a session without accumulators (StatsChannel)
    stats_column: bool = False


# A task's statistics, sent with its rows: EncoderStats JSON on the first row of a batch.
STATS_COLUMN = "_encoder_stats"


def make_encode_fn(job: EncodeJob, stats_acc: Any = None
                   ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function given to ``mapInArrow`` (see :class:`EncodeJob`)."""
    model_cfg, outputs, placement = job.model, job.outputs, job.placement
    calibration, raw, pca, carry, chunks = (job.calibration, job.raw, job.pca, job.carry,
                                            job.chunks)
    raw_specs = float_specs(outputs)
    names = ["id", *((*CHUNK_COLUMNS, *([CHUNK_TEXT] if chunks.store_text else []))
                     if chunks else ()),
             "content_hash", *(s.name for s in outputs), "n_tokens", "truncated"]
    names += [carry] if carry else []
    names += [STATS_COLUMN] if job.stats_column else []
    chunking = chunks.chunking if chunks else None
    stores = storage.settings()

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        encoder = task_encoder(model_cfg, outputs, placement, chunking, stores)
        before = sent = encoder.stats  # the encoder counts; this task reports its share
        first = True
        for batch, prepared in encoder.prefetched(batches, lambda b: b.column("text")):
            result: Any
            if raw:
                floats, result = encoder.encode_float(prepared, calibration, pca)
                # (pca: full: the pooled width, not the column's dim)
                columns = {s.name: sparse_arrow(floats[s.name], "float32")
                           if s.kind == "sparse" else to_arrow(floats[s.name], dataclasses.replace(
                               s, dim=floats[s.name].shape[1])) for s in raw_specs}
            else:
                result = encoder.encode(prepared, calibration)
                columns = result.columns
            arrays, take = chunk_arrays(batch, result, chunks)
            arrays.append(batch.column("content_hash") if take is None
                          else batch.column("content_hash").take(take))
            arrays += [to_spark_arrow(columns[s.name]) for s in outputs]
            arrays += [pa.array(result.n_tokens, pa.int32()), pa.array(result.truncated)]
            if carry:
                arrays.append(batch.column(carry) if take is None
                              else batch.column(carry).take(take))
            if job.stats_column:
                rows = len(arrays[0])
                share = _task_share(encoder.stats, sent, first) if rows else None
                if share is not None:
                    sent, first = encoder.stats, False
                arrays.append(pa.array([share.to_json() if share else None]
                                       + [None] * (rows - 1) if rows else [], pa.string()))
            yield pa.RecordBatch.from_arrays(arrays, names=names)
        if stats_acc is not None:
            stats_acc.add(dataclasses.replace(encoder.stats - before, peak_rss_mb=_peak_rss_mb(),
                                              tasks=1, gpu_tasks=int(bool(encoder.stats.gpus))))

    return encode_batches


def _task_share(now: EncoderStats, sent: EncoderStats, first: bool) -> EncoderStats:
    """What the encoder did since ``sent``; the task itself counted on its first batch."""
    return dataclasses.replace(now - sent, peak_rss_mb=_peak_rss_mb(), tasks=int(first),
                               gpu_tasks=int(first and bool(now.gpus)))


def _peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode(spark: SparkSession, cfg: RunConfig, rows: DataFrame, partitions: int,
           job: EncodeJob, stats: StatsChannel) -> DataFrame:
    """Rows (id, text, content_hash) -> (id, content_hash, every output column, n_tokens,
    truncated), encoded on the executors; the encode stage alone asks for GPUs. The
    tasks' statistics go to ``stats``."""
    job = stats.job(job)
    carry, chunks, placement = job.carry, job.chunks, job.placement
    fn = make_encode_fn(job, stats.accumulator)
    schema = output_schema(rows.schema["id"].dataType, cfg.outputs,
                           model_pooling=cfg.model.pooling, chunks=chunks,
                           sparse_meta=_sparse_meta(cfg))
    if carry:
        schema = schema.add(rows.schema[carry])
    if job.stats_column:
        schema = schema.add(STATS_COLUMN, "string")
    return stats.rows(rows.repartition(partitions)
                      .mapInArrow(fn, schema, profile=gpu_profile(spark, placement)))


def _sparse_meta(cfg: RunConfig) -> dict[str, Any] | None:
    """The sparse columns' model metadata (vocabulary, SpladePooling, tokenizer digest)."""
    if not any(s.kind == "sparse" for s in cfg.outputs):
        return None
    from pipeline.encoder.model import inspect_model, sparse_metadata

    return sparse_metadata(inspect_model(cfg.model.name_or_path, cfg.model.allow_pickle))


def encode_floats(spark: SparkSession, cfg: RunConfig, placement: Placement,
                  rows: DataFrame, request: FloatRequest | None = None
                  ) -> tuple[dict[str, Any], str]:
    """A small set of rows (the canary, a calibration sample) through the run's own
    encode path (same executors, same cached encoders), as float32 before
    quantization. Returns ({column: [N, dim] in id order}, the runtime that ran).
    Chunked runs give each text's passages in order, or with ``first_chunks`` its
    first passage only (one vector per text: the canary)."""
    import pyarrow.compute as pc

    from pipeline import spark as spark_setup

    req = request or FloatRequest()
    chunks = Chunked.of(cfg)
    if chunks is not None:
        chunks = dataclasses.replace(chunks, store_text=False)
    fn = make_encode_fn(EncodeJob(cfg.model, cfg.outputs, placement, req.calibration,
                                  raw=True, pca=req.pca, chunks=chunks, stats_column=True))
    first_chunks = req.first_chunks
    schema = output_schema(rows.schema["id"].dataType, cfg.outputs, raw=True,
                           chunks=chunks).add(STATS_COLUMN, "string")
    encoded = (rows.select("id", "text", "content_hash")
               .repartition(placement.encode_tasks or spark_setup.task_slots(spark))
               .mapInArrow(fn, schema, profile=gpu_profile(spark, placement)))
    keys = ["id"] if chunks is None else ["id", "chunk_index"]
    table = (encoded.select(*keys, *(s.name for s in cfg.outputs), STATS_COLUMN).toArrow()
             .sort_by([(k, "ascending") for k in keys]))
    stats = sum_stats(str(s) for s in table.column(STATS_COLUMN).drop_null().to_pylist())
    if chunks is not None and first_chunks:
        table = table.filter(pc.field("chunk_index") == 0)
    vectors = {s.name: sparse_from_arrow(table.column(s.name), "float32", 0)
               if s.kind == "sparse" else _matrix(table.column(s.name)) for s in cfg.outputs}
    return vectors, stats.runtime_label


def sum_stats(shares: Iterable[str]) -> EncoderStats:
    """The tasks' shares (EncoderStats JSON, from STATS_COLUMN) added up."""
    total = EncoderStats()
    for share in shares:
        total = total + EncoderStats.from_json(share)
    return total


class StatsChannel:
    """How the encode tasks' statistics reach the driver. A classic session: an
    accumulator the tasks add to. A Spark Connect client has none: the statistics come
    with the rows (STATS_COLUMN), which are checkpointed on the executors (as Delta's
    MERGE would materialise them anyway), so the commit and the statistics read the
    same rows and no row is encoded twice."""

    def __init__(self, spark: SparkSession):
        self.accumulator = (stats_accumulator(spark.sparkContext)
                            if session.Capabilities.of(spark).classic else None)
        self._rows: DataFrame | None = None

    def job(self, job: EncodeJob) -> EncodeJob:
        return job if self.accumulator is not None else dataclasses.replace(
            job, stats_column=True)

    def rows(self, encoded: DataFrame) -> DataFrame:
        """The encoded rows to commit (without STATS_COLUMN)."""
        if self.accumulator is not None:
            return encoded
        self._rows = encoded.localCheckpoint(eager=False)
        return self._rows.drop(STATS_COLUMN)

    @property
    def value(self) -> EncoderStats:
        """The statistics of the rows committed (read after the commit)."""
        if self.accumulator is not None:
            return self.accumulator.value
        if self._rows is None:
            return EncoderStats()
        shares = self._rows.where(f"{STATS_COLUMN} IS NOT NULL").select(STATS_COLUMN)
        return sum_stats(row[0] for row in shares.collect())


@dataclasses.dataclass(frozen=True)
class FloatRequest:
    """How :func:`encode_floats` cuts: the table's projections (``calibration``), what
    ``reduce: pca`` columns give (``outputs.cut``), and one passage per text."""

    calibration: Calibration | None = None
    pca: str = "project"
    first_chunks: bool = False


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow list<float> column of equal-length rows -> float32 [N, width]."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(column).to_numpy() if column.num_chunks else np.zeros(0, np.float32)
    width = len(flat) // len(column) if len(column) else 1
    return flat.astype(np.float32, copy=False).reshape(-1, width)


def parity_on_executors(spark: SparkSession, cfg: RunConfig, placement: Placement,
                        texts: list[str]) -> ParityResult:
    """The parity check (pipeline.encoder.parity) in one task on the executors: the
    engine as the encode tasks load it (same device, precision, attention) against
    sentence-transformers itself. Returns the ParityResult."""
    from pipeline.encoder import parity

    model_cfg, outputs = cfg.model, cfg.outputs
    chunking = cfg.chunking if cfg.chunking.enabled else None
    stores = storage.settings()

    def check(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        encoder = task_encoder(model_cfg, outputs, placement, chunking, stores)
        if not encoder.has_model_vectors:  # the run's columns lack the model's vector
            encoder = task_encoder(model_cfg, parity.parity_outputs(encoder.info,
                                                                    encoder.pooling), placement)
        yield pa.RecordBatch.from_pydict({"result": [parity.check(encoder, texts).to_json()]})

    rows = (spark.range(1, numPartitions=1)
            .mapInArrow(check, "result string", profile=gpu_profile(spark, placement))
            .collect())
    return parity.ParityResult.from_json(rows[0].result)


class WarmUp(threading.Thread):
    """The warm-up job's thread; ``runtimes`` holds what the workers loaded, ``error``
    a PipelineError the workers raised (a bad config that no retry mends)."""

    def __init__(self, job: Callable[[], None]):
        super().__init__(target=job, name="embed-warm-workers", daemon=True)
        self.runtimes: set[str] = set()
        self.error: PipelineError | None = None


def warm_workers(spark: SparkSession, cfg: RunConfig, placement: Placement) -> WarmUp:
    """Start every task slot's Python worker and load the model, in the background.

    Spark starts Python workers lazily, at the first Python task: each then
    imports torch and transformers and loads the model (seconds) while its
    core idles. This runs that start-up concurrently with the driver's source
    read and plan; the encode stage then finds warm, reused workers. Each
    worker reports the runtime it loaded (device/precision/attention). As many
    tasks as the encode stage runs at once, on the same GPUs.
    """
    slots = placement.encode_tasks or session.task_slots(spark)
    outputs, model_cfg = cfg.outputs, cfg.model
    chunking = cfg.chunking if cfg.chunking.enabled else None
    stores = storage.settings()

    def warm(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        encoder = task_encoder(model_cfg, outputs, placement, chunking, stores)
        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"runtime": [encoder.runtime.label]})

    def job() -> None:
        try:
            rows = (spark.range(slots, numPartitions=slots)
                    .mapInArrow(warm, "runtime string", profile=gpu_profile(spark, placement))
                    .collect())
            thread.runtimes = {r.runtime for r in rows}
        except Exception as exc:  # a failed warm-up only costs time, never the run ...
            thread.error = raised_on_worker(exc)  # ... unless the workers refused the config
            if thread.error is None:
                log.warning("worker warm-up failed: %s", exc)

    thread = WarmUp(job)
    thread.start()
    return thread


def is_local(spark: SparkSession) -> bool:
    return session.is_local(spark)


def gpu_profile(spark: SparkSession, placement: Placement) -> Any:
    """A ResourceProfile asking the placement's GPUs per task for the encode stage only.

    None on local masters (Spark refuses ResourceProfiles there) or where the
    executors have no GPUs; reading and writing stages keep the default profile.
    """
    if not placement.task_gpu_amount or is_local(spark):
        return None
    from pyspark.resource import (
        ExecutorResourceRequests,
        ResourceProfileBuilder,
        TaskResourceRequests,
    )

    def conf(key: str, default: str) -> str:
        return session.conf_value(spark, key, default) or default

    executor_gpus, task_gpus = profile_requests(
        conf("spark.dynamicAllocation.enabled", "false") == "true",
        conf("spark.executor.resource.gpu.amount", "1"), placement.task_gpu_amount)
    builder = ResourceProfileBuilder().require(TaskResourceRequests().resource("gpu", task_gpus))
    if executor_gpus is not None:
        builder = builder.require(ExecutorResourceRequests().resource("gpu", executor_gpus))
    return builder.build


def profile_requests(dynamic_allocation: bool, executor_amount: str,
                     task_amount: float) -> tuple[int | None, float]:
    """(executor GPUs, task GPUs) the encode stage's profile asks for. Without dynamic
    allocation Spark cannot start executors for a new profile, so the profile asks for
    task resources only (a TaskResourceProfile, served by the default executors, which
    must have GPUs: SPARK-39853 standalone, SPARK-45495 Kubernetes); with it, executors
    of their own. Executor amounts are whole GPUs; only task amounts may be fractions."""
    return (int(float(executor_amount)) if dynamic_allocation else None), task_amount


def observe(spark: SparkSession, cfg: RunConfig) -> ClusterView:
    """What the placement is decided from: the master, cores, this machine's CUDA
    devices (local masters) and the cluster's GPU resource amounts."""
    import os

    def conf(key: str, default: str) -> str:
        return session.conf_value(spark, key, default) or default

    master = session.master(spark)
    machine = os.cpu_count() or 1
    task_cpus = int(conf("spark.task.cpus", "1"))
    slots = local_slots(master, machine)
    executor_cores = int(conf("spark.executor.cores", "0"))
    task_gpus = cfg.spark.gpus_per_task or float(
        conf("spark.task.resource.gpu.amount", "0")) or None
    return ClusterView(
        master=master, machine_cores=machine if slots else executor_cores or task_cpus,
        slots=slots or max(1, (executor_cores or task_cpus) // task_cpus),
        cuda_devices=cuda_device_count() if slots and cfg.model.device != "cpu" else 0,
        executor_gpus=float(conf("spark.executor.resource.gpu.amount", "0")),
        task_gpus=task_gpus, task_cpus=task_cpus, device=cfg.model.device,
        tasks_per_gpu=cfg.spark.tasks_per_gpu, token_budget=cfg.model.token_budget)


def cuda_device_count() -> int:
    """CUDA devices on this machine; no torch import (seconds) where there are none."""
    import glob

    if not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def placement_for(spark: SparkSession, cfg: RunConfig) -> Placement:
    """The run's placement; ``spark.torch_threads`` overrides its thread count."""
    placed = plan_placement(observe(spark, cfg))
    if cfg.spark.torch_threads:
        placed = dataclasses.replace(placed, torch_threads=cfg.spark.torch_threads)
    return placed


def check_gpu_request(spark: SparkSession, cfg: RunConfig) -> None:
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


def stats_accumulator(sc: Any) -> Any:
    """Encoder statistics summed over tasks (:class:`EncoderStats`, ``+``)."""
    from pyspark.accumulators import AccumulatorParam

    class StatsParam(AccumulatorParam):
        def zero(self, value: EncoderStats) -> EncoderStats:
            return EncoderStats()

        def addInPlace(self, a: EncoderStats, b: EncoderStats) -> EncoderStats:
            return a + b

    return sc.accumulator(EncoderStats(), StatsParam())
