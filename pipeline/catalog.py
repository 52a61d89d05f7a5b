"""Tables named through a catalog (``schema.table``, ``catalog.schema.table``: a Hive
metastore, Unity Catalog, Glue) as a run's source or sink.

A name is resolved once, at the start, to the table's location (the catalog's
``DESCRIBE DETAIL``); from there every stage works on the location as it does for a
path: the pinned snapshot, txn ids, the change feed, the no-JVM delta-rs reads and the
bookkeeping tables beside it. So two names of one location are one table. A sink
named but absent gets its location from its schema (managed) or from ``sink.path``
(external), and is created by name with the run's first commit
(:func:`pipeline.tables.identity.ensure_table`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.config import RunConfig

is_name = storage.is_table_name


def has_names(cfg: RunConfig) -> bool:
    return bool(cfg.source.table or cfg.sink.table)


@dataclasses.dataclass(frozen=True)
class Located:
    name: str
    location: str
    format: str


def locate(spark: SparkSession, name: str) -> Located | None:
    """The table's location and format, or None where the catalog has no such table."""
    if not spark.catalog.tableExists(name):
        return None
    row = spark.sql(f"DESCRIBE DETAIL {name}").first()
    if row is None or not row["location"]:
        raise SourceError(f"the catalog gives no location for {name}")
    return Located(name, storage.normalize(row["location"]), str(row["format"]).lower())


def default_location(spark: SparkSession, name: str) -> str:
    """Where the catalog puts a managed table of this name: its schema's location."""
    parts = name.split(".")
    schema = ".".join(parts[:-1])
    rows = spark.sql(f"DESCRIBE SCHEMA {schema}").collect()
    found = {str(r[0]).strip().lower(): str(r[1]) for r in rows}
    if "location" not in found:
        raise ConfigError("sink.table", f"the catalog gives no location for schema {schema}")
    return storage.join(storage.normalize(found["location"]), parts[-1].strip("`").lower())


def location_of(spark: SparkSession, text: str) -> str:
    """A table argument (a path or a name) as a location; a name must exist."""
    if not is_name(text):
        return storage.normalize(text)
    found = locate(spark, text)
    if found is None:
        raise SourceError(f"no table named {text} in the catalog")
    return found.location


def resolve(cfg: RunConfig, spark: SparkSession) -> RunConfig:
    """``cfg`` with ``source.table`` and ``sink.table`` resolved to locations."""
    source, sink = cfg.source, cfg.sink
    if source.table:
        found = locate(spark, source.table)
        if found is None:
            raise SourceError(f"no table named {source.table} in the catalog (source.table)")
        if found.format not in ("delta", "parquet", "csv", "json"):
            raise ConfigError("source.table", f"{source.table} is a {found.format} table; "
                              "embed reads delta, parquet, csv and json tables")
        source = dataclasses.replace(source, path=found.location, format=found.format)  # type: ignore[arg-type]
    if sink.table:
        sink = dataclasses.replace(sink, path=_sink_location(spark, cfg))
    return dataclasses.replace(cfg, source=source, sink=sink)


def _sink_location(spark: SparkSession, cfg: RunConfig) -> str:
    name, given = cfg.sink.table or "", cfg.sink.path
    found = locate(spark, name)
    if found is None:
        return given or default_location(spark, name)
    if found.format != "delta":
        raise ConfigError("sink.table", f"{name} is a {found.format} table, not Delta")
    if given and storage.normalize(given) != found.location:
        raise ConfigError("sink.path", f"{name} is at {found.location}, not {given}")
    return found.location


def located(cfg: RunConfig, spark: SparkSession | None = None
            ) -> tuple[RunConfig, SparkSession | None]:
    """``cfg`` resolved (:func:`resolve`), with the session that resolved it: ``spark``,
    or one started for it (a Spark Connect client where the config names a server). A
    config without names needs no session: ``spark`` comes back as it was."""
    if not has_names(cfg):
        return cfg, spark
    from pipeline.spark import get_session

    spark = spark or get_session(cfg.spark, storage.kinds([cfg.source.path, cfg.sink.path]))
    return resolve(cfg, spark), spark


def register(spark: SparkSession, name: str, location: str) -> None:
    """Name the Delta table at ``location`` in the catalog (its schema made if absent);
    a name already there must point at it."""
    if not is_name(name):
        raise ConfigError("--table", f"{name!r} is not a catalog name (schema.table)")
    found = locate(spark, name)
    if found is not None and found.location != storage.normalize(location):
        raise ConfigError("--table", f"{name} names {found.location} already")
    schema = name.rsplit(".", 1)[0]
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING DELTA LOCATION '{location}'")


def bookkeeping_names(cfg: RunConfig) -> dict[str, str]:
    """{catalog name: location} of a named sink's bookkeeping tables: the schema's shared
    ones (runs, drift, canary, projections: one per schema location, as their paths are)
    and the sink's quarantine; named in ``sink.bookkeeping_schema``, else the sink's."""
    from pipeline.tables.paths import TablePaths

    name = cfg.sink.table or ""
    schema, table = name.rsplit(".", 1)
    schema = cfg.sink.bookkeeping_schema or schema
    paths = TablePaths.of(cfg)
    return {f"{schema}.embedding_runs": paths.runs, f"{schema}.embedding_drift": paths.drift,
            f"{schema}.embedding_canary": paths.canary,
            f"{schema}.embedding_projections": paths.projections,
            f"{schema}.{table.strip('`')}_quarantine": paths.quarantine}


def name_bookkeeping(spark: SparkSession, cfg: RunConfig) -> list[str]:
    """Name a named sink's bookkeeping tables in the catalog, those that exist and are not
    named yet (:func:`bookkeeping_names`); a name taken by another location is left as
    it is, with a warning. Returns the names added."""
    import logging

    from pipeline import deltars

    added = []
    for name, location in bookkeeping_names(cfg).items():
        if not deltars.is_table(location) or spark.catalog.tableExists(name):
            continue
        try:
            register(spark, name, location)
            added.append(name)
        except ConfigError as err:
            logging.getLogger(__name__).warning("%s", err)
    return added
