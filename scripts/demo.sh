#!/usr/bin/env bash
# Set everything up, then embed the demo data (the standard library's docstrings)
# into a local Delta warehouse under ./warehouse/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ ! -d warehouse/demo/docstrings/_delta_log ]; then
  .venv/bin/embed demo-data --out warehouse/demo/docstrings
fi
.venv/bin/embed run --config conf/demo.yaml "$@"
# One example search over what just landed (the query encoded as the rows were).
.venv/bin/embed search --table warehouse/demo/docstring_embeddings --column emb_384 --k 5 \
  "parse command line arguments"
