"""The one module that wires the stages together, in the order they run:

    preflight ─> read + validate ─> plan ─> calibrate ─> [canary verdict]
      ─> encode + commit ─> quarantine ─> reconcile ─> drift ─> record

Every entry point (``embed run``, ``embed backfill``, ``spark-submit
jobs/embed.py``, Airflow) calls :func:`run`. Checks that need no Spark (config,
model, source path, output dims) run before the JVM starts. Each stage takes
what earlier stages returned and returns a small frozen dataclass; the rules
that depend only on config and table state (blind append or MERGE, rebaseline,
canary first, calibration source, deletes) are decided once, in
:class:`~pipeline.write_plan.WritePlan`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline import (
    catalog,
    changes,
    drift,
    lineage,
    projections,
    sampling,
    session,
    sink,
    source,
    storage,
    up_to_date,
)
from pipeline.config import RunConfig
from pipeline.encoder import parity
from pipeline.encoder.cuts import Calibration, Projection, needs_calibration, needs_projection
from pipeline.encoder.model import ModelInfo
from pipeline.encoder.parity import ParityResult
from pipeline.encoder.stats import EncoderStats
from pipeline.errors import AlreadyCommitted, PipelineError, ReconciliationError, raised_on_worker
from pipeline.placement import Placement
from pipeline.preflight import Preflight, preflight
from pipeline.results import CanaryResult, DriftResult, Partition, RunResult
from pipeline.tables import delta
from pipeline.tables.identity import TableIdentity, check_compatible, ensure_table, set_identity
from pipeline.tables.paths import TablePaths
from pipeline.write_plan import CommitKind, PlanPath, WritePlan

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from pipeline.udf import WarmUp

log = logging.getLogger(__name__)
T = TypeVar("T")
ENCODE_JOB_GROUP = "embed-encode"
# Encode tasks: at most this many rows each (every task pays a fixed cost: its
# Python worker's hand-off, a shuffle read, a tokenizer start; 100 tasks of 2,000
# rows cost 12 s more than 14 of 14,000 on 200,000 rows here, bench/scale.py), and
# at least this many waves of tasks, for a moving progress bar.
MAX_ROWS_PER_TASK = 16_384
MIN_WAVES = 4
# The placement of a run that nothing changed for: no encode stage, no Spark
UP_TO_DATE = "none: the source is as the last run left it (read from the Delta logs, no Spark)"
Progress = Callable[["SparkSession", str], contextlib.AbstractContextManager[Any]]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run knows; fixed before the first stage runs."""

    cfg: RunConfig
    spark: SparkSession
    run_id: str
    started_at: datetime
    info: ModelInfo
    model_fp: str
    identity: TableIdentity  # what this run would record as the table's identity
    stored: TableIdentity | None  # the table's identity before this run (None: no table)
    plan: WritePlan
    placement: Placement  # where the encode stage runs (pipeline.placement)
    paths: TablePaths  # the output table and the tables kept beside it
    partition: Partition | None
    full_refresh: bool = False  # compare the whole source even where CDF could answer
    refresh: dict[str, str] = field(default_factory=dict)  # identity keys to set anew


@dataclass(frozen=True)
class SourceRead:
    df: DataFrame  # as read (after the partition filter)
    tagged: DataFrame  # persisted: every row, with its quarantine reason or null
    rows_read: int
    rows_quarantined: int
    version: int | None  # the Delta version read
    files_hash: str | None  # lineage of a file source (no Delta version)
    path: PlanPath = "full"  # full: the whole source; cdf: the rows its feed says changed
    note: str = ""  # why this path (a fallback's reason)
    changed_ids: DataFrame | None = None  # cdf: every id the feed names (deletes too)

    @property
    def valid(self) -> DataFrame:
        from pyspark.sql import functions as F

        # id, text, content_hash and the sink.partition_by column, if any
        return self.tagged.filter(F.col("reason").isNull()).drop("reason", "raw_value")

    @property
    def quarantined(self) -> DataFrame:
        from pyspark.sql import functions as F

        return self.tagged.filter(F.col("reason").isNotNull())


@dataclass(frozen=True)
class RowPlan:
    todo: DataFrame  # the rows to embed
    rows_todo: int
    rows_skipped: int  # valid rows already embedded (same id and content hash)
    commit: CommitKind
    deleted_ids: DataFrame | None  # output ids gone from the source, to delete
    replaced_ids: DataFrame | None = None  # chunked: stored documents whose text changed
    documents_deleted: int = 0  # chunked: deleted_ids counted (before the commit)

    @property
    def embeds(self) -> bool:
        """Rows go through the encoder (an overwrite writes even an empty source)."""
        return self.commit in ("merge", "insert", "blind_append", "overwrite")


@dataclass(frozen=True)
class Checks:
    """The verdicts awaited before the write: the canary's, and for a new table the
    parity check's (None where none ran)."""

    canary: CanaryResult | None
    parity: ParityResult | None = None


@dataclass(frozen=True)
class Calibrated:
    calibration: Calibration | None
    source: str  # none | table | fit


@dataclass(frozen=True)
class Written:
    commit: delta.Commit | None
    rows_deleted: int  # output rows (chunked: documents) deleted as gone from the source
    output_schema: StructType
    stats: Any  # EncoderStats summed over the encode tasks
    documents: int | None = None  # chunked: the documents the commit's passages are of
    chunks_deleted: int = 0

    @property
    def rows_embedded(self) -> int:
        """Source rows embedded: the commit's rows, or (chunked) their documents."""
        if self.documents is not None:
            return self.documents if self.commit else 0
        return self.commit.rows_written if self.commit else 0

    @property
    def rows_written(self) -> int:
        """Output rows the commit wrote (chunked: passages)."""
        return self.commit.rows_written if self.commit else 0

    @property
    def version(self) -> int | None:
        return self.commit.version if self.commit else None


@dataclass(frozen=True)
class Counts:
    rows_read: int
    rows_embedded: int
    rows_quarantined: int
    rows_skipped: int
    rows_deleted: int


class StageTimer:
    """Wall seconds per stage: ``with timer("plan"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# --------------------------------------------------------------------------- the run


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def run(cfg: RunConfig, spark: SparkSession | None = None, progress: Progress | None = None,
        partition: Partition | None = None, full_refresh: bool = False) -> RunResult:
    """Embed the source (or one partition of it) into the sink.

    ``progress``: optional context-manager factory ``progress(spark, label)``
    shown while the encode job runs (the CLI passes a rich progress bar).
    ``partition``: one value of ``source.partition_column``, committed exactly
    once with its Delta txn id; a partition already committed is a recorded
    skip (status ``skipped``), never a failure. Every other run is recorded in
    the runs table (``running``, then ``succeeded`` or ``failed``) and with
    OpenLineage. With ``drift.distribution.on_breach: fail`` a breach raises
    :class:`~pipeline.errors.DriftBreach` after the run is recorded.
    ``full_refresh``: compare the whole source with the table even where the
    source's Change Data Feed could say what changed.
    """
    from pipeline import spark as spark_setup
    from pipeline import udf

    started = time.perf_counter()
    timer = StageTimer()
    if catalog.has_names(cfg):  # names -> locations: every stage below works on those
        with timer("spark_start"):
            cfg, spark = catalog.located(cfg, spark)
    with timer("preflight"):
        checked = preflight(cfg)
        cfg, info, model_fp = checked.cfg, checked.info, checked.fingerprint
    if partition is None and not full_refresh:
        with timer("plan"):
            unchanged = up_to_date.check(cfg, info, model_fp)
        if unchanged is not None:  # nothing to do, known from the logs: no JVM for it
            return _up_to_date(checked, unchanged, timer, started)
    elif partition is not None and up_to_date.partition_committed(cfg.sink.path, partition):
        started_at = datetime.now(UTC).replace(microsecond=0)  # a re-run, an Airflow retry
        return _skipped(lineage.RunRecorder(None, cfg, lineage.RunMeta(
            new_run_id(started_at), started_at, info, model_fp, partition.value)),
            partition, timer)
    with timer("spark_start"):
        stores = storage.kinds([cfg.source.path, *TablePaths.of(cfg).all()])
        spark = (spark_setup.adopt(spark, cfg.spark, stores) if spark is not None
                 else spark_setup.get_session(cfg.spark, stores))
        spark_setup.check_conditional_writes(spark, cfg.sink.path)
    udf.check_gpu_request(spark, cfg)
    ctx = _context(cfg, spark, info, model_fp, partition, full_refresh)
    recorder = lineage.RunRecorder(spark, cfg, lineage.RunMeta(
        ctx.run_id, ctx.started_at, info, model_fp, partition.value if partition else None))
    if partition and delta.txn_committed(spark, cfg.sink.path, partition.txn):
        return _skipped(recorder, partition, timer)  # nothing recorded as running, no START
    recorder.start()
    try:
        result = _stages(ctx, timer, progress)
    except AlreadyCommitted:  # another run committed this partition meanwhile
        assert partition is not None
        return _skipped(recorder, partition, timer)
    except Exception as exc:
        # A PipelineError raised in a Spark task reaches the driver as a Spark error
        # holding the worker's traceback: every entry point gets the error itself.
        on_worker = raised_on_worker(exc)
        recorder.fail(on_worker or exc, timer.seconds)
        if on_worker is not None:
            raise on_worker from exc
        raise
    result = replace(result, seconds=time.perf_counter() - started,
                     lineage_run_id=recorder.lineage_run_id, stage_seconds=dict(timer.seconds),
                     warnings=list(checked.warnings))
    recorder.succeed(result)
    if cfg.sink.table:  # the runs, drift, canary and quarantine tables by name too
        catalog.name_bookkeeping(spark, cfg)
    drift.enforce_policy(cfg, result)
    return result


def _context(cfg: RunConfig, spark: SparkSession, info: ModelInfo, model_fp: str,
             partition: Partition | None, full_refresh: bool) -> RunContext:
    from pipeline import udf

    started_at = datetime.now(UTC).replace(microsecond=0)
    paths = TablePaths.of(cfg)
    identity = TableIdentity.of_run(cfg, info, model_fp, paths.runs)
    recorded = TableIdentity.read(spark, cfg.sink.path)
    stored = recorded.upgraded(info, model_fp) if recorded is not None else None
    plan = WritePlan.decide(cfg, stored, stored.changes(identity) if stored else frozenset(),
                            backfill=partition is not None, filtered=partition is not None)
    return RunContext(cfg=cfg, spark=spark, run_id=new_run_id(started_at),
                      started_at=started_at, info=info, model_fp=model_fp, identity=identity,
                      stored=stored, plan=plan, placement=udf.placement_for(spark, cfg),
                      paths=paths,
                      partition=partition, full_refresh=full_refresh,
                      refresh=stored.stale(recorded, identity) if stored else {})


def _stages(ctx: RunContext, timer: StageTimer, progress: Progress | None) -> RunResult:
    if ctx.plan.identity_check == "now":  # a config conflict fails before any Spark job
        check_compatible(ctx.stored, ctx.identity, ctx.cfg.sink.path)
    with timer("read_validate"):
        opened = open_source(ctx)  # a missing column fails here, before any Spark job
    background = Background(ctx)
    if ctx.plan.warms_early or ctx.plan.identity_check == "after_canary":
        background.start()  # everything will be embedded: load the model during the read
    src = None
    # One cleanup for every way out: a run that fails early must not exit while its
    # background Spark jobs (warm-up, canary) still run.
    try:
        if ctx.plan.identity_check == "after_canary":
            background.canary_result()  # another model: the canary says what changed
            check_compatible(ctx.stored, ctx.identity, ctx.cfg.sink.path)
        with timer("read_validate"):
            src = read_validate(ctx, opened)
        with timer("plan"):
            rows = plan_rows(ctx, src)
        if rows.embeds:
            background.start()  # a no-op night loads no model and runs no canary
        with timer("calibrate"):
            calibrated = calibrate(ctx, src) if rows.embeds else Calibrated(None, "none")
        with timer("canary_wait"):
            checks = Checks(canary=background.canary_result(),
                            parity=background.parity_result())
        with timer("encode_write"):
            written = encode_commit(ctx, rows, calibrated, checks, background, progress)
        with timer("quarantine"):
            quarantine(ctx, src)
    finally:
        if src is not None:
            src.tagged.unpersist()
        background.join()
    counts = reconcile(ctx, src, rows, written)
    with timer("drift"):
        drifted = measure_drift(ctx, written, calibrated, checks.canary)
    return _result(ctx, src, Outcome(counts, written, calibrated, checks, drifted))


def _skipped(recorder: lineage.RunRecorder, partition: Partition,
             timer: StageTimer) -> RunResult:
    cfg, meta = recorder.cfg, recorder.meta
    message = (f"partition {partition.value} is already committed to {cfg.sink.path} "
               f"(Delta txn {partition.app_id}); nothing to do")
    result = RunResult(
        run_id=meta.run_id, output_path=cfg.sink.path,
        quarantine_path=TablePaths.of(cfg).quarantine,
        rows_read=0, rows_embedded=0, rows_quarantined=0, rows_skipped=0,
        columns=[o.name for o in cfg.outputs], model=meta.info.name if meta.info else "",
        model_fingerprint=meta.model_fp, runtime="-", output_version=None,
        seconds=timer.total, status="skipped", message=message,
        partition=partition.value, stage_seconds=dict(timer.seconds))
    recorder.skip(result)
    log.info(message)
    return result


def _up_to_date(checked: Preflight, unchanged: up_to_date.Unchanged, timer: StageTimer,
                started: float) -> RunResult:
    """A run with nothing to do (:func:`pipeline.up_to_date.check`), recorded as the Spark
    path records one (a succeeded run of no rows, its lineage events), without Spark."""
    cfg, info = checked.cfg, checked.info
    started_at = datetime.now(UTC).replace(microsecond=0)
    run_id = new_run_id(started_at)
    recorder = lineage.RunRecorder(None, cfg, lineage.RunMeta(
        run_id, started_at, info, checked.fingerprint, None))
    recorder.start()
    enabled = cfg.drift.distribution.enabled
    result = RunResult(
        run_id=run_id, output_path=cfg.sink.path, quarantine_path=TablePaths.of(cfg).quarantine,
        rows_read=0, rows_embedded=0, rows_quarantined=0, rows_skipped=0,
        columns=[o.name for o in cfg.outputs], model=info.name,
        model_fingerprint=checked.fingerprint, runtime="-", output_version=None,
        seconds=time.perf_counter() - started, placement=UP_TO_DATE,
        source_version=unchanged.source_version, plan_path="cdf", plan_note=unchanged.note,
        canary_note="skipped: nothing to write" if cfg.drift.canary.enabled else "",
        drift=DriftResult(status="no_rows", message="nothing new to compare") if enabled
        else DriftResult(status="disabled"),
        stage_seconds=dict(timer.seconds), lineage_run_id=recorder.lineage_run_id,
        schemas=unchanged.schemas, warnings=list(checked.warnings))
    recorder.succeed(result)
    return result


# --------------------------------------------------------------------------- stages


class Pending(Generic[T]):
    """A check run on the executors while the driver reads the source (the canary, the
    parity check); its verdict is awaited before anything is written."""

    def __init__(self, future: Future[T]):
        self._future = future

    @classmethod
    def start(cls, name: str, fn: Callable[..., T], *args: Any) -> Pending[T]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")
        future = pool.submit(fn, *args)
        pool.shutdown(wait=False)
        return cls(future)

    def result(self) -> T:
        return self._future.result()  # raises what the check raised (CanaryError ...)

    def wait(self) -> None:
        futures_wait([self._future])


def start_canary(ctx: RunContext) -> Pending[CanaryResult] | None:
    if not ctx.cfg.drift.canary.enabled:
        return None
    baseline = ctx.stored.canary_run if ctx.stored else None
    job = drift.CanaryJob(baseline, ctx.run_id, ctx.model_fp, ctx.plan.rebaseline)
    return Pending.start("canary", drift.run_canary, ctx.spark, ctx.cfg, ctx.placement, job)


def start_parity(ctx: RunContext) -> Pending[ParityResult] | None:
    """The parity check against sentence-transformers, on a new (or replaced) table only."""
    from pipeline import udf

    if not ctx.plan.rebaseline or not ctx.cfg.model.parity_check:
        return None
    texts = parity.canary_slice(drift.canary_texts(ctx.cfg.drift.canary.texts))
    return Pending.start("parity", udf.parity_on_executors, ctx.spark, ctx.cfg, ctx.placement,
                         texts)


class Background:
    """The run's background Spark jobs: the Python workers' warm-up (model load), the
    canary and, for a new table, the parity check. Started during the read when every
    row will be embedded, else only once the plan has rows to embed."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.warm: WarmUp | None = None
        self.canary: Pending[CanaryResult] | None = None
        self.parity: Pending[ParityResult] | None = None
        self.started = False

    def start(self) -> None:
        from pipeline import udf

        if self.started:
            return
        self.started = True
        self.warm = udf.warm_workers(self.ctx.spark, self.ctx.cfg, self.ctx.placement)
        self.canary = start_canary(self.ctx)
        self.parity = start_parity(self.ctx)

    def canary_result(self) -> CanaryResult | None:
        return self.canary.result() if self.canary else None

    def parity_result(self) -> ParityResult | None:
        """The parity verdict (a failed one raises ModelError: nothing is written);
        SKIPPED on a new table with model.parity_check: false; None: no check due."""
        if self.parity is None:
            return parity.SKIPPED if self.ctx.plan.rebaseline and self.started else None
        result = self.parity.result()
        parity.enforce(result, self.ctx.info.name)
        return result

    def runtimes(self) -> set[str]:
        """What the workers loaded (device/precision/attention), once they have."""
        if self.warm is None:
            return set()
        self.warm.join()
        if self.warm.error is not None:
            raise self.warm.error
        return self.warm.runtimes

    def join(self) -> None:
        if self.warm is not None:
            self.warm.join()
        for check in (self.canary, self.parity):
            if check is not None:
                check.wait()


def open_source(ctx: RunContext) -> tuple[DataFrame, int | None]:
    """The source at one pinned version (a Delta source; every pass reads that snapshot),
    its columns checked: (DataFrame, version). Reads only the table's log and schema."""
    pinned = (delta.latest_version(ctx.spark, ctx.cfg.source.path)
              if ctx.cfg.source.format == "delta" else None)
    return source.read_source(ctx.spark, ctx.cfg.source, ctx.cfg.sink.partition_by, pinned)


def read_validate(ctx: RunContext, opened: tuple[DataFrame, int | None]) -> SourceRead:
    """Read the opened source once: the whole of it, or with a Change Data Feed only
    what changed since the last run. Tag every row valid or quarantined and keep that
    snapshot for every later pass."""
    df, version = opened
    files_hash = source.files_hash(df) if version is None else None
    if ctx.partition:
        df = df.filter(ctx.partition.filter)
    last: list[int | None] = []

    def last_version() -> int | None:
        last.append(changes.last_source_version(ctx.spark, ctx.cfg))
        return last[0]

    path, note = ctx.plan.plan_path(
        source_is_delta=version is not None, full_refresh=ctx.full_refresh,
        cdf_enabled=lambda: changes.cdf_enabled(ctx.spark, ctx.cfg.source.path),
        last_version=last_version)
    if path == "cdf" and version is not None and last and last[0] is not None:
        try:
            return _read_changes(ctx, df, version, last[0], note)
        except Exception as exc:  # noqa: BLE001 - the full comparison is always right
            note = changes.why_not(exc, last[0] + 1)
            log.warning(note)
    return _tagged(df, ctx.cfg, version=version, files_hash=files_hash, path="full",
                   note=note)


def _read_changes(ctx: RunContext, snapshot: DataFrame, version: int, last: int,
                  note: str) -> SourceRead:
    if last > version:
        raise PipelineError(f"the source is at version {version}, before the last run's "
                            f"{last} (restored?)")
    if last == version:
        feed = snapshot.limit(0).withColumn("_change_type", snapshot[ctx.cfg.source.id_column]
                                            .cast("string"))
    else:
        feed = changes.latest_changes(ctx.spark, ctx.cfg.source, last + 1, version)
    feed = feed.persist()
    feed.count()  # the feed's files are read here: a vacuumed history fails now
    rows = changes.changed_rows(snapshot, feed, ctx.cfg.source)
    ids = feed.select(ctx.cfg.source.id_column).withColumnRenamed(ctx.cfg.source.id_column, "id")
    return _tagged(rows, ctx.cfg, version=version, files_hash=None, path="cdf",
                   note=f"{note} (versions {last + 1}..{version})", changed_ids=ids)


def _tagged(df: DataFrame, cfg: RunConfig, **fields: Any) -> SourceRead:
    from pyspark.sql import functions as F

    tagged = source.tag_rows(df, cfg.source, cfg.sink.partition_by).persist()
    counts = tagged.agg(F.count(F.lit(1)).alias("n"), F.count("reason").alias("bad")).first()
    assert counts is not None
    return SourceRead(df=df, tagged=tagged, rows_read=int(counts["n"]),
                      rows_quarantined=int(counts["bad"]), **fields)


def plan_rows(ctx: RunContext, src: SourceRead) -> RowPlan:
    """Skip rows whose (id, content hash) is already embedded; decide the commit."""
    plan, valid = ctx.plan, src.valid
    chunked = ctx.cfg.chunking.enabled
    existing = sink.existing_keys(ctx.spark, ctx.cfg.sink.path, chunked) \
        if plan.compares_existing else None
    if existing is not None and src.changed_ids is not None:
        # cdf: only the ids the feed names can be new, changed or gone. The output's
        # keys of those ids, found in one scan, serve the anti-join, the replacement
        # probe and the deletes below (each would scan the whole output again).
        existing = existing.join(src.changed_ids.distinct(), "id", "left_semi").persist()
    todo = valid if existing is None else valid.join(existing, ["id", "content_hash"],
                                                     "left_anti")
    rows_todo = todo.count()
    replaces = bool(plan.probes_replacements and rows_todo and existing is not None and
                    todo.join(existing.select("id"), "id", "left_semi").limit(1).count())
    kind = plan.commit_kind(rows_todo, replaces)
    if kind == "blind_append" and existing is not None:
        # Cut the plan's read of the output table (the anti-join): a write whose
        # data reads its target is no blind append to Delta, and two partitions
        # appending at once would conflict. The rows to embed are fixed here.
        todo = todo.localCheckpoint(eager=True)
    deleted = None
    if plan.applies_deletes and existing is not None:
        stored_ids = existing.select("id")  # cdf: only the ids the feed names (above)
        deleted = stored_ids.join(valid.select("id"), "id", "left_anti")
    replaced, gone = None, 0
    if chunked and replaces and existing is not None:  # their old passages all go
        replaced = todo.select("id").join(existing.select("id"), "id", "left_semi")
    if chunked and deleted is not None:  # the commit counts passages, not documents
        gone = deleted.count()
    return RowPlan(todo=todo, rows_todo=rows_todo,
                   rows_skipped=src.rows_read - src.rows_quarantined - rows_todo,
                   commit=kind, deleted_ids=deleted, replaced_ids=replaced,
                   documents_deleted=gone)


def calibrate(ctx: RunContext, src: SourceRead) -> Calibrated:
    """What the columns fit once per table: ``reduce: pca`` projections, then int8/uint8
    ranges (on the projected values). The table's stored ones, else fitted once on
    a seeded sample encoded on the executors (the canary's path and cached encoders).

    Never per batch and never per run: every later run and backfill reuses what
    the table stores, so the same text always gets the same bytes.
    """
    cfg = ctx.cfg
    need, pca = needs_calibration(cfg.outputs), needs_projection(cfg.outputs)
    if not need and not pca:
        return Calibrated(None, "none")
    if ctx.plan.calibration_source == "table":
        stored = _stored_calibration(ctx)
        if all(s.name in stored.ranges for s in need) and all(
                s.name in stored.projections for s in pca):
            return Calibrated(stored, "table")
    size, seed = cfg.sink.calibration.size, cfg.sink.calibration.seed
    # A seeded hash order is a deterministic sample: same data + seed = same rows.
    sample = sampling.seeded_sample(src.valid, seed, size,
                                    src.rows_read - src.rows_quarantined).cache()
    try:
        return Calibrated(_fit(ctx, sample, need, pca), "fit")
    finally:
        sample.unpersist()


def _stored_calibration(ctx: RunContext) -> Calibration:
    """The table's ranges (a property) and projections (the side table, by digest)."""
    stored = ctx.stored or TableIdentity()
    found = projections.load(ctx.cfg.sink.path, stored.projection_digests)
    ranges = stored.calibration.ranges
    return Calibration(ranges, found)


def _fit(ctx: RunContext, sample: DataFrame, need: list, pca: list) -> Calibration:
    from pipeline import udf

    fitted: dict[str, Projection] = {}
    if pca:  # the normalized pooled vectors of the sample, at full width
        full, _ = udf.encode_floats(ctx.spark, ctx.cfg, ctx.placement, sample,
                                    udf.FloatRequest(pca="full"))
        rows = len(full[pca[0].name])
        try:
            fitted = {s.name: Projection.fit(full[s.name], s.dim, s.center) for s in pca}
        except ValueError as exc:
            raise PipelineError(f"reduce: pca: {exc} (the sample has {rows} rows)") from None
    if not need:
        return Calibration(None, fitted)
    floats, _ = udf.encode_floats(ctx.spark, ctx.cfg, ctx.placement, sample,
                                  udf.FloatRequest(Calibration(None, fitted)))
    if not len(floats[need[0].name]):
        raise PipelineError("int8/uint8 columns need a calibration sample, but the source "
                            "has no valid rows to take it from")
    return Calibration.fit({s.name: floats[s.name] for s in need}, fitted)


def encode_commit(ctx: RunContext, rows: RowPlan, calibrated: Calibrated,
                  checks: Checks, background: Background,
                  progress: Progress | None) -> Written:
    """The rows through the encoder on the executors, into ONE Delta commit."""
    from pipeline import udf

    cfg, spark = ctx.cfg, ctx.spark
    canary = checks.canary
    identity = _final_identity(ctx, calibrated, checks)
    fitted = calibrated.calibration.projections if calibrated.calibration else {}
    if calibrated.source == "fit" and fitted:  # stored before the commit that names them
        projections.store(spark, cfg.sink.path, fitted, cfg.sink.calibration.size, ctx.run_id)
    stats = udf.StatsChannel(spark)
    encoded = sink.with_lineage_columns(
        udf.encode(spark, cfg, rows.todo, _partitions(ctx, rows.rows_todo), udf.EncodeJob(
            cfg.model, cfg.outputs, ctx.placement, calibrated.calibration,
            carry=cfg.sink.partition_by, chunks=udf.Chunked.of(cfg)), stats),
        ctx.info.name, ctx.model_fp, ctx.run_id, ctx.started_at, cfg.sink.partition_by)
    # The encode waits for the warm workers anyway; a config the workers refused
    # (device: cuda without CUDA) fails here, before the table is made.
    loaded = background.runtimes() if rows.embeds else set()
    ensure_table(spark, cfg.sink.path, encoded.schema, identity,
                 deletion_vectors=cfg.sink.deletion_vectors, name=cfg.sink.table)
    _update_identity(ctx, identity, calibrated, canary)
    txn = ctx.partition.txn if ctx.partition else None
    commit = None
    if rows.embeds:
        # The commit names the runtime the workers loaded (the warm-up is done by
        # now, or the encode would wait for the same workers anyway).
        loaded = loaded or ({canary.runtime} if canary else set())
        session.tag_jobs(spark, ENCODE_JOB_GROUP, f"embed run {ctx.run_id}")
        with (progress(spark, f"embedding {rows.rows_todo:,} rows") if progress
              else contextlib.nullcontext()):
            commit = delta.write(spark, encoded, cfg.sink.path, _commit_request(
                ctx, rows, txn, {"runtime": ", ".join(sorted(loaded)),
                                 "placement": ctx.placement.label}))
    elif rows.commit == "mark_txn" and txn:  # nothing to embed: still mark it done, once
        delta.mark_txn(spark, cfg.sink.path, ctx.run_id, txn)
    if commit is not None:
        deleted = commit.rows_deleted
    else:  # nothing to embed, only deletes: their own commit
        deleted = (delta.delete_ids(spark, cfg.sink.path, rows.deleted_ids, ctx.run_id)
                   if rows.deleted_ids is not None else 0)
    encoder_stats = stats.value if commit is not None else EncoderStats()
    if not cfg.chunking.enabled:
        return Written(commit=commit, rows_deleted=deleted, output_schema=encoded.schema,
                       stats=encoder_stats)
    # chunked: the commit counts passages; documents deleted were counted by the plan
    return Written(commit=commit, rows_deleted=rows.documents_deleted,
                   output_schema=encoded.schema,
                   stats=encoder_stats, documents=rows.rows_todo, chunks_deleted=deleted)


def _commit_request(ctx: RunContext, rows: RowPlan, txn: tuple[str, int] | None,
                    meta: dict[str, str]) -> delta.CommitRequest:
    """The encode commit. Chunked tables: keys gain chunk_index, and the ids of changed
    documents join the deletes, so the MERGE replaces all of a document's passages."""
    chunked = ctx.cfg.chunking.enabled
    deletes = rows.deleted_ids if rows.commit != "overwrite" else None
    if chunked and rows.replaced_ids is not None and rows.commit != "overwrite":
        deletes = rows.replaced_ids if deletes is None else deletes.unionByName(
            rows.replaced_ids).distinct()
    return delta.CommitRequest(
        kind=rows.commit, merge_keys=ctx.plan.merge_keys + (("chunk_index",) if chunked else ()),
        replace_matched=ctx.plan.replaces_matched, run_id=ctx.run_id, txn=txn, meta=meta,
        deletes=deletes, partition_by=ctx.cfg.sink.partition_by,
        replace_documents=chunked and deletes is not None)


def _update_identity(ctx: RunContext, identity: TableIdentity, calibrated: Calibrated,
                     canary: CanaryResult | None) -> None:
    """An existing table learns what this run fixed for good: all of its identity on an
    overwrite, else int8 ranges fitted now and a canary stored as its new reference."""
    spark, path = ctx.spark, ctx.cfg.sink.path
    if ctx.plan.rewrites_identity:
        if ctx.stored != identity:
            set_identity(spark, path, identity)
        return
    if ctx.stored is None:
        return  # made with this identity by ensure_table
    update = dict(ctx.refresh)  # an older release's fingerprint, a moved model directory
    if calibrated.source == "fit" and calibrated.calibration:
        update.update({k: identity[k] for k in ("calibration", "projections") if k in identity})
    if canary and ctx.plan.stores_canary_reference(canary.stored_baseline):
        update["canary_run"] = ctx.run_id
    if update:
        set_identity(spark, path, update)


def _final_identity(ctx: RunContext, calibrated: Calibrated, checks: Checks) -> TableIdentity:
    canary = checks.canary
    identity: dict[str, str] = dict(ctx.identity)
    if checks.parity is not None:  # a new or replaced table: how its model was proven
        identity["parity"] = checks.parity.to_json()
    if calibrated.calibration and calibrated.calibration.ranges:
        identity["calibration"] = calibrated.calibration.to_json()
    if calibrated.calibration and calibrated.calibration.projections:
        identity["projections"] = calibrated.calibration.projection_ids()
    if canary is not None:
        identity["canary_run"] = (ctx.run_id if canary.stored_baseline
                                  else canary.baseline_run or "")
    return TableIdentity(identity)


def _partitions(ctx: RunContext, rows_todo: int) -> int:
    from pipeline import spark as spark_setup

    if ctx.placement.kind == "local-gpu":
        # exactly one task per GPU slot: a local master cannot limit GPU tasks otherwise
        return ctx.placement.encode_tasks or 1
    slots = spark_setup.task_slots(ctx.spark)
    tasks = max(slots * MIN_WAVES, math.ceil(rows_todo / MAX_ROWS_PER_TASK))
    # A multiple of the task slots: an odd last wave would run on one core alone.
    return ctx.cfg.spark.partitions or slots * math.ceil(tasks / slots)


def quarantine(ctx: RunContext, src: SourceRead) -> int:
    """Bad rows, with their reasons, into the quarantine table; returns how many."""
    from pyspark.sql import functions as F

    if src.rows_quarantined:
        delta.append_rows(
            src.quarantined.select(
                F.col("id").cast("string").alias("id"), "reason", "raw_value",
                F.lit(ctx.run_id).alias("run_id"),
                F.lit(ctx.started_at).cast("timestamp").alias("quarantined_at")),
            ctx.paths.quarantine, ctx.run_id)
    return src.rows_quarantined


def reconcile(ctx: RunContext, src: SourceRead, rows: RowPlan, written: Written) -> Counts:
    """Rows read = embedded + quarantined + skipped, or the run fails."""
    counts = Counts(rows_read=src.rows_read, rows_embedded=written.rows_embedded,
                    rows_quarantined=src.rows_quarantined, rows_skipped=rows.rows_skipped,
                    rows_deleted=written.rows_deleted)
    if counts.rows_read != counts.rows_embedded + counts.rows_quarantined + counts.rows_skipped:
        raise ReconciliationError(
            f"rows read {counts.rows_read} != embedded {counts.rows_embedded} + quarantined "
            f"{counts.rows_quarantined} + skipped {counts.rows_skipped} (run {ctx.run_id})")
    return counts


def measure_drift(ctx: RunContext, written: Written, calibrated: Calibrated,
                  canary: CanaryResult | None) -> DriftResult:
    """Distribution drift of this run's committed rows, recorded in the drift table.

    The rows are committed already: a failure here is reported (status
    ``error``) and never turns a landed run into a failed one.
    """
    cfg, spark = ctx.cfg, ctx.spark
    if not cfg.drift.distribution.enabled:
        result = DriftResult(status="disabled")
    elif not written.rows_embedded or written.version is None:
        result = DriftResult(status="no_rows", message="nothing new to compare")
    else:
        try:
            landed = drift.Landed(ctx.run_id, written.version, written.rows_written)
            result = drift.distribution(spark, cfg, landed, calibrated.calibration)
        except Exception as exc:
            log.warning("drift check failed: %s", exc)
            return DriftResult(status="error", message=str(exc).splitlines()[0][:500])
    if result.status in ("disabled", "no_rows") and canary is None:
        return result
    try:
        drift.record(spark, cfg, ctx.run_id, written.version, result, canary)
    except Exception as exc:
        log.warning("drift results not recorded: %s", exc)
        result = replace(result, message=f"not recorded: {str(exc).splitlines()[0][:300]}")
    return result


@dataclass(frozen=True)
class Outcome:
    """What the stages after the read made of a run: its counts, its commit, what it
    fitted, the checks before the write and the drift after it."""

    counts: Counts
    written: Written
    calibrated: Calibrated
    checks: Checks
    drifted: DriftResult


def _result(ctx: RunContext, src: SourceRead, outcome: Outcome) -> RunResult:
    counts, written, calibrated = outcome.counts, outcome.written, outcome.calibrated
    checks, drifted = outcome.checks, outcome.drifted
    s = written.stats
    schemas = {"source": [(f.name, f.dataType.simpleString()) for f in src.df.schema.fields],
               "output": [(f.name, f.dataType.simpleString())
                          for f in written.output_schema.fields]}
    return RunResult(
        run_id=ctx.run_id, output_path=ctx.cfg.sink.path,
        quarantine_path=ctx.paths.quarantine, **asdict(counts),
        columns=[o.name for o in ctx.cfg.outputs], model=ctx.info.name,
        model_fingerprint=ctx.model_fp, runtime=s.runtime_label,
        placement=ctx.placement.label, gpus=s.gpu_summary,
        output_version=written.version, seconds=0.0, source_version=src.version,
        chunks_written=written.rows_written if ctx.cfg.chunking.enabled else 0,
        chunks_deleted=written.chunks_deleted,
        encode_seconds=s.seconds, prepare_seconds=s.prepare_seconds,
        encoder_cpu_seconds=s.cpu_seconds,
        worker_peak_rss_mb=s.peak_rss_mb, padding_efficiency=s.padding_efficiency, tokens=s.tokens,
        source_files_hash=src.files_hash, plan_path=src.path, plan_note=src.note,
        canary_note="" if checks.canary or not ctx.cfg.drift.canary.enabled
        else "skipped: nothing to write",
        parity=checks.parity.summary() if checks.parity else "",
        partition=ctx.partition.value if ctx.partition else None,
        calibration=calibrated.source, canary=checks.canary, drift=drifted, schemas=schemas)

