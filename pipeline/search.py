"""``embed search``: the exact top-k of an output table's column for one query.

The query is encoded as the table's rows were: model, fingerprint, pooling, max
length, the model's head, layer and dim all come from the table's identity (its
``embed.*`` properties), so no config is needed; the prompt is the model's query
prompt (sentence-transformers' ``encode_query``), so scores equal the library's
``encode_query`` against the stored rows. Scoring is exact cosine
over every row (the stored vectors are unit length when ``normalize``; int8 /
uint8 are dequantized with the table's calibration ranges; float16 decoded).
Binary columns are scored by Hamming distance, and the best ``k x
rescore_factor`` are then rescored by cosine on a float column of the same
table, when it has one. Sparse columns are ranked by dot product with the query's
sparse vector (``SparseEncoder.encode_query``: the model's query prompt, or an
inference-free model's static weights), exactly.

Readers: delta-rs (``deltalake``, no JVM: starts in well under a second) for
tables up to ``SPARK_ABOVE_BYTES`` of data files, else Spark, whose executors
score their partitions and return their own top-k. Either way the vectors
stream in Arrow batches: memory is a batch, not the table.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder import codec, splade
from pipeline.encoder.cuts import Calibration
from pipeline.encoder.splade import SparseRows
from pipeline.errors import PipelineError
from pipeline.tables.identity import TableIdentity

if TYPE_CHECKING:
    from pipeline.encoder import Encoder

SPARK_ABOVE_BYTES = 4 << 30
BATCH_ROWS = 65536


class SearchError(PipelineError):
    """A search that cannot run: no table, not an embed table, no such column, ..."""

    exit_code = 2


@dataclass(frozen=True)
class Hit:
    id: Any
    score: float
    chunk_index: int | None = None
    snippet: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "score": round(self.score, 6)}
        if self.chunk_index is not None:
            out["chunk_index"] = self.chunk_index
        return out


@dataclass
class SearchResult:
    hits: list[Hit]
    column: str
    reader: str  # delta-rs | spark
    rows: int  # rows scored
    seconds: float
    rescored_with: str | None = None
    notes: list[str] = field(default_factory=list)
    scored_by: str = "exact cosine"  # or "exact dot product" (sparse)


@dataclass(frozen=True)
class TableInfo:
    path: str
    identity: TableIdentity
    specs: dict[str, OutputSpec]  # the table's embedding columns
    calibration: Calibration
    data_bytes: int
    has_chunks: bool
    arrow_readable: bool  # no deletion vectors / column mapping (pipeline.deltars)


# --------------------------------------------------------------------------- the table


def open_table(path: str) -> TableInfo:
    """The table's identity and columns (delta-rs: no Spark), or a SearchError."""
    from deltalake.exceptions import TableNotFoundError

    from pipeline import deltars

    try:
        table = deltars.open_table(path)
    except TableNotFoundError:
        raise SearchError(f"no Delta table at {path}") from None
    identity = TableIdentity.from_properties(table.metadata().configuration)
    if "model_fingerprint" not in identity or "outputs" not in identity:
        raise SearchError(f"{path} is a Delta table, but not one embed made (it has no "
                          "embed.model_fingerprint / embed.outputs properties)")
    specs = {s.name: s for s in identity.outputs}
    sizes = pa.table(cast(Any, table.get_add_actions(flatten=True))).column("size_bytes")
    return TableInfo(path=storage.normalize(path), identity=identity, specs=specs,
                     calibration=identity.calibration,
                     data_bytes=int(pa.compute.sum(sizes).as_py() or 0),
                     has_chunks="chunk_index" in table.schema().to_arrow().names,
                     arrow_readable=deltars.unreadable_because(table) is None)


def column_spec(info: TableInfo, column: str) -> OutputSpec:
    if column not in info.specs:
        raise SearchError(f"column {column!r} is not an embedding column of {info.path}; "
                          f"its columns: {', '.join(info.specs)}")
    return info.specs[column]


def rescore_column(info: TableInfo, spec: OutputSpec) -> OutputSpec | None:
    """For a binary column: the widest float column of the same layer and pooling."""
    if spec.dtype not in ("binary", "ubinary"):
        return None
    floats = [s for s in info.specs.values() if s.dtype in ("float32", "float16")
              and s.layer == spec.layer and s.pooling == spec.pooling]
    return max(floats, key=lambda s: s.dim) if floats else None


# --------------------------------------------------------------------------- the query


def model_location(info: TableInfo, model: str | None) -> str:
    """Where the table's model is: ``--model``, else the directory the table records
    (``model_path``), else the package that ships it (``model``)."""
    if model:
        return model
    recorded = info.identity.get("model_path")
    if recorded and storage.exists(recorded):
        return recorded  # a directory here, or in an object store (copied once per node)
    name = info.identity["model"]
    if recorded and not Path(name).expanduser().is_dir():
        from pipeline.encoder.model import resolve_model_dir
        from pipeline.errors import ModelError

        try:
            resolve_model_dir(name)
        except ModelError:
            raise SearchError(f"the table's model was at {recorded}, which is not here; pass "
                              "--model with the model's directory") from None
    return name


def query_prompt(location: str, prompt: str | None, prompt_name: str | None) -> str:
    """``--prompt``, else the model's prompt ``--prompt-name``, else the model's own query
    prompt (sentence-transformers' ``encode_query``: "query", else its default)."""
    from pipeline.encoder.model import inspect_model

    if prompt is not None:
        return prompt
    stack = inspect_model(location).modules
    if prompt_name is not None:
        if prompt_name not in stack.prompts:
            raise SearchError(f"--prompt-name {prompt_name!r} is not one of the model's "
                              f"prompts: {', '.join(stack.prompts) or 'it has none'}")
        return stack.prompts[prompt_name]
    return stack.query_prompt()


def table_model(info: TableInfo, model: str | None) -> tuple[str, Any]:
    """(where the table's model is, its ModelInfo); refuses a model directory whose
    fingerprint is not the table's."""
    from pipeline.encoder.model import fingerprint, inspect_model, legacy_fingerprint

    location = model_location(info, model)
    found = inspect_model(location)
    wanted = info.identity["model_fingerprint"]
    if wanted not in (fingerprint(found), legacy_fingerprint(found)):
        raise SearchError(f"the model at {location} (sha256 {fingerprint(found)[:12]}) is not "
                          f"the one that made {info.path} (sha256 {wanted[:12]}); pass --model "
                          "with the directory of the table's model")
    return location, found


def query_encoder(info: TableInfo, specs: list[OutputSpec], model: str | None,
                  prompt: str | None, prompt_name: str | None = None) -> Encoder:
    """An encoder that cuts the query as the table's rows were cut (model, pooling, max
    length, head, layer, dim), with the model's query prompt; refuses a model directory
    whose fingerprint is not the table's."""
    import dataclasses

    from pipeline.encoder import Encoder

    ident = info.identity
    location, _ = table_model(info, model)
    cfg = ModelConfig(name_or_path=location, max_length=int(ident.get("max_length", 256)),
                      pooling=ident.get("pooling", "mean"),  # type: ignore[arg-type]
                      prompt=query_prompt(location, prompt, prompt_name), device="cpu",
                      backend=ident.get("backend", "torch"))  # type: ignore[arg-type]
    return Encoder(cfg, [dataclasses.replace(s, dtype="float32") for s in specs])


def encode_query(encoder: Encoder, text: str, info: TableInfo | None = None
                 ) -> dict[str, np.ndarray]:
    """{column: float32 [dim]} of one query, from one forward pass; ``reduce: pca``
    columns through the table's own projections."""
    from pipeline import projections

    fitted = projections.load(info.path, info.identity.projection_digests) if info else {}
    floats, _ = encoder.encode_float([text], Calibration(None, fitted))
    return {name: vecs.dense()[0] if isinstance(vecs, SparseRows) else vecs[0]
            for name, vecs in floats.items()}


def sparse_query(info: TableInfo, spec: OutputSpec, text: str, opts: SearchOptions
                 ) -> SparseRows:
    """The query's sparse vector as ``SparseEncoder.encode_query`` makes it: an
    inference-free model's static weights of its tokens, else the model itself with its
    query prompt (and the model's own top-k, not the column's)."""
    import dataclasses

    location, found = table_model(info, opts.model)
    prompt = query_prompt(location, opts.prompt, opts.prompt_name)
    stack = found.modules.splade
    if stack is None:
        raise SearchError(f"column {spec.name!r} is sparse but the model at {location} is not "
                          "a SparseEncoder")
    if stack.query_weights is not None:
        return splade.StaticQuery(stack).encode([text], prompt)
    query_spec = dataclasses.replace(spec, max_active_dims=None, min_weight=0.0)
    encoder = query_encoder(info, [query_spec], opts.model, opts.prompt, opts.prompt_name)
    floats, _ = encoder.encode_float([text])
    return cast(SparseRows, floats[spec.name])


# --------------------------------------------------------------------------- scoring


def decode(column: pa.Array | pa.ChunkedArray, spec: OutputSpec,
           calibration: Calibration) -> np.ndarray:
    """A stored column's batch -> float32 [N, dim] (binary columns: packed bits, uint8
    [N, dim/8], for Hamming distance)."""
    if spec.kind == "sparse":
        return splade.from_arrow(column, spec.dtype, 0)  # type: ignore[return-value]
    values = codec.from_arrow(column, spec)
    if spec.dtype in codec.BIT_DTYPES:
        return codec.packed_bits(values, spec)
    return codec.to_float(values, spec, calibration)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def scores(values: np.ndarray, query: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Cosine of each row with the query; binary: 1 - 2 x Hamming / dim (the cosine of
    the +-1 vectors); sparse: the dot product with the (dense, vocabulary-wide) query."""
    if isinstance(values, SparseRows):
        return sparse_dot(values, query)
    if spec.dtype in ("binary", "ubinary"):
        bits = np.packbits(query > 0)
        hamming = _POPCOUNT[np.bitwise_xor(values, bits)].sum(axis=1, dtype=np.int64)
        return 1.0 - 2.0 * hamming / spec.dim
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    norms = np.maximum(np.linalg.norm(values, axis=1), 1e-12)
    return (values @ q) / norms


def sparse_dot(rows: SparseRows, query: np.ndarray) -> np.ndarray:
    """Each sparse row's dot product with a dense query vector."""
    products = rows.values.astype(np.float64) * query[rows.indices]
    sums = np.zeros(len(rows))
    filled = rows.active() > 0
    if filled.any():
        sums[filled] = np.add.reduceat(products, rows.offsets[:-1][filled])
    return sums


class TopK:
    """The running best k (score, key) over batches."""

    def __init__(self, k: int):
        self.k, self.heap = k, []  # type: ignore[var-annotated]
        self._seq = 0

    def add(self, keys: list, batch_scores: np.ndarray) -> None:
        if len(batch_scores) > self.k:
            top = np.argpartition(-batch_scores, self.k - 1)[: self.k]
        else:
            top = np.arange(len(batch_scores))
        for i in top:
            self._seq += 1
            item = (float(batch_scores[i]), -self._seq, keys[i])
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def best(self) -> list[tuple[float, Any]]:
        return [(s, key) for s, _, key in sorted(self.heap, reverse=True)]


def score_batches(batches: Iterable[pa.RecordBatch], query: np.ndarray, spec: OutputSpec,
                  calibration: Calibration, k: int,
                  key_columns: list[str]) -> tuple[list[tuple[float, Any]], int]:
    """Best k (score, key tuple) over Arrow batches (column ``spec.name``); rows scored."""
    column = spec.name
    top, rows = TopK(k), 0
    for batch in batches:
        if not batch.num_rows:
            continue
        rows += batch.num_rows
        values = decode(batch.column(column), spec, calibration)
        keys = list(zip(*(batch.column(c).to_pylist() for c in key_columns), strict=True))
        top.add(keys, scores(values, query, spec))
    return top.best(), rows


# --------------------------------------------------------------------------- readers


def _delta_rs_batches(path: str, columns: list[str], ids: list | None = None
                      ) -> Iterator[pa.RecordBatch]:
    import pyarrow.dataset as ds

    from pipeline import deltars

    dataset = deltars.dataset(path)
    where = ds.field("id").isin(ids) if ids is not None else None
    yield from dataset.to_batches(columns=columns, filter=where, batch_size=BATCH_ROWS)


def _spark_top(info: TableInfo, query: np.ndarray, spec: OutputSpec, k: int,
               key_columns: list[str]) -> tuple[list[tuple[float, Any]], int]:
    """Each partition's top-k on the executors; the driver merges k per partition."""
    from pipeline.config import SparkConfig
    from pipeline.spark import get_session

    spark = get_session(SparkConfig(app_name="embed-search"), storage.kinds([info.path]))
    calibration, column = info.calibration, spec.name

    def partition_top(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        best, rows = score_batches(batches, query, spec, calibration, k, key_columns)
        yield pa.RecordBatch.from_pydict({
            "scores": [[s for s, _ in best]], "keys": [[json.dumps(list(k)) for _, k in best]],
            "rows": [rows]})

    df = spark.read.format("delta").load(info.path).select(*key_columns, column)
    parts = df.mapInArrow(partition_top, "scores array<double>, keys array<string>, rows long") \
        .collect()
    merged = sorted(((score, tuple(json.loads(key))) for r in parts
                     for score, key in zip(r.scores, r.keys, strict=True)), reverse=True)
    return merged[:k], sum(r.rows for r in parts)


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchOptions:
    """How ``embed search`` runs: hits, the query's prompt (``prompt``, or the model's
    prompt named ``prompt_name``; default: its query prompt), the model directory
    (default: where the table's model was), the reader, the binary rescore factor,
    and whether hits get snippets of their source text."""

    k: int = 10
    prompt: str | None = None
    prompt_name: str | None = None
    model: str | None = None
    reader: str = "auto"
    rescore_factor: int = 4
    snippets: bool = True


def search(table: str, column: str, query: str,
           options: SearchOptions | None = None) -> SearchResult:
    """The exact top-k rows of ``column`` for ``query`` (see the module doc)."""
    opts = options or SearchOptions()
    k, reader, rescore_factor = opts.k, opts.reader, opts.rescore_factor
    if not query.strip():
        raise SearchError("the query is empty")
    if k <= 0:
        raise SearchError(f"--k must be a positive integer, got {k}")
    started = time.perf_counter()
    info = open_table(table)
    spec = column_spec(info, column)
    rescore = rescore_column(info, spec)
    if spec.kind == "sparse":
        queries = {column: sparse_query(info, spec, query, opts).dense()[0]}
    else:
        encoder = query_encoder(info, [spec, *([rescore] if rescore else [])], opts.model,
                                opts.prompt, opts.prompt_name)
        queries = encode_query(encoder, query, info)
    chosen = reader if reader != "auto" else (
        "spark" if info.data_bytes > SPARK_ABOVE_BYTES or not info.arrow_readable
        else "delta-rs")
    keys = ["id", *(["chunk_index"] if info.has_chunks else [])]
    wanted = k * rescore_factor if rescore or spec.dtype in ("binary", "ubinary") else k
    if chosen == "spark":
        best, rows = _spark_top(info, queries[column], spec, wanted, keys)
    else:
        best, rows = score_batches(_delta_rs_batches(info.path, [*keys, column]),
                                   queries[column], spec, info.calibration, wanted, keys)
    if rescore:
        best = _rescored(info, rescore, queries[rescore.name], best, keys)
    hits = [Hit(id=key[0], score=score, chunk_index=key[1] if info.has_chunks else None)
            for score, key in best[:k]]
    result = SearchResult(hits=hits, column=column, reader=chosen, rows=rows,
                          seconds=0.0, rescored_with=rescore.name if rescore else None,
                          scored_by="exact dot product" if spec.kind == "sparse"
                          else "exact cosine")
    if opts.snippets and hits:
        result.hits, note = with_snippets(info, hits)
        if note:
            result.notes.append(note)
    result.seconds = time.perf_counter() - started
    return result


def _rescored(info: TableInfo, spec: OutputSpec, query: np.ndarray,
              candidates: list[tuple[float, Any]], keys: list[str]) -> list[tuple[float, Any]]:
    """Hamming candidates rescored by cosine on a float column (delta-rs, by id)."""
    ids = list({key[0] for _, key in candidates})
    wanted = {key for _, key in candidates}
    batches = _delta_rs_batches(info.path, [*keys, spec.name], ids=ids)
    best, _ = score_batches(batches, query, spec, info.calibration,
                            len(candidates), keys)
    return [(score, key) for score, key in best if key in wanted]


# --------------------------------------------------------------------------- snippets


def with_snippets(info: TableInfo, hits: list[Hit], width: int = 160
                  ) -> tuple[list[Hit], str | None]:
    """Hits with the start of their source text, from the source the latest run read
    (runs table); the hits unchanged, and why, when that source is out of reach."""
    import dataclasses

    source = _latest_source(info)
    if source is None:
        return hits, "no snippets: the runs table names no source"
    path, fmt, id_col, text_col = source
    try:
        texts = _source_texts(path, fmt, id_col, text_col, [h.id for h in hits])
    except Exception as exc:  # the source moved or is unreadable here: hits still stand
        return hits, f"no snippets: source {path} not readable here ({type(exc).__name__})"
    spans = _passage_spans(info, hits) if info.has_chunks else {}
    out = []
    for h in hits:
        text = texts.get(h.id)
        span = spans.get((h.id, h.chunk_index))
        if text is not None and span is not None:  # a passage: its own text
            text = text[span[0]:span[1]]
        out.append(dataclasses.replace(h, snippet=_snippet(text, width)))
    return out, None


def _passage_spans(info: TableInfo, hits: list[Hit]) -> dict:
    """(id, chunk_index) -> (char_start, char_end) of the hits' passages."""
    if not info.arrow_readable:
        return {}
    batches = _delta_rs_batches(info.path, ["id", "chunk_index", "char_start", "char_end"],
                                ids=list({h.id for h in hits}))
    return {(r["id"], r["chunk_index"]): (r["char_start"], r["char_end"])
            for b in batches for r in b.to_pylist()}


def _snippet(text: str | None, width: int) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _latest_source(info: TableInfo) -> tuple[str, str, str, str] | None:
    """(path, format, id column, text column) of the latest succeeded run's source, from
    the runs table the table's identity names (else the one beside it)."""
    from pipeline.tables import runs
    from pipeline.tables.paths import TablePaths

    path = info.identity.get("runs_path") or TablePaths.beside(info.path).runs
    src = runs.latest_source(path, info.path)
    if src is None:
        return None
    return src["path"], src["format"], src["id_column"], src["text_column"]


def _source_texts(path: str, fmt: str, id_col: str, text_col: str, ids: list) -> dict:
    import pyarrow.dataset as ds

    if fmt == "delta":
        from pipeline import deltars

        dataset = deltars.dataset(path)
    else:
        fs, inner = storage.settings().filesystem(path)
        dataset = ds.dataset(inner, format=cast(Any, fmt), filesystem=fs)
    rows = dataset.to_table(columns=[id_col, text_col],
                            filter=ds.field(id_col).isin(ids)).to_pylist()
    return {r[id_col]: r[text_col] for r in rows}
