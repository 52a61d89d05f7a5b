"""The reference every benchmark runs beside the pipeline: sentence-transformers'
``encode`` on the same texts, in the same process run."""

from __future__ import annotations

import time


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def st_encode_seconds(texts, model_dir, batch_size: int, dtype: str, device: str,
                      max_length: int | None = None) -> float:
    """Seconds for ``SentenceTransformer.encode(texts)``, model load and a 64-text
    warm-up excluded. The dtype is explicit (a directory saved in fp16 would
    otherwise load in fp16); ``max_length``: truncate where the engine does (a bare
    model directory would give ST the model's 512)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = SentenceTransformer(str(model_dir), device=device,
                                model_kwargs={"dtype": torch_dtype})
    if max_length:
        model.max_seq_length = max_length
    model.encode(texts[:64], batch_size=batch_size)
    sync(device)
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    sync(device)
    return time.perf_counter() - start



def cpu_label() -> str:
    """The CPU's model name and the instruction sets that decide int8 / bf16 speed
    (ratios measured on one CPU do not carry to another: say which one ran)."""
    import platform

    from pipeline.encoder.attention import cpu_info

    name, flags = cpu_info()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return (f"{name or platform.processor() or 'unknown'} "
            f"({', '.join(f for f in wanted if f in flags) or 'no AVX2'})")
