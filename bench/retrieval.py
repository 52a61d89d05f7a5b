"""Retrieval sanity eval: docstring summary line -> the rest of its docstring.

For every demo docstring whose body (all but the first line) has at least
``--min-body`` characters, the summary line is a query and the body is its one
relevant document. Reports recall@10 over all bodies for:

- float32 at each Matryoshka dim (truncate -> renormalize),
- int8 (ranges calibrated on a separate sample of bodies), scored as
  float query . dequantized int8 doc,
- ubinary (sign bits): Hamming top-``--rescore`` candidates, then rescored with
  the float query against the +-1 unpacked doc bits,
- a shallow layer (2D Matryoshka) at full dim.

``--pca``: the ``reduce`` comparison instead. ``--eval`` held-out pairs (seeded
shuffle) against truncate and the product's ``reduce: pca`` projection (and
``center: true``), fitted on ``--fit`` other docstrings through the same code
path a run uses (outputs.Projection, outputs.cut), at 256/128/64/32; plus int8
after pca (ranges from the fit texts).

    python bench/retrieval.py [--limit 3000]
    python bench/retrieval.py --pca [--eval 1500 --fit 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recall_at_k(scores: np.ndarray, k: int) -> float:
    """Query i's relevant doc is doc i."""
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    return float((top == np.arange(len(scores))[:, None]).any(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N docstrings only")
    parser.add_argument("--min-body", type=int, default=80)
    parser.add_argument("--rescore", type=int, default=40, help="binary candidates to rescore")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pca", action="store_true", help="truncate vs reduce: pca")
    parser.add_argument("--backend", default="torch",
                        help="torch|onnx|onnx-int8: a comma list adds each as a column "
                             "(float32 recall at every dim, and cosines to the first)")
    parser.add_argument("--eval", type=int, default=1500, help="--pca: held-out pairs")
    parser.add_argument("--fit", type=int, default=3000, help="--pca: texts to fit on")
    args = parser.parse_args()
    if args.pca:
        reduce_comparison(args)
        return

    import torch

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.demo import demo_rows
    from pipeline.encoder import Encoder
    from pipeline.encoder.codec import dequantize, quantize
    from pipeline.encoder.cuts import Calibration

    torch.set_num_threads(2)
    pairs = []
    for row in demo_rows(args.limit):
        body = row["text"].split("\n", 1)[1].strip() if "\n" in row["text"] else ""
        if len(body) >= args.min_body and len(row["summary"]) >= 10:
            pairs.append((row["summary"], body))
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    rng = np.random.default_rng(0)
    dims = (384, 256, 128, 64, 32)
    specs = tuple(OutputSpec(name=f"d{d}", dim=d) for d in dims) + (
        OutputSpec(name="l3", dim=384, layer=3),)
    backends = args.backend.split(",")
    encoder = Encoder(ModelConfig(backend=backends[0]), specs)
    q, _ = encoder.encode_float(queries)
    d, _ = encoder.encode_float(docs)
    columns = {}
    for backend in backends[1:]:  # the same recall, with another backend's vectors
        other = Encoder(ModelConfig(backend=backend), specs)
        oq, _ = other.encode_float(queries)
        od, _ = other.encode_float(docs)
        cos = (od["d384"] * d["d384"]).sum(1)  # unit vectors
        columns[backend] = {
            **{f"float32 {dim}": round(recall_at_k(oq[f"d{dim}"] @ od[f"d{dim}"].T, args.k), 4)
               for dim in dims},
            "doc cos to first min": round(float(cos.min()), 5),
            "doc cos to first mean": round(float(cos.mean()), 5)}

    results = {}
    for dim in dims:
        results[f"float32 {dim}"] = recall_at_k(q[f"d{dim}"] @ d[f"d{dim}"].T, args.k)
    results["float32 384 @ layer 3/6"] = recall_at_k(q["l3"] @ d["l3"].T, args.k)

    # int8: ranges from a calibration sample of docs (seeded), never from the eval docs' batch
    sample = rng.choice(len(docs), size=min(1000, len(docs)), replace=False)
    for dim in (384, 128):
        spec = OutputSpec(name=f"d{dim}", dim=dim, dtype="int8")
        calibration = Calibration.fit({spec.name: d[spec.name][sample]})
        docs_q = dequantize(quantize(d[spec.name], spec, calibration), spec, calibration)
        results[f"int8 {dim}"] = recall_at_k(q[spec.name] @ docs_q.T, args.k)

    for dim in (384, 256):
        spec = OutputSpec(name=f"d{dim}", dim=dim, dtype="ubinary")
        qb = quantize(q[spec.name], spec)
        db = quantize(d[spec.name], spec)
        hamming = np.unpackbits(qb[:, None, :] ^ db[None, :, :], axis=-1).sum(-1)
        results[f"binary {dim} (Hamming only)"] = recall_at_k(-hamming.astype(np.float32),
                                                              args.k)
        cand = np.argsort(hamming, axis=1, kind="stable")[:, : args.rescore]
        signs = np.unpackbits(db, axis=-1).astype(np.float32) * 2 - 1
        rescored = np.einsum("qd,qcd->qc", q[spec.name], signs[cand])
        order = np.take_along_axis(cand, np.argsort(-rescored, axis=1), axis=1)[:, : args.k]
        hit = (order == np.arange(len(queries))[:, None]).any(axis=1).mean()
        results[f"binary {dim} + float rescore of top {args.rescore}"] = float(hit)

    print(json.dumps({"pairs": len(pairs), "k": args.k, "backend": backends[0],
                      "recall": {k: round(v, 4) for k, v in results.items()},
                      **({"other_backends": columns} if columns else {})}, indent=2))


def summary_pairs(rows: list[dict], min_body: int) -> list[tuple[int, str, str]]:
    """(row index, summary line, body) of docstrings with a long enough body."""
    out = []
    for i, row in enumerate(rows):
        body = row["text"].split("\n", 1)[1].strip() if "\n" in row["text"] else ""
        if len(body) >= min_body and len(row["summary"]) >= 10:
            out.append((i, row["summary"], body))
    return out


def reduce_comparison(args) -> None:
    import dataclasses

    import torch

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.demo import demo_rows
    from pipeline.encoder import Encoder
    from pipeline.encoder.codec import dequantize, quantize
    from pipeline.encoder.cuts import Calibration, Projection, cut

    torch.set_num_threads(2)
    rows = demo_rows()
    pairs = summary_pairs(rows, args.min_body)
    order = np.random.default_rng(0).permutation(len(pairs))
    held = [pairs[i] for i in order[: args.eval]]
    used = {i for i, _, _ in held}
    others = [r["text"] for j, r in enumerate(rows) if j not in used]
    fit_texts = [others[i] for i in np.random.default_rng(1).permutation(len(others))[
        : args.fit]]
    full = OutputSpec(name="full", dim=384)
    encoder = Encoder(ModelConfig(), (full,))
    q = encoder.encode_float([s for _, s, _ in held])[0]["full"]
    d = encoder.encode_float([b for _, _, b in held])[0]["full"]
    f = encoder.encode_float(fit_texts)[0]["full"]

    table: dict[str, dict[str, float]] = {"full 384": {"truncate": recall_at_k(q @ d.T, args.k)}}
    for dim in (256, 128, 64, 32):
        row = {}
        trunc = OutputSpec(name="c", dim=dim)
        row["truncate"] = recall_at_k(cut(q, trunc) @ cut(d, trunc).T, args.k)
        for label, center in (("pca", False), ("pca centred", True)):
            spec = dataclasses.replace(trunc, reduce="pca", center=center)
            proj = Projection.fit(f, dim, center)
            qp, dp = cut(q, spec, proj), cut(d, spec, proj)
            row[label] = recall_at_k(qp @ dp.T, args.k)
            if not center:
                i8 = dataclasses.replace(spec, dtype="int8")
                calibration = Calibration.fit({"c": cut(f, spec, proj)})
                dq = dequantize(quantize(dp, i8, calibration), i8, calibration)
                row["pca int8"] = recall_at_k(qp @ dq.T, args.k)
        table[str(dim)] = row
    print(f"recall@{args.k}, {len(held)} held-out summary->body pairs, projection fitted on "
          f"{len(fit_texts)} other docstrings (all-MiniLM-L6-v2)", file=sys.stderr)
    cols = ["truncate", "pca", "pca centred", "pca int8"]
    print("| dim | " + " | ".join(cols) + " |", file=sys.stderr)
    print("|---|" + "---|" * len(cols), file=sys.stderr)
    for dim, row in table.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in cols]
        print(f"| {dim} | " + " | ".join(cells) + " |", file=sys.stderr)
    print(json.dumps({"pairs": len(held), "fit_texts": len(fit_texts), "k": args.k,
                      "recall": {dim: {k: round(v, 4) for k, v in row.items()}
                                 for dim, row in table.items()}}, indent=2))


if __name__ == "__main__":
    main()
