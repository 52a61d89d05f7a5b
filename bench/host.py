"""The CPU side of a GPU job, without the GPU: everything the encoder does around
the forward pass (Arrow in, tokenize, chunk, batch plan, pack/pad, pool buffers,
cut, quantize, Arrow out), with the forward pass replaced by a constant, against
the raw Rust tokenizer (``encode_batch``, truncation 256) on the same texts.
At 40,000 texts/s for MiniLM on an H100 this path, not the GPU, sets the pace.

Each thread count runs in its own process (the tokenizer's Rust thread pool is
sized once per process: ``RAYON_NUM_THREADS``), pinned to that many cores.

    python bench/encode.py --host-only [--threads 1,2] [--limit N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(threads: int, limit: int | None, chunk: int, repeats: int = 2) -> dict:
    """In this process (its env already sized): host path vs raw tokenizer, texts/s."""
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.demo import demo_rows
    from pipeline.encoder import Encoder

    torch.set_num_threads(threads)
    if hasattr(os, "sched_setaffinity"):  # N threads on N cores, not on every core
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    texts = [r["text"] for r in demo_rows(limit)]
    specs = (OutputSpec(name="emb", dim=384), OutputSpec(name="emb_64", dim=64))
    encoder = Encoder(ModelConfig(), specs)
    hidden = encoder.info.hidden_size

    def no_forward(*arrays, **_):  # one pooled row per unit; the host path is all that runs
        rows = len(arrays[2]) - 1 if encoder.packed else arrays[0].shape[0]
        return {g: np.zeros((rows, hidden), np.float32) for g in encoder.groups}

    encoder.forward = no_forward  # type: ignore[method-assign]
    encoder.forward_packed = no_forward  # type: ignore[method-assign]
    chunks = [pa.array(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]

    def host_path() -> int:
        return sum(len(encoder.encode(p).n_tokens) for _, p in encoder.prefetched(chunks))

    backend = encoder.tokenizer._tokenizer

    def raw(method: str):
        def run() -> int:
            backend.no_padding()
            backend.enable_truncation(256)
            for i in range(0, len(texts), chunk):
                getattr(backend, method)(texts[i:i + chunk])
            return len(texts)
        return run

    timings = {name: best_of(fn, repeats) for name, fn in (
        ("raw_encode_batch", raw("encode_batch")), ("raw_encode_batch_fast",
                                                   raw("encode_batch_fast")),
        ("host", host_path))}
    rates = {k: round(len(texts) / v, 1) for k, v in timings.items()}
    return {"threads": threads, "texts": len(texts), "packed": encoder.packed,
            **{f"{k}_texts_per_s": v for k, v in rates.items()},
            "host_over_raw_encode_batch": round(rates["host"] / rates["raw_encode_batch"], 3),
            "host_over_raw_fast": round(rates["host"] / rates["raw_encode_batch_fast"], 3)}


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(thread_counts: list[int], limit: int | None, chunk: int) -> None:
    results = []
    for n in thread_counts:
        env = dict(os.environ, RAYON_NUM_THREADS=str(n), TOKENIZERS_PARALLELISM="true",
                   OMP_NUM_THREADS=str(n), HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), str(limit or 0),
                               str(chunk)], env=env, capture_output=True, text=True,
                              cwd=ROOT, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {"runs": results}
    if len(results) > 1:
        base = results[0]["host_texts_per_s"]
        report["host_scaling"] = {f"{r['threads']}_over_{results[0]['threads']}":
                                  round(r["host_texts_per_s"] / base, 3) for r in results[1:]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(ROOT))
    n, lim, size = (int(a) for a in sys.argv[2:5])
    print(json.dumps(measure(n, lim or None, size)))
