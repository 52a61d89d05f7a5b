"""What made an output table: its identity, kept in the table's ``embed.*`` properties.

One type, :class:`TableIdentity`, for every reader and writer of it: the run that
makes or checks a table, the commit that updates it, ``embed search`` (delta-rs)
and the write plan. It maps keys (without the ``embed.`` prefix) to strings, as
Delta keeps them; the typed accessors decode the JSON ones.

Keys that decide the stored vectors (:data:`COMPARED`): a run whose values differ is
refused before anything is written. The others record what was fixed once for
the table (int8 ranges, projections, the canary run, the parity check) or where
things are (the model directory, the runs table).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import SinkConflictError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructType

    from pipeline.config import OutputSpec, RunConfig
    from pipeline.encoder.cuts import Calibration
    from pipeline.encoder.model import ModelInfo

PREFIX = "embed."
# partition_by, chunking, head and backend are there only when set, so tables made
# before they existed keep matching.
COMPARED = ("model", "model_fingerprint", "pooling", "max_length", "prompt", "outputs",
            "partition_by", "chunking", "head", "backend")
# Keys an older release recorded otherwise (or a moved model directory), set anew on
# the table's next commit (:meth:`TableIdentity.stale`).
REFRESHED = ("model_fingerprint", "model_path", "runs_path")


@dataclass(frozen=True)
class TableIdentity(Mapping[str, str]):
    entries: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, key: str) -> str:
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ making
    @classmethod
    def of_run(cls, cfg: RunConfig, info: ModelInfo | None, fingerprint: str,
               runs_path: str | None = None) -> TableIdentity:
        """What a table made by this run records (``cfg``: resolved by the preflight, so
        the model's own pooling, max length and document prompt)."""
        from pipeline.outputs import describe

        head = info.modules.head() if info else None
        backend = cfg.model.backend
        values = {
            "model": info.name if info else "",
            "model_fingerprint": fingerprint,
            "pooling": str(cfg.model.pooling),
            "max_length": str(cfg.model.max_length),
            "prompt": cfg.model.prompt or "",
            "outputs": json.dumps(describe(cfg.outputs), sort_keys=True),
            **({"partition_by": cfg.sink.partition_by} if cfg.sink.partition_by else {}),
            **({"chunking": chunking_identity(cfg)} if cfg.chunking.enabled else {}),
            **({"head": json.dumps(head, sort_keys=True)} if head else {}),
            **({"backend": backend} if backend != "torch" else {}),
            **({"model_path": info.location} if info else {}),
            **({"runs_path": runs_path} if runs_path else {}),
        }
        return cls(values)

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> TableIdentity:
        return cls({k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)})

    @classmethod
    def read(cls, spark: SparkSession | None, path: str) -> TableIdentity | None:
        """The table's identity (empty: a Delta table embed did not make; None: no table).
        The log is read with delta-rs, local or remote (no Spark job: in a new JVM,
        Spark's first Delta read costs seconds); with Spark only where delta-rs cannot
        open it (``spark`` None: a local session)."""
        from deltalake.exceptions import DeltaError

        from pipeline import deltars
        from pipeline.tables.delta import is_delta_table

        if not is_delta_table(path):
            return None
        with contextlib.suppress(DeltaError):
            return cls.from_properties(deltars.open_table(path).metadata().configuration)
        from pipeline.spark import session_for
        from pipeline.tables.delta import table_ref

        spark = session_for(spark, "embed-identity", path)
        detail = spark.sql(f"DESCRIBE DETAIL {table_ref(path)}").collect()[0]
        return cls.from_properties(detail["properties"] or {})

    def properties(self) -> dict[str, str]:
        return {PREFIX + k: v for k, v in self.entries.items()}

    def updated(self, **values: str) -> TableIdentity:
        return TableIdentity({**self.entries, **values})

    # ------------------------------------------------------------------ typed views
    @property
    def fingerprint(self) -> str:
        return self.entries.get("model_fingerprint", "")

    @property
    def outputs(self) -> list[OutputSpec]:
        from pipeline.config import OutputSpec

        return [OutputSpec(**d) for d in json.loads(self.entries.get("outputs") or "[]")]

    @property
    def calibration(self) -> Calibration:
        from pipeline.encoder.cuts import Calibration

        return Calibration.from_json(self.entries.get("calibration"))

    @property
    def projection_digests(self) -> dict[str, str]:
        return json.loads(self.entries.get("projections") or "{}")

    @property
    def canary_run(self) -> str | None:
        return self.entries.get("canary_run") or None

    # ------------------------------------------------------------------ comparing
    def changes(self, wanted: TableIdentity) -> frozenset[str]:
        """The compared keys whose value here differs from ``wanted``'s."""
        return frozenset(k for k in COMPARED if self.entries.get(k) != wanted.get(k))

    def check_compatible(self, wanted: TableIdentity, path: str) -> None:
        """Refuse to mix vectors of two models / two output layouts in one table."""
        if not self.entries:
            raise SinkConflictError(f"{path} is a Delta table that embed did not make (no "
                                    "embed.* table properties); choose another sink.path")
        diffs = [k for k in COMPARED if self.entries.get(k) != wanted.get(k)]
        if not diffs:
            return
        key = diffs[0]
        if key == "outputs":
            detail = _outputs_diff(self.entries.get(key) or "[]", wanted.get(key) or "[]")
            if detail:
                raise SinkConflictError(
                    f"output table {path} was made with other output columns: {detail} "
                    f"(differs in: {', '.join(diffs)}); write to a new sink.path or set "
                    "sink.mode: overwrite to replace the table")
        shown = {side: (v if len(v) < 80 else v[:77] + "...") for side, v in
                 (("stored", self.entries.get(key) or "<none>"),
                  ("wanted", wanted.get(key) or "<none>"))}
        raise SinkConflictError(
            f"output table {path} was made with {key}={shown['stored']}, this run has "
            f"{key}={shown['wanted']} (differs in: {', '.join(diffs)}); write to a new "
            "sink.path or set sink.mode: overwrite to replace the table")

    def upgraded(self, info: ModelInfo, fingerprint: str) -> TableIdentity:
        """A table of an older release records the weights-only fingerprint of the same
        model: it is this model's table, returned with today's fingerprint."""
        if self.fingerprint == fingerprint:
            return self
        from pipeline.encoder.model import legacy_fingerprint

        if self.fingerprint != legacy_fingerprint(info):
            return self
        return self.updated(model_fingerprint=fingerprint)

    def stale(self, recorded: TableIdentity | None,
              wanted: TableIdentity) -> dict[str, str]:
        """Of the :data:`REFRESHED` keys, those the table (``recorded``; ``self`` after
        :meth:`upgraded`) of this very model records otherwise."""
        if recorded is None or not recorded or self.fingerprint != wanted.fingerprint:
            return {}
        return {k: wanted[k] for k in REFRESHED if k in wanted and recorded.get(k) != wanted[k]}


def chunking_identity(cfg: RunConfig) -> str:
    """What decides a chunked table's rows: how documents are cut and encoded, and
    whether the passages' texts are stored (a column of the table)."""
    c = cfg.chunking
    return json.dumps({"mode": c.mode, "max_tokens": c.max_tokens,
                       "overlap_tokens": c.overlap_tokens, "boundary": c.boundary,
                       "store_chunk_text": cfg.sink.store_chunk_text}, sort_keys=True)


def changes_between(stored: TableIdentity | None, wanted: TableIdentity) -> frozenset[str]:
    """The compared keys that differ (empty: the same, or no table yet)."""
    return frozenset() if stored is None else stored.changes(wanted)


def check_compatible(stored: TableIdentity | None, wanted: TableIdentity, path: str) -> None:
    if stored is not None:
        stored.check_compatible(wanted, path)


# --------------------------------------------------------------------------- writing


def ensure_table(spark: SparkSession, path: str, schema: StructType, identity: TableIdentity,
                 deletion_vectors: bool = False, name: str | None = None) -> None:
    """Create the output table with ``identity`` in its properties, unless it exists; with
    ``name``, as that catalog table (managed where ``path`` is its schema's default
    location, else external at ``path``). DataFrameWriterV2 (a classic session and a
    Spark Connect client alike): the columns' metadata (how each vector decodes) lands in
    the table's schema, which a SQL ``CREATE TABLE`` would drop."""
    from pipeline.tables.delta import is_delta_table, table_ref

    if is_delta_table(path):
        if name is not None and not spark.catalog.tableExists(name):
            from pipeline.catalog import register  # made by a run killed before it was named

            register(spark, name, path)
        return
    writer = spark.createDataFrame([], schema).writeTo(name or table_ref(path)).using("delta")
    if name is not None:
        from pipeline.catalog import default_location

        if path != default_location(spark, name):
            writer = writer.option("path", path)
    if identity.get("partition_by"):
        from pyspark.sql import functions as F

        writer = writer.partitionedBy(F.col(identity["partition_by"]))
    for key, value in identity.properties().items():
        writer = writer.tableProperty(key, value)
    if deletion_vectors:
        writer = writer.tableProperty("delta.enableDeletionVectors", "true")
    if _create_racing(writer.create, path):
        # Another run made the table while this one tried: the identity check decides,
        # as for any existing table.
        stored = TableIdentity.read(spark, path)
        if stored is not None:
            stored.check_compatible(identity, path)


def _create_racing(create: Callable[[], None], path: str, wait: float = 2.0) -> bool:
    """Run the create; True when it failed because another writer made the table at the
    same moment (Delta then says the table exists, or reports its commit conflict, or
    "not empty and also not a Delta table" while the other's first commit is being
    written: given ``wait`` seconds to land). Any other failure is raised."""
    from pipeline.tables.delta import is_delta_table

    try:
        create()
        return False
    except Exception:
        deadline = time.monotonic() + wait
        while not is_delta_table(path):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
        return True


def set_identity(spark: SparkSession, path: str, values: Mapping[str, Any]) -> None:
    """Set these identity keys on the table (one ALTER TABLE: one Delta commit)."""
    pairs = ", ".join(f"'{PREFIX}{k}' = '{_sql_str(str(v))}'" for k, v in values.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({pairs})")


def _sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _outputs_diff(stored: str, wanted: str) -> str | None:
    """The first difference of two ``outputs`` identities, e.g. ``column sp:
    max_active_dims 1024 -> 64``; None when they do not parse as column lists."""
    try:
        old, new = json.loads(stored), json.loads(wanted)
    except ValueError:
        return None
    old_names, new_names = [c.get("name") for c in old], [c.get("name") for c in new]
    if old_names != new_names:
        return f"columns {', '.join(map(str, old_names))} -> {', '.join(map(str, new_names))}"
    for a, b in zip(old, new, strict=True):
        for name in sorted({*a, *b}):
            if a.get(name) != b.get(name):
                return f"column {a['name']}: {name} {a.get(name)} -> {b.get(name)}"
    return None
