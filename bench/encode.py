"""Engine-only benchmark: the Spark-free encoder core against sentence-transformers.

Texts go in as Arrow arrays (chunks of --chunk rows, as Spark's Arrow batches
arrive in a worker) and come out as Arrow columns, the next chunk tokenized in a
thread while the model runs the current one, as in the Spark adapter. In the
same process run, on the same texts: sentence-transformers ``encode`` (fp32,
batch 32; on CUDA also its best setting, bf16 batch 512).

    python bench/encode.py                          # demo corpus, fp32
    python bench/encode.py --limit 2000 --precision bf16 --st-bf16
    python bench/encode.py --layers 3               # every column at layer 3 (early exit)
    python bench/encode.py --compare-layers 3       # full depth vs layer 3, same texts
    python bench/encode.py --attention varlen,sdpa  # packed vs padded batches, same texts
    python bench/encode.py --corpus canary --attention varlen,sdpa   # mixed lengths
    python bench/encode.py --random-model bert-large --precision bf16 --no-st   # MFU
    python bench/encode.py --host-only --threads 1,2   # the CPU side of a GPU job

Prints texts/s, tokens/s, padding efficiency, backend, precision, a profile
(seconds in the tokenizer alone vs in the model; which one bounds the run) and,
on CUDA, the model FLOP utilisation (MFU) against the GPU's bf16 dense peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference import cpu_label, st_encode_seconds, sync  # noqa: E402
from pipeline.demo import RANDOM_SHAPES, random_bert  # noqa: E402

# Dense bf16 peaks (TFLOP/s) for MFU; unknown GPUs report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
def model_flops(info, tokens: int, layers: int) -> float:
    """~2 x params x tokens for the dense blocks (attention scores not counted)."""
    h = info.hidden_size
    per_layer = 12 * h * h  # QKV + out (4h^2) + MLP with 4h (8h^2)
    return 2.0 * per_layer * layers * tokens


def run_engine(texts, model, precision, attention, token_budget, max_rows, layers, chunk,
               backend="torch", vectors=None):
    import numpy as np
    import pyarrow as pa

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.encoder import Encoder
    from pipeline.encoder.model import inspect_model

    hidden = inspect_model(model).hidden_size
    cfg = ModelConfig(name_or_path=model, precision=precision, attention=attention,
                      token_budget=token_budget, max_batch_rows=max_rows, backend=backend)
    specs = (OutputSpec(name="emb", dim=hidden, layer=layers),
             OutputSpec(name="emb_64", dim=min(64, hidden), layer=layers))
    encoder = Encoder(cfg, specs)
    encoder.encode(texts[:256])  # warm-up: kernels, allocator
    sync(encoder.runtime.device)
    chunks = [pa.array(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    start = time.perf_counter()
    for c in chunks:  # the tokenizer alone, for the profile
        encoder.prepare(c)
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    for c in chunks:  # the same through the tokenizer's Python wrapper, for comparison
        encoder.tokenizer(c.to_pylist(), truncation=True, max_length=cfg.max_length)
    wrapper_s = time.perf_counter() - start
    before = encoder.stats
    start = time.perf_counter()
    tokens = 0
    out = []
    for _, prepared in encoder.prefetched(chunks):
        result = encoder.encode(prepared)
        tokens += int(result.n_tokens.sum())
        out.append(result.columns["emb"])
    sync(encoder.runtime.device)
    seconds = time.perf_counter() - start
    if vectors is not None:  # the run's full-width vectors, for cosines between runs
        vectors.append(np.concatenate([np.asarray(c.values, np.float32).reshape(len(c), -1)
                                       for c in out]))
    stats = dataclasses.asdict(encoder.stats - before)
    report = {
        "texts_per_s": round(len(texts) / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 3),
        "padding_efficiency": round(stats["tokens"] / max(stats["padded_tokens"], 1), 3),
        "backend": backend,
        "runtime": encoder.runtime.label,
        "attention": encoder.runtime.attention,
        "precision": encoder.runtime.precision,
        "device": encoder.runtime.device,
        "layers_run": encoder.layers_run,
        "forward_batches": stats["batches"],
        "token_budget": encoder.token_budget,
        "max_batch_rows": encoder.max_batch_rows,
        # profile: the model's share runs on the caller's thread, the tokenizer's
        # overlaps it; the larger one bounds the run
        "tokenize_alone_s": round(tokenize_s, 3),
        "tokenize_via_wrapper_s": round(wrapper_s, 3),
        "model_s": round(stats["seconds"], 3),
        "bound_by": "tokenizer" if tokenize_s > stats["seconds"] else "model",
    }
    if encoder.runtime.device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        report["gpu"] = name
        if peak:
            flops = model_flops(encoder.info, tokens, encoder.layers_run)
            report["mfu"] = round(flops / seconds / (peak * 1e12), 4)
            report["mfu_model_time"] = round(flops / stats["seconds"] / (peak * 1e12), 4)
    return report


def _row_cos(a, b):
    import numpy as np

    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-12)


def run_openvino(texts, model, layers, reference) -> dict:
    """OpenVINO's CPU runtime on the engine's exported graphs (fp32, and the int8 one):
    the engine's tokenizer, length-sorted padded batches of its budget, mean pooling.
    A graph OpenVINO cannot run is reported with its error (the int8 graph's per-row
    QuantizeLinear scales: OpenVINO 2026.4 refuses them)."""
    import numpy as np
    import openvino as ov

    from pipeline.config import ModelConfig, OutputSpec
    from pipeline.encoder import Encoder
    from pipeline.encoder.batching import pad_batch, plan_batches

    out = {}
    core = ov.Core()
    # f32 asked for; "default": what OpenVINO picks on this CPU (bf16 where the CPU has
    # AVX512_BF16 or AMX), reported as it ran
    for backend, hint in (("onnx", "f32"), ("onnx", None), ("onnx-int8", None)):
        enc = Encoder(ModelConfig(name_or_path=model, backend=backend),
                      (OutputSpec(name="emb", dim=8, layer=layers),))
        path = str(enc.backend.path)
        config = {"INFERENCE_NUM_THREADS": str(os.cpu_count() or 1)}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        ran = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        name = ("openvino_int8_graph" if backend == "onnx-int8" else
                f"openvino_fp32_graph_{'f32' if hint else 'default'}")
        flat, offsets, lengths = enc.tokenize(texts)
        start = time.perf_counter()
        pooled = np.zeros((len(texts), enc.info.hidden_size), np.float32)
        try:
            for idx in plan_batches(lengths, enc.token_budget, enc.max_batch_rows):
                ids, mask = pad_batch(flat, offsets, lengths, idx, enc.pad_id, enc.left_pad)
                feed = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in enc.backend.meta["inputs"]:
                    feed["position_ids"] = np.clip(np.cumsum(mask, 1) - 1, 0, None) + \
                        enc.backend.position_offset()
                hidden = compiled(feed)[0]
                m = mask[..., None].astype(np.float32)
                pooled[idx] = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        except RuntimeError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            out[name] = {"error": lines[-1][:200] if lines else type(exc).__name__}
            continue
        seconds = time.perf_counter() - start
        cos = _row_cos(pooled, reference)
        out[name] = {
            "inference_precision": ran,
            "texts_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 3),
            "cos_to_first_min": round(float(cos.min()), 5),
            "cos_to_first_mean": round(float(cos.mean()), 5)}
    return out


def run_st(texts, model_dir, batch_size, dtype: str, device: str, max_length: int) -> dict:
    seconds = st_encode_seconds(texts, model_dir, batch_size, dtype, device, max_length)
    return {"texts_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 3),
            "setting": f"{dtype} batch {batch_size}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="demo", choices=("demo", "canary"),
                        help="demo: the stdlib docstrings; canary: the 240 shipped canary "
                             "texts (1 to 400+ words, code, many languages)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--model", default=None, help="package or directory (default: MiniLM)")
    parser.add_argument("--random-model", choices=sorted(RANDOM_SHAPES), default=None,
                        help="random weights of this BERT shape, --model's tokenizer")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"))
    parser.add_argument("--attention", default="auto",
                        help="auto|flash|varlen|sdpa|eager; a comma list runs each in turn "
                             "(the first is 'engine', the others 'engine_<backend>')")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="default: the engine's for the device (AUTO_BATCH)")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="default: the engine's for the device (AUTO_BATCH)")
    parser.add_argument("--chunk", type=int, default=4096, help="rows per Arrow batch")
    parser.add_argument("--layers", type=int, default=None, help="pool this layer (early exit)")
    parser.add_argument("--compare-layers", type=int, default=None,
                        help="also run at this layer and report the time ratio")
    parser.add_argument("--backend", default="torch",
                        help="torch|onnx|onnx-int8; a comma list runs each in turn, the "
                             "others with cosines to the first's vectors (min, mean)")
    parser.add_argument("--openvino", action="store_true",
                        help="also run OpenVINO (fp32 on the exported graph, and on the "
                             "int8 graph), same batches, cosines to the first backend")
    parser.add_argument("--st-bf16", action="store_true", help="also run ST in bf16")
    parser.add_argument("--no-st", action="store_true")
    parser.add_argument("--host-only", action="store_true",
                        help="everything but the forward pass vs the raw tokenizer (bench/host.py)")
    parser.add_argument("--threads", default="1,2", help="--host-only: thread counts")
    args = parser.parse_args()
    if args.host_only:
        from bench import host

        host.main([int(t) for t in args.threads.split(",")], args.limit, args.chunk)
        return

    import torch

    from pipeline.config import ModelConfig
    from pipeline.demo import demo_rows
    from pipeline.encoder.model import inspect_model, resolve_model_dir

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    defaults = ModelConfig()
    model = args.model or defaults.name_or_path
    scratch = tempfile.TemporaryDirectory(prefix="bench-model-")
    if args.random_model:
        model = random_bert(args.random_model, model, Path(scratch.name))
    budget, max_rows = args.token_budget, args.max_rows  # None: the engine's AUTO_BATCH
    if args.corpus == "canary":
        from pipeline.drift import canary_texts

        texts = canary_texts()[:args.limit] * args.repeat
    else:
        texts = [r["text"] for r in demo_rows(args.limit)] * args.repeat
    report = {"texts": len(texts), "corpus": args.corpus, "model": args.random_model or model,
              "chunk": args.chunk, "cpu": cpu_label()}
    engine = dict(texts=texts, model=model, precision=args.precision, token_budget=budget,
                  max_rows=max_rows, chunk=args.chunk)
    backends = args.attention.split(",")
    runtimes = args.backend.split(",")
    first: list = []
    report["engine"] = run_engine(attention=backends[0], layers=args.layers,
                                  backend=runtimes[0], vectors=first, **engine)
    for backend in backends[1:]:
        other = run_engine(attention=backend, layers=args.layers, **engine)
        report[f"engine_{backend}"] = other
        report[f"ratio_engine_over_{backend}"] = round(
            report["engine"]["texts_per_s"] / other["texts_per_s"], 3)
    for runtime in runtimes[1:]:  # other backends, against the first's vectors
        theirs: list = []
        other = run_engine(attention=backends[0], layers=args.layers, backend=runtime,
                           vectors=theirs, **engine)
        cos = _row_cos(theirs[0], first[0])
        other.update(cos_to_first_min=round(float(cos.min()), 5),
                     cos_to_first_mean=round(float(cos.mean()), 5))
        report[f"engine_{runtime}"] = other
    if args.openvino:
        report.update(run_openvino(texts, model, args.layers, first[0]))
    if args.compare_layers:
        shallow = run_engine(attention=backends[0], layers=args.compare_layers, **engine)
        report[f"engine_layer_{args.compare_layers}"] = shallow
        report["layer_time_ratio"] = round(shallow["seconds"] / report["engine"]["seconds"], 3)
    if not args.no_st:
        model_dir = resolve_model_dir(model)
        device = "cuda" if cuda else "cpu"
        settings = {"st_fp32": (32, "fp32")}
        if args.st_bf16:
            settings["st_bf16"] = (32, "bf16")
        if cuda:  # ST as a GPU user would tune it: half precision, big batches
            settings["st_fp16_bs256"] = (256, "fp16")
            settings["st_best"] = (512, "bf16")
        for key, (batch, dtype) in settings.items():
            report[key] = run_st(texts, model_dir, batch, dtype, device,
                                 inspect_model(str(model_dir)).default_max_length)
            for name in [k for k in report if (k == "engine" or k.startswith("engine_")
                         or k.startswith("openvino")) and "texts_per_s" in report[k]]:
                suffix = "" if name == "engine" else name.removeprefix("engine")
                report[f"ratio_engine{suffix}_over_{key}"] = round(
                    report[name]["texts_per_s"] / report[key]["texts_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
