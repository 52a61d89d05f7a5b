#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may use, as Spark wants:
# {"name": "gpu", "addresses": ["0", "1", ...]}. Uses nvidia-smi; prints no
# addresses (and Spark then refuses to start a GPU executor) where there is none.
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then
  ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed 's/ //g' | paste -sd, -)
else
  ids=""
fi
printf '{"name": "gpu", "addresses": [%s]}\n' "$(echo "$ids" | sed 's/\([0-9]\+\)/"\1"/g')"
