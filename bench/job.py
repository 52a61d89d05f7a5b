"""Whole-job benchmark: Spark read -> encode -> Delta commit, against bare sentence-transformers.

Both run in this one process run on the same texts (the demo corpus, optionally
repeated), so their ratio is what counts, not the absolute times:

    python bench/job.py                    # full demo corpus, fp32
    python bench/job.py --limit 2000       # quicker
    python bench/job.py --set model.precision=bf16 --st-precision bf16

The job is timed from the start of ``run()`` (Spark start included: a new
session per job run) to its Delta commit; sentence-transformers is timed for
``encode`` alone (model load excluded), fp32, batch 32, on the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference import cpu_label, st_encode_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N docstrings only")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the corpus N times")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for the job, e.g. model.precision=bf16")
    parser.add_argument("--st-batch-size", type=int, default=32)
    parser.add_argument("--st-precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", dest="json_out", default=None, help="write results here")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"),
                        help="model.backend of the job (ST stays torch fp32)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.demo import demo_rows
    from pipeline.encoder.model import resolve_model_dir
    from pipeline.run import run
    from pipeline.spark import get_session

    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        rows = demo_rows(args.limit) * args.repeat
        texts = [r["text"] for r in rows]
        cores = os.cpu_count() or 1

        cfg = load_config(ROOT / "conf" / "demo.yaml", [
            f"source.path={work / 'source'}", f"sink.path={work / 'out'}",
            f"lineage.path={work / 'openlineage.jsonl'}", f"model.backend={args.backend}",
            *args.overrides])
        spark = get_session(cfg.spark)
        from pipeline.demo import write_demo_table

        write_demo_table(spark, str(work / "source"), limit=args.limit, repeat=args.repeat)
        spark.stop()  # the job starts its own session, as a real run does

        start = time.perf_counter()
        result = run(cfg)
        job_s = time.perf_counter() - start
        get_session(cfg.spark).stop()

        import torch

        torch.set_num_threads(cores)
        st_s = st_encode_seconds(texts, resolve_model_dir(cfg.model.name_or_path),
                                 args.st_batch_size, args.st_precision, "cpu",
                                 cfg.model.max_length)
        report = {
            "texts": len(texts),
            "cpu": cpu_label(),
            "job_seconds": round(job_s, 2),
            "job_texts_per_s": round(len(texts) / job_s, 1),
            "job_encode_seconds_summed_over_workers": round(result.encode_seconds, 2),
            "job_stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
            "job_runtime": result.runtime,
            "job_padding_efficiency": round(result.padding_efficiency, 3),
            "st_seconds": round(st_s, 2),
            "st_texts_per_s": round(len(texts) / st_s, 1),
            "st_setting": f"{args.st_precision} batch {args.st_batch_size}",
            "ratio_job_over_st": round(st_s / job_s, 3),
        }
        print(json.dumps(report, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
