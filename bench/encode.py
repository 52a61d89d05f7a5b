"""Engine-only benchmark: the Spark-free encoder core against sentence-transformers.

Texts go in as an Arrow array and come out as Arrow columns, as in the Spark
adapter, with no Spark. In the same process run, on the same texts:
sentence-transformers ``encode`` (fp32, batch 32, and optionally its bf16).

    python bench/encode.py                          # demo corpus, fp32
    python bench/encode.py --limit 2000 --precision bf16 --st-bf16
    python bench/encode.py --layers 3               # every column at layer 3 (early exit)
    python bench/encode.py --compare-layers 3       # full depth vs layer 3, same texts

Prints texts/s, tokens/s, padding efficiency, backend, precision, and on CUDA
the model FLOP utilisation (MFU) against the GPU's bf16 dense peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peaks (TFLOP/s) for MFU; unknown GPUs report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def model_flops(info, tokens: int, layers: int) -> float:
    """~2 x params x tokens for the dense blocks (attention scores ignored)."""
    h = info.hidden_size
    per_layer = 12 * h * h  # QKV + out (4h^2) + MLP with 4h (8h^2)
    return 2.0 * per_layer * layers * tokens


def run_engine(texts, precision, attention, token_budget, max_rows, layers, repeat_warm=True):
    import pyarrow as pa

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.encoder import Encoder

    cfg = ModelConfig(precision=precision, attention=attention, token_budget=token_budget,
                      max_batch_rows=max_rows)
    specs = (OutputSpec(name="emb", dim=384, layer=layers), OutputSpec(name="emb_64", dim=64,
                                                                       layer=layers))
    encoder = Encoder(cfg, specs)
    if repeat_warm:
        encoder.encode(texts[:64])
    arrow = pa.array(texts)
    start = time.perf_counter()
    result = encoder.encode(arrow)
    seconds = time.perf_counter() - start
    tokens = int(result.n_tokens.sum())
    report = {
        "texts_per_s": round(len(texts) / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 2),
        "padding_efficiency": round(result.padding_efficiency, 3),
        "backend": encoder.runtime.attention,
        "precision": encoder.runtime.precision,
        "device": encoder.runtime.device,
        "layers_run": encoder.layers_run,
    }
    if encoder.runtime.device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            flops = model_flops(encoder.info, tokens, encoder.layers_run)
            report["mfu"] = round(flops / seconds / (peak * 1e12), 4)
    return report


def run_st(texts, model_dir, batch_size, bf16: bool, device: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    if bf16:
        model = model.to(torch.bfloat16)
    model.encode(texts[:64], batch_size=batch_size)
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"texts_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 2),
            "setting": f"{'bf16' if bf16 else 'fp32'} batch {batch_size}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"))
    parser.add_argument("--attention", default="auto", choices=("auto", "flash", "sdpa", "eager"))
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="pool this layer (early exit)")
    parser.add_argument("--compare-layers", type=int, default=None,
                        help="also run at this layer and report the time ratio")
    parser.add_argument("--st-bf16", action="store_true", help="also run ST in bf16")
    parser.add_argument("--no-st", action="store_true")
    args = parser.parse_args()

    import torch

    from pipeline.config import ModelConfig
    from pipeline.demo import demo_rows
    from pipeline.encoder.model import resolve_model_dir

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    defaults = ModelConfig()
    budget = args.token_budget or (65536 if cuda else defaults.token_budget)
    max_rows = args.max_rows or (1024 if cuda else defaults.max_batch_rows)
    texts = [r["text"] for r in demo_rows(args.limit)] * args.repeat
    report = {"texts": len(texts), "token_budget": budget, "max_batch_rows": max_rows}
    report["engine"] = run_engine(texts, args.precision, args.attention, budget, max_rows,
                                  args.layers)
    if args.compare_layers:
        shallow = run_engine(texts, args.precision, args.attention, budget, max_rows,
                             args.compare_layers)
        report[f"engine_layer_{args.compare_layers}"] = shallow
        report["layer_time_ratio"] = round(shallow["seconds"] / report["engine"]["seconds"], 3)
    if not args.no_st:
        model_dir = resolve_model_dir(defaults.name_or_path)
        device = "cuda" if cuda else "cpu"
        report["st_fp32"] = run_st(texts, model_dir, 32, False, device)
        report["ratio_engine_over_st_fp32"] = round(
            report["engine"]["texts_per_s"] / report["st_fp32"]["texts_per_s"], 3)
        if args.st_bf16:
            report["st_bf16"] = run_st(texts, model_dir, 32, True, device)
            report["ratio_engine_over_st_bf16"] = round(
                report["engine"]["texts_per_s"] / report["st_bf16"]["texts_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
