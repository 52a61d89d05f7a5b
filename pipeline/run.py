"""The one module that wires the stages together: source -> plan -> encode -> sink.

Every entry point (``embed run``, ``spark-submit jobs/embed.py``, Airflow) calls
:func:`run`. Checks that need no Spark (config, model, source path, output dims)
run before the JVM starts, so a bad config fails in a second with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from pipeline import drift, lineage, sink, source
from pipeline.config import RunConfig
from pipeline.encoder.engine import validate_outputs
from pipeline.encoder.model import fingerprint, inspect_model
from pipeline.errors import AlreadyCommitted, PipelineError, ReconciliationError
from pipeline.outputs import Calibration, needs_calibration

log = logging.getLogger(__name__)
ENCODE_JOB_GROUP = "embed-encode"
# Rows per encode task: small enough for a moving progress bar and for the two
# task slots to finish together, large enough for length-sorted batches.
ROWS_PER_PARTITION = 2000


@dataclass
class RunResult:
    run_id: str
    output_path: str
    quarantine_path: str
    rows_read: int
    rows_embedded: int
    rows_quarantined: int
    rows_skipped: int
    columns: list[str]
    model: str
    model_fingerprint: str
    runtime: str  # device/precision/attention that actually ran
    output_version: int | None
    seconds: float
    rows_deleted: int = 0
    source_version: int | None = None
    encode_seconds: float = 0.0
    padding_efficiency: float = 1.0
    tokens: int = 0
    stage_seconds: dict = field(default_factory=dict)
    lineage_run_id: str = ""
    source_files_hash: str | None = None
    canary: drift.CanaryResult | None = None  # None: canary off
    drift: drift.DriftResult | None = None
    schemas: dict = field(default_factory=dict, repr=False)  # for lineage events

    @property
    def texts_per_second(self) -> float:
        return self.rows_embedded / self.seconds if self.seconds else 0.0

    @property
    def canary_summary(self) -> str:
        return self.canary.summary() if self.canary else "off"

    @property
    def drift_status(self) -> str:
        return self.drift.status if self.drift else "disabled"

    @property
    def drift_summary(self) -> str:
        return self.drift.summary() if self.drift else "disabled"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("schemas")
        d.update(texts_per_second=self.texts_per_second, canary_summary=self.canary_summary,
                 drift_status=self.drift_status, drift_summary=self.drift_summary)
        return d


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def preflight(cfg: RunConfig):
    """Everything that can be checked without Spark; returns the model info."""
    info = inspect_model(cfg.model.name_or_path, cfg.model.allow_pickle)
    validate_outputs(cfg.outputs, info.hidden_size, info.num_layers)
    source.check_source_path(cfg.source)
    return info


def calibrate(cfg: RunConfig, valid, stored: dict | None) -> Calibration | None:
    """int8/uint8 ranges: the table's stored ones, else fitted once on a seeded sample.

    Never per batch and never per run: every later run and backfill reuses what
    the table stores, so the same text always quantizes to the same bytes.
    """
    from pyspark.sql import functions as F

    need = needs_calibration(cfg.outputs)
    if not need:
        return None
    if stored and stored.get("calibration"):
        calibration = Calibration.from_json(stored["calibration"])
        if all(s.name in calibration.ranges for s in need):
            return calibration
    from pipeline.encoder import Encoder

    size, seed = cfg.sink.calibration.size, cfg.sink.calibration.seed
    # A seeded hash order is a deterministic sample: same data + seed = same rows.
    sample = (valid.orderBy(F.sha2(F.concat(F.lit(f"{seed}:"), F.col("content_hash")), 256))
              .limit(size).select("text").toPandas()["text"].tolist())
    if not sample:
        raise PipelineError("int8/uint8 columns need a calibration sample, but the source "
                            "has no valid rows to take it from")
    float_specs = tuple(dataclasses.replace(s, dtype="float32") for s in need)
    floats, _ = Encoder(cfg.model, float_specs).encode_float(sample)
    return Calibration.fit(floats)


def run(cfg: RunConfig, spark=None, progress=None, source_filter: str | None = None,
        txn: tuple[str, int] | None = None, partition: str | None = None) -> RunResult:
    """Embed the source into the sink; returns counts, timings and lineage ids.

    ``progress``: optional context-manager factory ``progress(spark, label)``
    shown while the encode job runs (the CLI passes a rich progress bar).
    ``source_filter`` (SQL), ``txn`` (Delta app id, version) and ``partition``
    are how a backfill runs one partition exactly once.
    Every run is recorded in the runs table: ``running`` at start, then
    ``succeeded`` with its counts or ``failed`` with its error.
    """
    from pipeline import spark as spark_setup
    from pipeline import udf

    started = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)
    run_id = new_run_id(now)
    info = preflight(cfg)
    t = time.perf_counter()
    model_fp = fingerprint(info)
    fp_seconds = time.perf_counter() - t
    t = time.perf_counter()
    spark = spark or spark_setup.get_session(cfg.spark)
    stages = {"fingerprint": fp_seconds, "spark_start": time.perf_counter() - t}
    udf.check_gpu_request(spark, cfg)
    runs_table = lineage.runs_path(cfg.sink.path, cfg.sink.runs_path)
    lineage_run_id = lineage.new_lineage_run_id()
    emitter = lineage.Emitter(cfg, lineage_run_id, job_name(cfg))
    nominal = _nominal_time(partition)
    base = {
        "run_id": run_id, "started_at": now, "output_path": cfg.sink.path,
        "source_path": cfg.source.path, "model": info.name, "model_fingerprint": model_fp,
        "config_hash": cfg.config_hash(), "mode": cfg.sink.mode, "partition": partition,
        "config_json": json.dumps(cfg.to_dict(), sort_keys=True, default=str),
        "versions": lineage.software_versions(), "lineage_run_id": lineage_run_id,
    }
    lineage.record(spark, runs_table, status="running", **base)
    emitter.emit("START", info=info, model_fp=model_fp, embed_run_id=run_id,
                 nominal_time=nominal)
    try:
        result = _run_stages(cfg, spark, info, model_fp, run_id, now, stages, progress,
                             source_filter, txn, runs_table)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        error = f"{type(exc).__name__}: {message}"[:4000]
        lineage.record(spark, runs_table, status="failed", ended_at=datetime.now(UTC),
                       seconds=time.perf_counter() - started, stage_seconds=stages,
                       error=error, **base)
        emitter.emit("FAIL", info=info, model_fp=model_fp, embed_run_id=run_id, error=error,
                     nominal_time=nominal)
        raise
    result.seconds = time.perf_counter() - started
    result.lineage_run_id = lineage_run_id
    lineage.record(
        spark, runs_table, status="succeeded", ended_at=datetime.now(UTC),
        output_version=result.output_version, source_version=result.source_version,
        runtime=result.runtime, rows_read=result.rows_read, rows_embedded=result.rows_embedded,
        rows_quarantined=result.rows_quarantined, rows_skipped=result.rows_skipped,
        rows_deleted=result.rows_deleted, seconds=result.seconds, stage_seconds=stages,
        source_files_hash=result.source_files_hash,
        canary=result.canary.to_dict() if result.canary else None,
        drift_status=result.drift_status, drift=result.drift.to_dict(), **base)
    emitter.emit("COMPLETE", info=info, model_fp=model_fp, embed_run_id=run_id, result=result,
                 schemas=result.schemas, nominal_time=nominal)
    return result


def job_name(cfg: RunConfig) -> str:
    """The OpenLineage job name: one job per output table."""
    from pathlib import Path

    return "embed." + Path(cfg.sink.path.rstrip("/")).name


def _nominal_time(partition: str | None) -> datetime | None:
    if not partition:
        return None
    try:
        return datetime.fromisoformat(partition).replace(tzinfo=UTC)
    except ValueError:
        return None


def _run_stages(cfg, spark, info, model_fp, run_id, now, stages, progress, source_filter, txn,
                runs_table):
    from pyspark.sql import functions as F

    from pipeline import spark as spark_setup
    from pipeline import udf

    out_path = cfg.sink.path
    identity = sink.table_identity(cfg, info.name, model_fp)
    stored = sink.read_identity(spark, out_path)
    if txn and sink.committed_txn(spark, out_path, txn[0]) >= txn[1]:
        raise AlreadyCommitted(f"{txn[0]} v{txn[1]} is already committed to {out_path}")
    threads = spark_setup.torch_threads(spark, cfg.spark)
    warm = udf.warm_workers(spark, cfg, threads)
    canary = tagged = None
    # One cleanup for every way out: a run that fails early (bad column) must not
    # exit while its background Spark jobs (warm-up, canary) still run.
    try:
        # The canary runs on the executors while the driver reads the source; its
        # verdict is awaited before anything is written.
        changed = stored is not None and not sink.same_identity(stored, identity)
        rebaseline = stored is None or (cfg.sink.mode == "overwrite" and changed)
        baseline_run = (stored or {}).get("canary_run")
        # Another model on a table with a canary: the canary says what changed.
        ask_canary = (cfg.drift.canary.enabled and cfg.sink.mode != "overwrite" and changed
                      and bool(baseline_run))
        if cfg.sink.mode != "overwrite" and not ask_canary:
            sink.check_compatible(stored, identity, out_path)
        if cfg.drift.canary.enabled:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-canary")
            canary = pool.submit(drift.run_canary, spark, cfg, threads, baseline_run, run_id,
                                 model_fp, rebaseline)
            pool.shutdown(wait=False)
        if ask_canary:
            canary.result()  # raises CanaryError when the vectors moved
            sink.check_compatible(stored, identity, out_path)

        # -- source: read once, tag every row, keep the tagged snapshot for all passes
        t = time.perf_counter()
        df, source_version = source.read_source(spark, cfg.source)
        files_hash = source.files_hash(df) if source_version is None else None
        if source_filter:
            df = df.filter(source_filter)
        tagged = source.tag_rows(df, cfg.source).persist()
        rows_read = tagged.count()
        valid = tagged.filter(F.col("reason").isNull()).select("id", "text", "content_hash")
        quarantined = tagged.filter(F.col("reason").isNotNull())
        rows_quarantined = quarantined.count()
        stages["read_validate"] = time.perf_counter() - t

        # -- plan: skip rows whose (id, content_hash) is already embedded
        t = time.perf_counter()
        existing = (sink.existing_keys(spark, out_path)
                    if stored is not None and cfg.sink.mode != "overwrite" else None)
        todo = valid if existing is None else valid.join(existing, ["id", "content_hash"],
                                                         "left_anti")
        rows_todo = todo.count()
        rows_skipped = rows_read - rows_quarantined - rows_todo
        # A backfill partition of only new rows commits as a blind append with its
        # txn id: partitions then never conflict with each other. Changed texts
        # need a MERGE (replace by id).
        blind = bool(txn) and cfg.sink.mode != "overwrite" and (
            existing is None or rows_todo == 0
            or todo.join(existing.select("id"), "id", "left_semi").limit(1).count() == 0)
        if blind and existing is not None:
            # Cut the plan's read of the output table (the anti-join): a write whose
            # data reads its target is no blind append to Delta, and two partitions
            # appending at once would conflict. The rows to embed are fixed here.
            todo = todo.localCheckpoint(eager=True)
        deleted_ids = None
        if existing is not None and cfg.sink.deletes == "delete" and not source_filter:
            deleted_ids = existing.select("id").join(valid.select("id"), "id", "left_anti")
        stages["plan"] = time.perf_counter() - t

        # -- encode + sink: one Delta commit for the whole run
        t = time.perf_counter()
        slots = spark_setup.task_slots(spark)
        # A multiple of the task slots: an odd last wave would run on one core alone.
        partitions = cfg.spark.partitions or slots * max(
            1, math.ceil(rows_todo / (slots * ROWS_PER_PARTITION)))
        calibration = calibrate(cfg, valid, stored if cfg.sink.mode != "overwrite" else None)
        if calibration:
            identity = {**identity, "calibration": calibration.to_json()}
        t_canary = time.perf_counter()
        canary_result = canary.result() if canary is not None else None
        stages["canary_wait"] = time.perf_counter() - t_canary
        if canary_result is not None:
            identity = {**identity, "canary_run": run_id if canary_result.stored_baseline
                        else canary_result.baseline_run}
            if canary_result.stored_baseline and stored is not None \
                    and cfg.sink.mode != "overwrite":
                sink.set_identity(spark, out_path, {"canary_run": run_id})
        stats = udf.stats_accumulator(spark.sparkContext)
        encode_fn = udf.make_encode_fn(cfg.model, cfg.outputs, threads, stats, calibration)
        schema = udf.output_schema(df.schema[cfg.source.id_column].dataType, cfg.outputs)
        encoded = (
            todo.repartition(partitions)
            .mapInArrow(encode_fn, schema, profile=udf.gpu_profile(spark, cfg.spark))
            .select(
                "id", "content_hash", *(s.name for s in cfg.outputs), "n_tokens", "truncated",
                F.lit(info.name).alias("model"), F.lit(model_fp).alias("model_fingerprint"),
                F.lit(run_id).alias("run_id"), F.lit(now).cast("timestamp").alias("embedded_at"))
        )
        sink.ensure_table(spark, out_path, encoded.schema, identity)
        if cfg.sink.mode == "overwrite" and stored != identity:
            sink.set_identity(spark, out_path, identity)
        commit = None
        if rows_todo or cfg.sink.mode == "overwrite":
            # The commit names the runtime the workers loaded (the warm-up is done
            # by now, or the encode would wait for the same workers anyway).
            warm.join()
            loaded = warm.runtimes or ({canary_result.runtime} if canary_result else set())
            spark.sparkContext.setJobGroup(ENCODE_JOB_GROUP, f"embed run {run_id}")
            with (progress(spark, f"embedding {rows_todo:,} rows") if progress
                  else contextlib.nullcontext()):
                commit = sink.write(spark, encoded, out_path, cfg.sink.mode, run_id, txn,
                                    blind=blind, runtime=", ".join(sorted(loaded)) or None)
        elif txn:  # nothing to embed: still mark the partition done, exactly once
            sink.mark_txn(spark, out_path, run_id, txn)
        rows_deleted = sink.delete_ids(spark, out_path, deleted_ids, run_id) \
            if deleted_ids is not None else 0
        stages["encode_write"] = time.perf_counter() - t

        t = time.perf_counter()
        if rows_quarantined:
            sink.append_rows(
                quarantined.select(
                    F.col("id").cast("string").alias("id"), "reason", "raw_value",
                    F.lit(run_id).alias("run_id"),
                    F.lit(now).cast("timestamp").alias("quarantined_at")),
                cfg.sink.quarantine, run_id)
        stages["quarantine"] = time.perf_counter() - t
        schemas = {"source": [(f.name, f.dataType.simpleString()) for f in df.schema.fields],
                   "output": [(f.name, f.dataType.simpleString())
                              for f in encoded.schema.fields]}
    finally:
        if tagged is not None:
            tagged.unpersist()
        warm.join()
        if canary is not None:
            futures_wait([canary])

    rows_embedded = commit.rows_written if commit else 0
    if rows_read != rows_embedded + rows_quarantined + rows_skipped:
        raise ReconciliationError(
            f"rows read {rows_read} != embedded {rows_embedded} + quarantined "
            f"{rows_quarantined} + skipped {rows_skipped} (run {run_id})")
    t = time.perf_counter()
    drift_result = measure_drift(spark, cfg, run_id, commit.version if commit else None,
                                 rows_embedded, runs_table, calibration, canary_result)
    stages["drift"] = time.perf_counter() - t
    s = stats.value
    return RunResult(
        run_id=run_id, output_path=out_path, quarantine_path=cfg.sink.quarantine,
        rows_read=rows_read, rows_embedded=rows_embedded, rows_quarantined=rows_quarantined,
        rows_skipped=rows_skipped, rows_deleted=rows_deleted,
        columns=[o.name for o in cfg.outputs], model=info.name,
        model_fingerprint=model_fp, runtime=", ".join(sorted(s["runtime"])) or "-",
        output_version=commit.version if commit else None, source_version=source_version,
        seconds=0.0, encode_seconds=s["encode_seconds"],
        padding_efficiency=(s["tokens"] / s["padded_tokens"]) if s["padded_tokens"] else 1.0,
        tokens=s["tokens"], stage_seconds=stages, source_files_hash=files_hash,
        canary=canary_result, drift=drift_result, schemas=schemas)


def measure_drift(spark, cfg, run_id, version, rows_embedded, runs_table, calibration,
                  canary_result):
    """Distribution drift of this run's committed rows, recorded in the drift table.

    The rows are committed already: a failure here is reported (status
    ``error``) and never turns a landed run into a failed one.
    """
    if not cfg.drift.distribution.enabled:
        result = drift.DriftResult(status="disabled")
    elif not rows_embedded:
        result = drift.DriftResult(status="no_rows", message="nothing new to compare")
    else:
        try:
            result = drift.distribution(spark, cfg, run_id, version, runs_table, calibration)
        except Exception as exc:
            log.warning("drift check failed: %s", exc)
            return drift.DriftResult(status="error", message=str(exc).splitlines()[0][:500])
    if result.status in ("disabled", "no_rows") and canary_result is None:
        return result
    try:
        drift.record(spark, cfg, run_id, version, result, canary_result)
    except Exception as exc:
        log.warning("drift results not recorded: %s", exc)
        result.message = f"not recorded: {str(exc).splitlines()[0][:300]}"
    return result
