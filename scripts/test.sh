#!/usr/bin/env bash
# Build what the tests need (scripts/bootstrap.sh), then run them.
# pytest's exit 5 ("no tests collected") is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh || exit 1
# The S3 tests' connector (hadoop-aws and the AWS SDK bundle) into Ivy's cache now, so no
# test downloads it.
.venv/bin/python -m pipeline.jars --ensure s3 || exit 1
export PYSPARK_PYTHON="$(pwd)/.venv/bin/python"
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
