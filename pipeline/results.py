"""The results every stage and entry point reads: pure data, the bottom floor.

``RunResult`` (a run's record), the canary's and drift's verdicts, and a
backfill ``Partition`` (its filter and Delta txn id). No module here imports
another stage: lineage, drift, backfill, the CLI and the DAG all read these,
and ``run.py`` makes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.drift_stats import ColumnDrift

VERDICTS = ("baseline", "same_runtime", "runtime_changed", "model_changed")
TXN_VERSION = 1  # every partition's commit: Delta skips a txn version <= the stored one


@dataclass
class ColumnParity:
    column: str
    rows: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    worst_row: int


@dataclass
class CanaryResult:
    verdict: str  # one of VERDICTS
    runtime: str
    rows: int
    columns: list[ColumnParity] = field(default_factory=list)
    baseline_run: str | None = None
    baseline_runtime: str | None = None
    baseline_fingerprint: str | None = None
    stored_baseline: bool = False  # this run's canary is the table's baseline from now on

    @property
    def min_cosine(self) -> float | None:
        return min((c.min_cosine for c in self.columns), default=None)

    def column(self, name: str) -> ColumnParity | None:
        return next((c for c in self.columns if c.column == name), None)

    def summary(self) -> str:
        if self.verdict == "baseline":
            return f"baseline stored ({self.rows} texts, {self.runtime})"
        worst = min(self.columns, key=lambda c: c.min_cosine)
        text = (f"{self.verdict.replace('_', ' ')}: min cosine {worst.min_cosine:.6f} "
                f"({worst.column}), max |diff| {max(c.max_abs_diff for c in self.columns):.2e} "
                f"vs run {self.baseline_run}")
        if self.baseline_runtime and self.baseline_runtime != self.runtime:
            text += f"; runtime {self.baseline_runtime} -> {self.runtime}"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DriftResult:
    status: str  # ok | breach | no_reference | no_rows | disabled | error
    reference_runs: list[str] = field(default_factory=list)
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    message: str = ""

    @property
    def flags(self) -> list[str]:
        return [f"{name}: {f}" for name, c in self.columns.items() for f in c.flags]

    def summary(self) -> str:
        if self.status == "breach":
            return "breach: " + "; ".join(self.flags)
        if self.status == "ok":
            worst = max(self.columns.values(), key=lambda c: c.centroid_distance)
            return (f"ok vs {len(self.reference_runs)} reference run(s) (max centroid distance "
                    f"{worst.centroid_distance:.4f}, min MMD p "
                    f"{min(c.mmd_p_value for c in self.columns.values()):.3f})")
        return self.status + (f": {self.message}" if self.message else "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Partition:
    """One value of ``source.partition_column``, committed exactly once."""

    column: str
    value: str
    app_id: str  # the Delta txnAppId of this partition's commit

    @property
    def filter(self) -> str:
        """The SQL filter that selects this partition's source rows."""
        escaped = self.value.replace("\\", "\\\\").replace("'", "\\'")
        return f"CAST(`{self.column}` AS STRING) = '{escaped}'"

    @property
    def txn(self) -> tuple[str, int]:
        return self.app_id, TXN_VERSION


@dataclass(frozen=True)
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
    status: str = "succeeded"  # succeeded | skipped (a partition already committed)
    placement: str = ""  # where the encode stage ran (pipeline.placement label)
    gpus: str = ""  # the GPU addresses the encode tasks were given (EncoderStats.gpu_summary)
    message: str = ""
    rows_deleted: int = 0
    chunks_written: int = 0  # chunked tables: passages committed (rows are documents)
    chunks_deleted: int = 0  # chunked tables: stored passages of changed or gone documents
    source_version: int | None = None
    encode_seconds: float = 0.0  # summed over tasks: forward passes, pooling, quantization
    prepare_seconds: float = 0.0  # summed over tasks: tokenizing
    encoder_cpu_seconds: float = 0.0  # summed over tasks: CPU of tokenizing + encoding
    worker_peak_rss_mb: float = 0.0
    plan_path: str = "full"  # full: the whole source compared; cdf: only its changes
    plan_note: str = ""  # why the full comparison ran where CDF could have
    padding_efficiency: float = 1.0
    tokens: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    lineage_run_id: str = ""
    source_files_hash: str | None = None
    partition: str | None = None
    calibration: str = "none"  # none | table | fit: where the int8 ranges came from
    canary: CanaryResult | None = None  # None: canary off, or not run
    canary_note: str = ""  # why no canary ran though it is on
    parity: str = ""  # a new table: the parity check against sentence-transformers
    drift: DriftResult | None = None
    schemas: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)
    # config values that disagree with the model directory's own (the run used them)
    warnings: list[str] = field(default_factory=list)

    @property
    def texts_per_second(self) -> float:
        return self.rows_embedded / self.seconds if self.seconds else 0.0

    @property
    def canary_summary(self) -> str:
        return self.canary.summary() if self.canary else (self.canary_note or "off")

    @property
    def drift_status(self) -> str:
        return self.drift.status if self.drift else "disabled"

    @property
    def drift_summary(self) -> str:
        return self.drift.summary() if self.drift else "disabled"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("schemas")
        d.update(texts_per_second=self.texts_per_second, canary_summary=self.canary_summary,
                 drift_status=self.drift_status, drift_summary=self.drift_summary)
        return d


