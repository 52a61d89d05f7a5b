"""Read the source table, check its columns, and tag every row valid or quarantined.

Bad rows are never dropped silently: each gets a ``reason`` and goes to the
quarantine table; the rest go on to be embedded. The content hash (sha256 of
the UTF-8 text) is computed here, on the JVM, for the incremental plan and
for row-level lineage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.config import SourceConfig
from pipeline.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# Quarantine reasons, in the order they are checked (the first that applies wins).
REASONS = ("null_id", "text_not_string", "null_text", "invalid_utf8", "empty_text",
           "duplicate_id")
RAW_VALUE_CHARS = 1000


def check_source_path(cfg: SourceConfig) -> None:
    """Fail before Spark starts when the source path is missing or not Delta (a local
    folder or an object store: the store's own error, in one line, where it refuses)."""
    import pyarrow.fs as pafs

    from pipeline import deltars

    try:
        fs, inner = storage.settings().filesystem(cfg.path)
        missing = fs.get_file_info(inner).type == pafs.FileType.NotFound
        not_delta = cfg.format == "delta" and not missing and not deltars.is_table(cfg.path)
    except OSError as exc:
        raise SourceError(f"cannot read source {cfg.path}: {_first_line(exc)} (source.path; "
                          "credentials come from the environment, docs/storage.md)") from None
    if missing:
        raise SourceError(f"source path not found: {cfg.path} (source.path)")
    if not_delta:
        raise SourceError(f"source path {cfg.path} is not a Delta table (no _delta_log); "
                          "set source.format to one of: delta, parquet, csv, json")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def files_hash(df: DataFrame) -> str:
    """Lineage of a file source (no Delta version): sha256 of its sorted file list with
    each file's size and modification time (local or in an object store)."""
    import hashlib

    digest = hashlib.sha256()
    settings = storage.settings()
    for name in sorted(df.inputFiles()):
        digest.update(name.encode())
        fs, inner = settings.filesystem(storage.normalize(name))
        info = fs.get_file_info(inner)
        if info.size is not None:
            digest.update(f":{info.size}:{info.mtime_ns}".encode())
        digest.update(b"\n")
    return digest.hexdigest()


def read_source(spark: SparkSession, cfg: SourceConfig, carry: str | None = None,
                version: int | None = None) -> tuple[DataFrame, int | None]:
    """Returns (DataFrame, source_version). A Delta source is read at ``version`` (the
    run pins it, so every pass reads one snapshot), else at its latest."""
    from pyspark.errors import AnalysisException

    reader = spark.read.format(cfg.format).options(**{k: str(v) for k, v in cfg.options.items()})
    if cfg.format == "csv":
        reader = reader.option("header", cfg.options.get("header", "true"))
    if cfg.format == "delta" and version is not None:
        reader = reader.option("versionAsOf", version)
    elif cfg.format != "delta":
        version = None
    try:
        df = reader.load(cfg.path)
    except AnalysisException as exc:
        raise SourceError(f"cannot read source {cfg.path} as {cfg.format}: "
                          f"{str(exc).splitlines()[0]}") from None
    for key, column in (("source.id_column", cfg.id_column),
                        ("source.text_column", cfg.text_column), ("sink.partition_by", carry)):
        if column is not None and column not in df.columns:
            raise ConfigError(key, f"column {column!r} is not in the source {cfg.path}; "
                              f"its columns are: {', '.join(df.columns)}")
    return df, version


def tag_rows(df: DataFrame, cfg: SourceConfig, carry: str | None = None) -> DataFrame:
    """Columns: id, text, content_hash, reason (null for rows to embed), raw_value, and
    the ``carry`` column (sink.partition_by) as it is."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    text_type = df.schema[cfg.text_column].dataType
    # Binary text columns are taken as UTF-8 bytes; any other type is not text.
    text_is_string = isinstance(text_type, (StringType, BinaryType))
    # Duplicate ids by an aggregate of the ids alone, joined back (small: broadcast by
    # AQE), instead of a window over the rows, which would shuffle every text.
    dupes = (df.groupBy(F.col(cfg.id_column).alias("_dup_id")).count()
             .filter(F.col("count") > 1).select("_dup_id"))
    df = df.join(dupes, F.col(cfg.id_column) == F.col("_dup_id"), "left")
    id_col, text_col = F.col(cfg.id_column), F.col(cfg.text_column)
    text = text_col.cast("string") if text_is_string else F.lit(None).cast("string")
    reason = (
        F.when(id_col.isNull(), F.lit("null_id"))
        .when(F.lit(not text_is_string), F.lit("text_not_string"))
        .when(text.isNull(), F.lit("null_text"))
        .when(~F.is_valid_utf8(text), F.lit("invalid_utf8"))
        .when(text.rlike(r"(?U)^\s*$"), F.lit("empty_text"))
        .when(F.col("_dup_id").isNotNull(), F.lit("duplicate_id"))
    )
    raw = F.substring(F.make_valid_utf8(text_col.cast("string")), 1, RAW_VALUE_CHARS)
    return df.select(
        id_col.alias("id"),
        text.alias("text"),
        F.sha2(text, 256).alias("content_hash"),
        reason.alias("reason"),
        raw.alias("raw_value"),
        *([F.col(carry)] if carry else []),
    )
