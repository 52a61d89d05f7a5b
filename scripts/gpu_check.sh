#!/usr/bin/env bash
# The GPU checks of the Spark-free encoder core, in one go (made for the `device`
# tool: run `bash scripts/gpu_bundle.sh` here first, carry `.gpu`):
#   the placement on the real device count, GPU tests (tests/test_gpu.py), then bench/encode.py on MiniLM (engine vs
#   sentence-transformers fp32 bs32, fp16 bs256 and bf16 bs512, same run) and on a random
#   BERT-large in bf16 (MFU). Results land in $OUT (or /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export EMBED_GPU_MODEL=${EMBED_GPU_MODEL:-$PWD/.gpu/minilm} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$out/versions.txt"
# The placement a local[*] run would get on this machine's real device count.
"$PY" -c "import os, torch; from pipeline.placement import ClusterView, plan; n = os.cpu_count(); print(plan(ClusterView(master='local[*]', machine_cores=n, slots=n, cuda_devices=torch.cuda.device_count())).to_json())" | tee "$out/placement.json"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
"$PY" bench/encode.py --model "$EMBED_GPU_MODEL" --precision auto --attention auto,sdpa \
    --repeat 5 2>"$out/minilm.err" | tee "$out/minilm.json"
"$PY" bench/encode.py --model "$EMBED_GPU_MODEL" --random-model bert-large --precision bf16 \
    --attention auto,sdpa --limit 4000 2>"$out/bert_large.err" | tee "$out/bert_large.json"
