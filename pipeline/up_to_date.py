"""Whether a run has nothing to do, read from the Delta logs alone (delta-rs, no JVM).

A run into an existing table, whose source is a Delta table with its Change Data
Feed on and still at the version that the last successful whole-source run read,
under the same identity (model, weights, outputs, pooling ...): the feed has
nothing to say, so the Spark run would read no rows, load no model and commit
nothing, after a cold JVM's 15-20 s. :func:`check` gives the same answer from the
logs in well under a second, by the same rules (:class:`~pipeline.write_plan.
WritePlan`'s plan path, the identity's compatibility); ``run`` then records the
run without starting Spark. Anything else (a partition, ``--full-refresh``, an
overwrite, a log or runs table delta-rs cannot read) goes the Spark way. Local folders
and object stores alike (pipeline.storage gives delta-rs its settings).

The same holds for a backfill partition whose Delta txn is already on the output
table (a re-run, an Airflow retry): :func:`partition_committed` reads it from the
log, and the run is recorded as skipped without Spark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import deltars
from pipeline.changes import CDF_PROPERTY
from pipeline.tables import runs
from pipeline.tables.delta import is_delta_table
from pipeline.tables.identity import TableIdentity
from pipeline.tables.paths import TablePaths
from pipeline.write_plan import WritePlan

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from pipeline.config import RunConfig
    from pipeline.encoder.model import ModelInfo
    from pipeline.results import Partition


@dataclass(frozen=True)
class Unchanged:
    """A run with nothing to do: the source version it would read, its plan note (as
    the Spark path words it), and the two tables' schemas (for lineage)."""

    source_version: int
    note: str
    schemas: dict[str, list[tuple[str, str]]]


def check(cfg: RunConfig, info: ModelInfo, model_fp: str) -> Unchanged | None:
    """:class:`Unchanged` where the run has nothing to do, else None (run it)."""
    from deltalake.exceptions import DeltaError

    if cfg.sink.mode == "overwrite" or cfg.source.format != "delta":
        return None
    paths = TablePaths.of(cfg)
    last: list[int | None] = []
    try:
        source, output = deltars.open_table(cfg.source.path), deltars.open_table(cfg.sink.path)
        stored = _stored(cfg, info, model_fp, output)
        if stored is None:
            return None
        version = source.version()
        path, note = WritePlan.decide(cfg, stored, frozenset(), backfill=False,
                                      filtered=False).plan_path(
            source_is_delta=True, full_refresh=False,
            cdf_enabled=lambda: _property(source, CDF_PROPERTY) == "true",
            last_version=lambda: _remember(last, _last_version(cfg, paths.runs)))
    except (DeltaError, deltars.NotReadableHere):
        return None
    if path != "cdf" or last != [version]:
        return None
    return Unchanged(version, f"{note} (versions {version + 1}..{version})",
                     {"source": _schema(source), "output": _schema(output)})


def partition_committed(output_path: str, partition: Partition) -> bool:
    """The partition's Delta txn (app id, version) is recorded on the output table, read
    from its log with delta-rs. False where it is not, or where delta-rs cannot say (a
    log it cannot read): the Spark path asks again."""
    from deltalake.exceptions import DeltaError

    try:
        if not is_delta_table(output_path):
            return False
        return deltars.txn_committed(deltars.open_table(output_path), partition.txn)
    except (DeltaError, OSError):
        return False


def _stored(cfg: RunConfig, info: ModelInfo, model_fp: str,
            output: DeltaTable) -> TableIdentity | None:
    """The table's identity where it is this run's with nothing to refresh (an older
    release's keys, a moved model directory: the Spark path writes those), else None."""
    recorded = TableIdentity.from_properties(output.metadata().configuration)
    if not recorded:
        return None
    identity = TableIdentity.of_run(cfg, info, model_fp, TablePaths.of(cfg).runs)
    stored = recorded.upgraded(info, model_fp)
    if stored.changes(identity) or stored.stale(recorded, identity):
        return None
    return stored


def _remember(found: list[int | None], value: int | None) -> int | None:
    found.append(value)
    return value


def _property(table: DeltaTable, key: str) -> str:
    return (table.metadata().configuration.get(key) or "false").lower()


def _last_version(cfg: RunConfig, runs_path: str) -> int | None:
    """The last successful whole-source run's source version, from a runs table that
    delta-rs reads (else NotReadableHere: the Spark path reads it)."""
    if deltars.unreadable_because(deltars.open_table(runs_path)):
        raise deltars.NotReadableHere(runs_path)
    return runs.last_source_version(runs_path, cfg.sink.path, cfg.source.path)


def _schema(table: DeltaTable) -> list[tuple[str, str]]:
    """(name, Spark's simple type string) per column: Delta's schema JSON is Spark's."""
    from pyspark.sql.types import StructType

    struct = StructType.fromJson(json.loads(table.schema().to_json()))
    return [(f.name, f.dataType.simpleString()) for f in struct.fields]
