"""The sink-mode rules of a run, decided once, in one pure object (no Spark).

Every choice a run makes from its config and the output table's state lives
here: compare with the table or not, blind append or MERGE, whether the canary
must answer before the identity check, whether the canary is stored as a new
baseline, where int8 ranges come from, whether deletes apply, whether the
table's identity is rewritten. ``run.py`` asks; it never re-derives a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.config import RunConfig, SinkMode

# How a run's rows reach the output table (every kind but blind_append reads the
# target, so two writers conflict in Delta's commit check instead of doubling rows):
#   merge: MERGE on id replacing changed texts' rows and inserting new ones (the
#          encoded rows are materialized once: MERGE passes over its source twice)
#   insert: insert-only MERGE (no row to embed has an id in the table): one pass,
#          no materialization, no file of the table rewritten
#   blind_append: a backfill partition of new ids only, with its txn id; never
#          conflicts with other partitions
#   overwrite: replace the table
#   mark_txn: a backfill partition with nothing to embed records its txn id only
#   none: nothing to write
CommitKind = Literal["merge", "insert", "blind_append", "overwrite", "mark_txn", "none"]
# Which rows a run compares: full, the whole source against the table; cdf, only
# what the source's Change Data Feed says changed since the last run's version.
PlanPath = Literal["full", "cdf"]
# When the stored identity (model, outputs...) is checked against this run's:
#   now: before anything runs; after_canary: once the canary says what changed
#   (another model on a table with a canary); never: overwrite replaces it anyway
IdentityCheck = Literal["now", "after_canary", "never"]
MODEL_KEYS = frozenset({"model", "model_fingerprint"})
CalibrationSource = Literal["table", "fit"]


@dataclass(frozen=True, kw_only=True)
class WritePlan:
    mode: SinkMode
    table_exists: bool
    # identity keys (model, model_fingerprint, pooling, max_length, prompt, outputs)
    # whose stored value differs from this run's
    changes: frozenset[str]
    canary_enabled: bool
    has_canary_baseline: bool  # the table names the run whose canary it stores
    backfill: bool  # a partition committed with its own Delta txn id
    filtered: bool  # only part of the source is read (a partition)
    delete_missing: bool  # sink.deletes: delete

    @classmethod
    def decide(cls, cfg: RunConfig, stored: Mapping[str, str] | None, changes: frozenset[str],
               backfill: bool, filtered: bool) -> WritePlan:
        """``stored``: the output table's identity (None: no table yet)."""
        return cls(mode=cfg.sink.mode, table_exists=stored is not None, changes=changes,
                   canary_enabled=cfg.drift.canary.enabled,
                   has_canary_baseline=bool((stored or {}).get("canary_run")),
                   backfill=backfill, filtered=filtered,
                   delete_missing=cfg.sink.deletes == "delete")

    @property
    def identity_changed(self) -> bool:
        return bool(self.changes)

    @property
    def compares_existing(self) -> bool:
        """Rows already embedded (same id and content hash) are skipped."""
        return self.table_exists and self.mode != "overwrite"

    @property
    def rebaseline(self) -> bool:
        """This run's canary becomes the table's reference (a new or replaced table)."""
        return not self.table_exists or (self.mode == "overwrite" and self.identity_changed)

    @property
    def ask_canary_first(self) -> bool:
        """Another model (name or weights, nothing else) on a table with a stored canary:
        the canary's verdict says what changed (the vectors, or only the packaging)
        before the identity error. A changed max_length, prompt, pooling or output
        layout is a config conflict: the identity check says so at once."""
        return (self.canary_enabled and self.mode != "overwrite" and self.has_canary_baseline
                and self.identity_changed and self.changes <= MODEL_KEYS)

    @property
    def identity_check(self) -> IdentityCheck:
        if self.mode == "overwrite":
            return "never"
        return "after_canary" if self.ask_canary_first else "now"

    @property
    def calibration_source(self) -> CalibrationSource:
        """int8 ranges: the table's own (when they cover every column), else a fit on a
        seeded sample. Fitted once per table, so the same text gets the same bytes."""
        return "table" if self.compares_existing else "fit"

    @property
    def applies_deletes(self) -> bool:
        """Delete output ids gone from the source; never from a partial (partition) read,
        where every id outside the partition would look deleted."""
        return self.compares_existing and self.delete_missing and not self.filtered

    @property
    def rewrites_identity(self) -> bool:
        """An overwrite replaces the existing table's properties with this run's identity
        (model, outputs, freshly fitted int8 ranges) where they differ."""
        return self.mode == "overwrite" and self.table_exists

    @property
    def probes_replacements(self) -> bool:
        """An incremental run into an existing table learns whether any row to embed
        replaces a stored one (a changed text: then it needs a full MERGE; new ids only
        are an insert, or for a backfill partition a blind append). In append mode a
        new (id, content hash) pair never replaces a row."""
        return self.compares_existing and self.mode == "incremental"

    @property
    def warms_early(self) -> bool:
        """Every source row will be embedded (a new table, an overwrite): start the
        Python workers, the model load and the canary while the driver reads. An
        incremental run starts them only once its plan has rows to embed, so a
        night with nothing new loads no model."""
        return not self.compares_existing

    @property
    def merge_keys(self) -> tuple[str, ...]:
        """incremental replaces a changed text by id; append inserts new (id, content
        hash) pairs only."""
        return ("id",) if self.mode == "incremental" else ("id", "content_hash")

    @property
    def replaces_matched(self) -> bool:
        return self.mode == "incremental"

    def stores_canary_reference(self, canary_stored_baseline: bool) -> bool:
        """The canary stored a new baseline into a table that keeps its other properties:
        point the table at it."""
        return canary_stored_baseline and self.table_exists and self.mode != "overwrite"

    def commit_kind(self, rows_todo: int, replaces_rows: bool) -> CommitKind:
        """How the rows to embed are committed. ``replaces_rows``: some row to embed has
        an id already in the table (a changed text)."""
        if self.mode == "overwrite":
            return "overwrite"
        if rows_todo == 0:
            return "mark_txn" if self.backfill else "none"
        if replaces_rows and self.mode == "incremental":
            return "merge"
        return "blind_append" if self.backfill else "insert"

    def plan_path(self, *, source_is_delta: bool, full_refresh: bool,
                  cdf_enabled: Callable[[], bool],
                  last_version: Callable[[], int | None]) -> tuple[PlanPath, str]:
        """CDF when the source's Change Data Feed can say what changed since the last
        successful run, else the full comparison, with the reason (for the summary
        and the runs table). The two facts that cost a Spark job are asked for only
        when no cheaper reason rules the feed out."""
        reasons: list[tuple[Callable[[], bool], str]] = [
            (lambda: full_refresh, "--full-refresh"),
            (lambda: not self.compares_existing, "the table is new or replaced"),
            (lambda: self.filtered, "a partition run reads its partition"),
            (lambda: not source_is_delta, "the source is not a Delta table"),
            (lambda: not cdf_enabled(), "Change Data Feed is off on the source "
                                        "(delta.enableChangeDataFeed)")]
        why = next((reason for hit, reason in reasons if hit()), None)
        if why:
            return "full", why
        last = last_version()
        if last is None:
            return "full", "no earlier successful run recorded a source version"
        return "cdf", f"changes since source version {last}"
