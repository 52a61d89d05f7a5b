"""Drift: are today's vectors comparable with yesterday's?

Two checks, both per output column:

* **Canary parity**, before anything is written. A fixed set of reference texts
  (``pipeline/data/canary.jsonl``: 240 texts, 1 to 400 words, stdlib docstrings,
  code, numbers, ten languages) is embedded with the output table's first run
  and stored in ``_embedding_canary``. Every later run re-embeds them on the
  executors that encode its rows and compares row by row (min cosine, max
  absolute difference): ``>= same_runtime`` means the same runtime; ``>=
  min_cosine`` means the runtime changed (attention kernel, precision, library
  version: vectors move by ~1e-5..1e-3) and the run goes on; below that the
  model or its weights changed, and the run stops before writing anything.
* **Distribution drift**, after the commit. This run's new vectors against a
  reference window (the last N runs that embedded rows, or one pinned run):
  centroid cosine distance, MMD with an RBF kernel and a permutation-test
  p-value, the share of dimensions whose two-sample KS test rejects after a
  Benjamini-Hochberg correction, norms, text length and truncation rate.
  Results go to ``_embedding_drift`` (one row per run and column).

The statistics are numpy/scipy on samples (``drift_stats.py``); Spark only
reads the samples and appends the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import CanaryConfig, DistributionConfig, OutputSpec, RunConfig
from pipeline.drift_stats import column_drift, sparse_drift
from pipeline.encoder import splade
from pipeline.encoder.cuts import Calibration, row_cosines
from pipeline.encoder.splade import SparseRows
from pipeline.errors import CanaryError, ConfigError, DriftBreach
from pipeline.results import CanaryResult, ColumnParity, DriftResult
from pipeline.tables import runs
from pipeline.tables.delta import append_records, append_rows, is_delta_table
from pipeline.tables.paths import TablePaths

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.placement import Placement
    from pipeline.results import RunResult

log = logging.getLogger(__name__)

CANARY_FILE = Path(__file__).parent / "data" / "canary.jsonl"
CANARY_SCHEMA = (
    "output_path string, run_id string, canary_id int, text_hash string, `column` string, "
    "vector array<float>, runtime string, model_fingerprint string, stored_at timestamp")
DRIFT_SCHEMA = (
    "run_id string, output_path string, output_version long, `column` string, status string, "
    "flags string, reference_runs string, n_current long, n_reference long, "
    "centroid_distance double, centroid_p_value double, mmd2 double, mmd_p_value double, "
    "drifted_share double, "
    "norm_mean double, norm_std double, ref_norm_mean double, ref_norm_std double, "
    "mean_tokens double, ref_mean_tokens double, truncation_rate double, "
    "ref_truncation_rate double, canary_verdict string, canary_min_cosine double, "
    "canary_max_abs_diff double, computed_at timestamp, "
    # sparse columns (pipeline.drift_stats.sparse_drift); tables from before gain them
    "active_mean double, ref_active_mean double, l1_mean double, ref_l1_mean double, "
    "top_token_overlap double")


# --------------------------------------------------------------------------- canary


def canary_texts(path: str | None = None) -> list[str]:
    """The canary set: a .jsonl file of {"text": ...} or a .txt file, one text a line."""
    file = Path(path) if path else CANARY_FILE
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError("drift.canary.texts", f"{file} line {n} is not a JSON "
                                  'object with a "text" field') from None
    else:
        texts = lines
    if not texts:
        raise ConfigError("drift.canary.texts", f"{file} holds no texts")
    return texts


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compare(stored: dict[str, Any], current: dict[str, Any]) -> list[ColumnParity]:
    """Row-by-row parity of two embeddings of the same texts, per shared column (sparse
    columns: by their dense forms)."""
    out = []
    for name, a in current.items():
        b = stored.get(name)
        if isinstance(a, SparseRows) and isinstance(b, SparseRows):
            width = 1 + max(int(a.indices.max(initial=0)), int(b.indices.max(initial=0)))
            a, b = (dataclasses.replace(x, width=width).dense() for x in (a, b))
        if b is None or isinstance(b, SparseRows) or b.shape != a.shape:
            continue  # a new or resized column: nothing stored to compare with
        cos = row_cosines(a, b)
        out.append(ColumnParity(column=name, rows=len(a), min_cosine=float(cos.min()),
                                mean_cosine=float(cos.mean()),
                                max_abs_diff=float(np.abs(a - b).max()),
                                worst_row=int(cos.argmin())))
    return out


def _rows(vectors: Any, rows: np.ndarray) -> Any:
    return vectors.take(rows) if isinstance(vectors, SparseRows) else vectors[rows]


def verdict(columns: list[ColumnParity], cfg: CanaryConfig) -> str:
    worst = min(c.min_cosine for c in columns)
    if worst >= cfg.same_runtime:
        return "same_runtime"
    if worst >= cfg.min_cosine:
        return "runtime_changed"
    return "model_changed"


def embed_canary(spark: SparkSession, cfg: RunConfig, placement: Placement,
                 texts: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """The canary texts through the run's own encode path (same executors, same
    cached encoders), as float32 before quantization. Returns ({column: [N, dim]},
    the runtime that ran)."""
    import pandas as pd

    from pipeline import udf

    frame = pd.DataFrame({"id": np.arange(len(texts), dtype=np.int64), "text": texts,
                          "content_hash": [text_hash(t) for t in texts]})
    rows = spark.createDataFrame(frame, "id long, text string, content_hash string")
    # reduce: pca columns are checked on their layer's vector truncated to the same
    # dim: the same forward pass, independent of the projection the table fixes
    return udf.encode_floats(spark, cfg, placement, rows,
                             udf.FloatRequest(pca="truncate", first_chunks=True))


@dataclass(frozen=True)
class CanaryJob:
    """One run's canary: the baseline it compares with (None: none stored yet), who runs
    it, and whether its vectors become the table's new baseline whatever they say."""

    baseline_run: str | None
    run_id: str
    model_fp: str
    rebaseline: bool


def store_canary(spark: SparkSession, cfg: RunConfig, job: CanaryJob, runtime: str,
                 texts: list[str], vectors: dict[str, np.ndarray]) -> None:
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    hashes = [text_hash(t) for t in texts]
    rows = [
        {"output_path": cfg.sink.path, "run_id": job.run_id, "canary_id": i,
         "text_hash": hashes[i], "column": name, "vector": _canary_cell(vecs, i),
         "runtime": runtime, "model_fingerprint": job.model_fp, "stored_at": now}
        for name, vecs in vectors.items() for i in range(len(texts))]
    append_records(spark, TablePaths.of(cfg).canary, CANARY_SCHEMA, rows, job.run_id)


def _canary_cell(vectors: Any, i: int) -> list[float]:
    """A canary row's stored vector; a sparse column's is its ids then its weights (float32
    holds ids below 2**24 exactly)."""
    if isinstance(vectors, SparseRows):
        idx, val = vectors.row(i)
        return np.concatenate([idx.astype(np.float32), val]).tolist()
    return vectors[i].tolist()


def _canary_vectors(cells: list[Any], sparse: bool) -> Any:
    if not sparse:
        return np.stack(cells).astype(np.float32)
    rows = [(np.asarray(c[:len(c) // 2], np.int32), np.asarray(c[len(c) // 2:], np.float32))
            for c in cells]
    return SparseRows.from_rows(rows, 0)


def load_canary(spark: SparkSession, path: str, output_path: str, run_id: str,
                sparse: frozenset[str] = frozenset()
                ) -> tuple[list[str], dict[Any, Any], str, str] | None:
    """(text hashes, {column: [N, dim]}, runtime, fingerprint) stored by ``run_id``,
    or None."""
    from pyspark.sql import functions as F

    if not is_delta_table(path):
        return None
    pdf = (spark.read.format("delta").load(path)
           .filter((F.col("output_path") == output_path) & (F.col("run_id") == run_id))
           .toPandas())
    if pdf.empty:
        return None
    pdf = pdf.sort_values(["column", "canary_id"])
    vectors = {name: _canary_vectors(list(group["vector"]), name in sparse)
               for name, group in pdf.groupby("column")}
    first = pdf[pdf["column"] == pdf["column"].iloc[0]]
    return (first["text_hash"].tolist(), vectors, str(pdf["runtime"].iloc[0]),
            str(pdf["model_fingerprint"].iloc[0]))


def run_canary(spark: SparkSession, cfg: RunConfig, placement: Placement,
               job: CanaryJob) -> CanaryResult:
    """Embed the canary; compare it with the table's stored one, or store it as the baseline.

    ``job.rebaseline`` (a new table, or an overwrite): the result is stored as the new
    baseline and never fails the run. Otherwise a ``model_changed`` verdict raises
    :class:`CanaryError` before anything of the run is written.
    """
    baseline_run, model_fp, rebaseline = job.baseline_run, job.model_fp, job.rebaseline
    texts = canary_texts(cfg.drift.canary.texts)
    current, runtime = embed_canary(spark, cfg, placement, texts)
    path = TablePaths.of(cfg).canary
    sparse = frozenset(s.name for s in cfg.outputs if s.kind == "sparse")
    stored = None if not baseline_run else load_canary(spark, path, cfg.sink.path,
                                                       baseline_run, sparse)
    result = CanaryResult(verdict="baseline", runtime=runtime, rows=len(texts))
    if stored is not None:
        hashes, vectors, base_runtime, base_fp = stored
        index = {h: i for i, h in enumerate(hashes)}
        pairs = [(i, index[text_hash(t)]) for i, t in enumerate(texts) if text_hash(t) in index]
        if pairs:
            mine, theirs = (np.array(x) for x in zip(*pairs, strict=True))
            columns = compare({k: _rows(v, theirs) for k, v in vectors.items()},
                              {k: _rows(v, mine) for k, v in current.items()})
            if columns:
                result = CanaryResult(
                    verdict=verdict(columns, cfg.drift.canary), runtime=runtime, rows=len(pairs),
                    columns=columns, baseline_run=baseline_run, baseline_runtime=base_runtime,
                    baseline_fingerprint=base_fp)
    if result.verdict == "model_changed" and not rebaseline:
        worst = min(result.columns, key=lambda c: c.min_cosine)
        what = ("the weights' fingerprint differs too"
                if result.baseline_fingerprint != model_fp else
                "the weights' fingerprint is the same: tokenizer, config or model code changed")
        raise CanaryError(
            f"canary: the model or its weights changed: min cosine {worst.min_cosine:.4f} on "
            f"column {worst.column} (text #{worst.worst_row}) is below drift.canary.min_cosine "
            f"{cfg.drift.canary.min_cosine} against the canary stored by run "
            f"{result.baseline_run} ({result.baseline_runtime}); this run: {runtime}, {what} "
            f"({(result.baseline_fingerprint or '-')[:12]} -> {model_fp[:12]}). Nothing was "
            f"written to {cfg.sink.path}; write to a new sink.path or set sink.mode: overwrite")
    if rebaseline or result.verdict == "baseline":
        store_canary(spark, cfg, job, runtime, texts, current)
        result.stored_baseline = True
    log.info("canary: %s", result.summary())
    return result


# --------------------------------------------------------------------------- distribution


def decode(values: Sequence[Any], spec: dict[str, Any],
           calibration: Calibration | None = None) -> Any:
    """Stored cells of one column -> float32 [N, dim] (int8/uint8 dequantized when the
    table's ranges are known; binary as +-1 per bit)."""
    from pipeline.encoder import codec

    output = OutputSpec(**spec)
    if output.kind == "sparse":
        return splade.from_cells(values, output.dtype, 0)
    return codec.to_float(codec.from_cells(values, output), output, calibration)


def reference_runs(spark: SparkSession, runs_path: str, output_path: str, run_id: str,
                   cfg: DistributionConfig) -> list[str]:
    """The pinned baseline run, or the last N succeeded runs that embedded rows."""
    if cfg.baseline_run:
        return [] if cfg.baseline_run == run_id else [cfg.baseline_run]
    if not is_delta_table(runs_path):
        return []
    found = runs.latest(runs_path, limit=1000, output_path=output_path, spark=spark)
    found = found[(found["status"] == "succeeded") & (found["rows_embedded"].fillna(0) > 0)
                  & (found["run_id"] != run_id)]
    return found["run_id"].head(cfg.reference_runs).tolist()


def store_sample(spark: SparkSession, cfg: RunConfig, landed: Landed) -> None:
    """Keep a seeded sample (``drift.distribution.sample`` rows) of what this run wrote,
    so later runs compare with it without reading the output table: the cost is a
    scan of this run's own rows (its files, by the run_id statistics), not of the table."""
    from pyspark.sql import functions as F

    from pipeline.sampling import seeded_sample

    d = cfg.drift.distribution
    run_id, rows_written = landed.run_id, landed.rows_written
    mine = (spark.read.format("delta").option("versionAsOf", landed.version)
            .load(cfg.sink.path).filter(F.col("run_id") == run_id))
    columns = ["run_id", "content_hash", "n_tokens", "truncated", *(s.name for s in cfg.outputs)]
    append_rows(seeded_sample(mine, d.seed, d.sample, rows_written).select(*columns)
                .coalesce(1), TablePaths.of(cfg).samples, run_id)


@dataclass(frozen=True)
class SampleRequest:
    """Whose rows to sample (this run, and the reference runs), which columns, how many a
    side, with which seed."""

    run_id: str
    refs: list[str]
    columns: list[str]
    size: int
    seed: int = 0


@dataclass(frozen=True)
class Landed:
    """What a run committed: its id, the output version, and how many rows it wrote."""

    run_id: str
    version: int
    rows_written: int


def sample_rows(spark: SparkSession | None, output_path: str, version: int | None,
                want: SampleRequest) -> tuple[Any, Any]:
    """Seeded, repeatable samples (pandas) of the rows written by this run and by the
    reference runs, at most ``size`` each: from the runs' stored samples (delta-rs where
    the table is local), and, for a run that stored none (older releases), from its rows
    in the output table (Spark; ``spark`` None: a local session is started for it)."""
    import pandas as pd
    from pyspark.sql import functions as F

    from pipeline.sampling import order_key, seeded_sample
    from pipeline.spark import session_for

    run_id, columns, size, seed = want.run_id, want.columns, want.size, want.seed
    wanted = [run_id, *want.refs]
    keep = ["run_id", "content_hash", *columns, "n_tokens", "truncated"]
    frames = []
    samples = TablePaths.beside(output_path).samples
    if is_delta_table(samples):
        frames.append(_stored_samples(spark, samples, wanted, keep, seed))
    have = set(frames[0]["run_id"]) if frames else set()
    missing = [r for r in wanted if r not in have]
    if missing:  # runs of releases that stored no sample: from their rows in the table
        reader = session_for(spark, "embed-drift", output_path).read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        table = reader.load(output_path)
        for r in missing:
            frames.append(seeded_sample(table.filter(F.col("run_id") == r), seed, size,
                                        10 * size).select(*keep)
                          .withColumn("_key", order_key(seed)).toPandas())
    pdf = pd.concat(frames, ignore_index=True).sort_values("_key")
    current = pdf[pdf["run_id"] == run_id].head(size)
    reference = pdf[pdf["run_id"] != run_id].head(size)
    return (current.drop(columns=["_key"]).reset_index(drop=True),
            reference.drop(columns=["_key"]).reset_index(drop=True))


def _stored_samples(spark: SparkSession | None, path: str, run_ids: list[str],
                    columns: list[str], seed: int) -> Any:
    """The stored sample rows of these runs (pandas) with their seeded order key
    (``_key``: sha256 of "<seed>:<content hash>", as :func:`~pipeline.sampling.
    order_key` computes it in Spark): delta-rs, local or remote; Spark where delta-rs
    will not read the table."""
    import pyarrow.compute as pc

    from pipeline import deltars
    from pipeline.spark import session_for

    with contextlib.suppress(deltars.NotReadableHere):
        found = deltars.dataset(path).to_table(
            columns=columns, filter=pc.field("run_id").isin(run_ids)).to_pandas()
        found["_key"] = [hashlib.sha256(f"{seed}:{h}".encode()).hexdigest()
                         for h in found["content_hash"]]
        return found
    return stored_samples_spark(session_for(spark, "embed-drift", path), path, run_ids, columns,
                                seed)


def stored_samples_spark(spark: SparkSession, path: str, run_ids: list[str],
                         columns: list[str], seed: int) -> Any:
    """:func:`_stored_samples` read by Spark: a table delta-rs refuses."""
    from pyspark.sql import functions as F

    from pipeline.sampling import order_key

    return (spark.read.format("delta").load(path)
            .filter(F.col("run_id").isin(run_ids)).select(*columns)
            .withColumn("_key", order_key(seed)).toPandas())


def distribution(spark: SparkSession, cfg: RunConfig, landed: Landed,
                 calibration: Calibration | None = None) -> DriftResult:
    """This run's new vectors vs the reference window, per column; stores this run's
    sample first, for the runs that will compare with it."""
    from pipeline.outputs import describe

    d = cfg.drift.distribution
    run_id, version = landed.run_id, landed.version
    store_sample(spark, cfg, landed)
    refs = reference_runs(spark, TablePaths.of(cfg).runs, cfg.sink.path, run_id, d)
    if not refs:
        return DriftResult(status="no_reference", message="no earlier run to compare with")
    specs = describe(cfg.outputs)
    names = [s["name"] for s in specs]
    cur, ref = sample_rows(spark, cfg.sink.path, version,
                           SampleRequest(run_id, refs, names, d.sample, d.seed))
    if len(cur) < 2 or len(ref) < 2:
        return DriftResult(status="no_reference", reference_runs=refs,
                           message=f"too few rows to compare ({len(cur)} vs {len(ref)})")
    columns = {}
    for spec in specs:
        a = decode(cur[spec["name"]].to_numpy(), spec, calibration)
        b = decode(ref[spec["name"]].to_numpy(), spec, calibration)
        stats = sparse_drift(a, b) if isinstance(a, SparseRows) else column_drift(a, b, d)
        columns[spec["name"]] = stats.with_text_stats(
            cur["n_tokens"].to_numpy(), ref["n_tokens"].to_numpy(),
            cur["truncated"].to_numpy(), ref["truncated"].to_numpy())
    status = "breach" if any(c.flags for c in columns.values()) else "ok"
    return DriftResult(status=status, reference_runs=refs, columns=columns)


def enforce_policy(cfg: RunConfig, result: RunResult) -> None:
    """``drift.distribution.on_breach: fail``: a run whose committed rows drifted raises
    :class:`DriftBreach` (exit 9) once it is recorded, whatever started it (``embed
    run``, ``embed backfill``, spark-submit, Airflow)."""
    if result.drift_status != "breach" or cfg.drift.distribution.on_breach != "fail":
        return
    raise DriftBreach(f"drift {result.drift_summary} (run {result.run_id}; its rows are "
                      f"committed as version {result.output_version}; see embed drift "
                      f"--table {cfg.sink.path})", result=result)


def record(spark: SparkSession, cfg: RunConfig, run_id: str, version: int | None,
           result: DriftResult, canary: CanaryResult | None) -> None:
    """Append one row per output column to the drift table."""
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    rows = []
    for spec in cfg.outputs:
        column = result.columns.get(spec.name)
        stats = asdict(column) if column is not None else {}
        parity = canary.column(spec.name) if canary else None
        row = dict(stats)
        row.update(run_id=run_id, output_path=cfg.sink.path, output_version=version,
                   column=spec.name, status=result.status,
                   flags=json.dumps(stats.get("flags", [])),
                   reference_runs=json.dumps(result.reference_runs),
                   canary_verdict=canary.verdict if canary else None,
                   canary_min_cosine=parity.min_cosine if parity else None,
                   canary_max_abs_diff=parity.max_abs_diff if parity else None,
                   computed_at=now)
        rows.append(row)
    append_records(spark, TablePaths.of(cfg).drift, DRIFT_SCHEMA, rows, run_id,
                   merge_schema=True)


def stored_flags(rows: Any) -> list[str]:
    """"column: check" for every check the stored drift rows (``latest``) tripped."""
    return [f"{r.column}: {f}" for r in rows.itertuples() for f in json.loads(r.flags or "[]")]


def latest(spark: SparkSession | None, path: str, output_path: str | None = None,
           run_id: str | None = None) -> Any:
    """Drift rows of one run (default: the latest run with rows), as pandas: read with
    delta-rs where the table is local, else with Spark (``spark`` None: a local one)."""
    from pipeline.tables.delta import read_records

    equal = {k: v for k, v in (("output_path", output_path), ("run_id", run_id)) if v}
    rows = read_records(spark, path, equal)
    if not run_id and not rows.empty:
        rows = rows[rows["run_id"] == rows.sort_values("computed_at")["run_id"].iloc[-1]]
    return rows.reset_index(drop=True)
