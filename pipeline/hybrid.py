"""``embed search --hybrid`` and ``--explain``: two rankings fused, and why a sparse hit matched.

Hybrid retrieval ranks the same query in two tables of the same ids (typically a
sparse column and a dense one) and fuses the rankings by reciprocal rank
fusion (Cormack et al. 2009): ``score(d) = sum over rankings of 1 / (RRF_K +
rank(d))``, ranks from 1, a ranking that misses ``d`` adding nothing. Each
ranking is the exact top ``depth`` of its column (pipeline.search), so the fused
list is exact over those candidates. Keys are (id, chunk_index) for passage
tables, so both tables must be keyed alike.

``--explain`` (sparse columns): the query's heaviest tokens, and for each hit the
tokens it shares with the query, each with its share of the dot product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.search import (
    Hit,
    SearchError,
    SearchOptions,
    SearchResult,
    TableInfo,
    column_spec,
    open_table,
    search,
    sparse_query,
    with_snippets,
)

RRF_K = 60  # the constant of the original paper, and of Elasticsearch / OpenSearch's RRF
DEPTH = 100  # candidates per ranking (at least; k x 10 when k is larger)


@dataclass(frozen=True)
class FusedHit:
    id: Any
    score: float  # the RRF score
    ranks: tuple[int | None, int | None]  # rank in each ranking (1-based), None: not in it
    chunk_index: int | None = None
    snippet: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "rrf": round(self.score, 6),
                               "ranks": list(self.ranks)}
        if self.chunk_index is not None:
            out["chunk_index"] = self.chunk_index
        return out


def parse_target(text: str) -> tuple[str, str]:
    """``TABLE:COLUMN`` -> (table, column); the table may hold colons (s3://)."""
    table, sep, column = text.rpartition(":")
    if not sep or not table or not column or "/" in column:
        raise SearchError(f"--hybrid wants TABLE:COLUMN (e.g. warehouse/dense:emb_384), "
                          f"got {text!r}")
    return table, column


def fuse(first: list[Hit], second: list[Hit], k: int) -> list[FusedHit]:
    """Reciprocal rank fusion of two rankings, best first (ties: the first ranking's order)."""
    ranks: dict[tuple, list[int | None]] = {}
    for which, hits in enumerate((first, second)):
        for rank, hit in enumerate(hits, 1):
            ranks.setdefault((hit.id, hit.chunk_index), [None, None])[which] = rank
    scored = [(sum(1.0 / (RRF_K + r) for r in pair if r is not None), key, pair)
              for key, pair in ranks.items()]
    scored.sort(key=lambda t: (-t[0], t[2][0] or 1 << 30, t[2][1] or 1 << 30))
    return [FusedHit(id=key[0], chunk_index=key[1], score=score, ranks=(pair[0], pair[1]))
            for score, key, pair in scored[:k]]


def hybrid_search(table: str, column: str, other: str, query: str,
                  options: SearchOptions) -> tuple[list[FusedHit], SearchResult, SearchResult]:
    """The fused top-k of ``column`` in ``table`` and ``other`` (TABLE:COLUMN) for ``query``,
    with both searches (each model encodes the query its own way)."""
    other_table, other_column = parse_target(other)
    depth = max(DEPTH, 10 * options.k)
    deep = dataclasses.replace(options, k=depth, snippets=False)
    first = search(table, column, query, deep)
    # the other table has its own model: its own query prompt, never this one's --model
    second = search(other_table, other_column, query,
                    dataclasses.replace(deep, model=None, prompt=None, prompt_name=None))
    fused = fuse(first.hits, second.hits, options.k)
    if options.snippets and fused:
        info = open_table(table)
        plain = [Hit(id=h.id, score=h.score, chunk_index=h.chunk_index) for h in fused]
        with_text, _ = with_snippets(info, plain)
        fused = [dataclasses.replace(f, snippet=h.snippet)
                 for f, h in zip(fused, with_text, strict=True)]
    return fused, first, second


# --------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class Explanation:
    query_tokens: list[tuple[str, float]]  # the query's heaviest tokens and weights
    matches: dict[tuple, list[tuple[str, float]]]  # per hit key: (token, query x row weight)


def explain(table: str, column: str, query: str, hits: list[Hit], options: SearchOptions,
            top: int = 10) -> Explanation:
    """The query's ``top`` heaviest tokens, and each hit's shared tokens by contribution."""
    from transformers import AutoTokenizer

    from pipeline import deltars
    from pipeline.encoder import splade
    from pipeline.search import table_model

    info = open_table(table)
    spec = column_spec(info, column)
    if spec.kind != "sparse":
        raise SearchError(f"--explain applies to sparse columns; {column!r} is dense")
    q = sparse_query(info, spec, query, options)
    _, found = table_model(info, options.model)
    tok = AutoTokenizer.from_pretrained(str(found.modules.transformer_dir), local_files_only=True)
    q_idx, q_val = q.row(0)
    order = np.argsort(-q_val)[:top]
    names = tok.convert_ids_to_tokens(q_idx[order].tolist())
    query_tokens = list(zip(names, q_val[order].astype(float).tolist(), strict=True))
    weights = dict(zip(q_idx.tolist(), q_val.tolist(), strict=True))
    keys = ["id", *(["chunk_index"] if info.has_chunks else [])]
    rows = _hit_rows(deltars, info, keys, spec.name, [h.id for h in hits])
    matches = {}
    for hit in hits:
        key = (hit.id, hit.chunk_index)
        cell = rows.get(key)
        if cell is None:
            continue
        idx, val = splade.from_cells([cell], spec.dtype, 0).row(0)
        shared = [(int(i), float(v) * weights[int(i)]) for i, v in zip(idx, val, strict=True)
                  if int(i) in weights]
        shared.sort(key=lambda t: -t[1])
        matches[key] = list(zip(tok.convert_ids_to_tokens([i for i, _ in shared[:top]]),
                                [c for _, c in shared[:top]], strict=True))
    return Explanation(query_tokens=query_tokens, matches=matches)


def _hit_rows(deltars: Any, info: TableInfo, keys: list[str], column: str,
              ids: list) -> dict[tuple, Any]:
    import pyarrow.dataset as ds

    table = deltars.dataset(info.path).to_table(columns=[*keys, column],
                                                filter=ds.field("id").isin(ids))
    return {(r["id"], r.get("chunk_index")): r[column] for r in table.to_pylist()}
