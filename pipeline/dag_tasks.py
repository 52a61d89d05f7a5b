"""What the Airflow DAG's Python tasks do; the DAG file only wires these together."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.run import preflight


def validate_config(config_path: str, logical_date: str) -> dict:
    """Check config, model and source path (no Spark); decide the partition argument."""
    cfg = load_config(config_path)
    info = preflight(cfg)
    return {
        "config": config_path,
        "output": cfg.sink.path,
        "model": info.name,
        "columns": [o.name for o in cfg.outputs],
        # With a partition column, each scheduled run embeds its logical date's partition
        # exactly once (catchup = a backfill); without one, an incremental run.
        "partition": logical_date if cfg.source.partition_column else "",
    }


def check_run(config_path: str, partition: str) -> dict:
    """The run that spark-submit just made must have succeeded and reconciled."""
    from pipeline import lineage
    from pipeline.config import SparkConfig
    from pipeline.spark import get_session

    cfg = load_config(config_path)
    spark = get_session(SparkConfig(master="local[1]", app_name="embed-dag-check"))
    runs = lineage.latest_runs(spark, lineage.runs_path(cfg.sink.path, cfg.sink.runs_path),
                               limit=1, output_path=cfg.sink.path)
    if runs.empty:
        raise RuntimeError(f"no run of {cfg.sink.path} is recorded")
    last = runs.iloc[0].to_dict()
    if partition and last.get("partition") not in (partition, None):
        raise RuntimeError(f"the latest run is for partition {last.get('partition')}, "
                           f"not {partition}")
    if last["status"] != "succeeded":
        raise RuntimeError(f"run {last['run_id']} is {last['status']}: {last.get('error')}")
    counts = {k: int(last[k] or 0) for k in ("rows_read", "rows_embedded", "rows_quarantined",
                                             "rows_skipped")}
    if counts["rows_read"] != (counts["rows_embedded"] + counts["rows_quarantined"]
                               + counts["rows_skipped"]):
        raise RuntimeError(f"run {last['run_id']} does not reconcile: {counts}")
    return {"run_id": last["run_id"], "output_version": last["output_version"], **counts}


def summary_line(validated: dict, checked: dict) -> str:
    return (f"embedded {checked['rows_embedded']:,} rows into {validated['output']} "
            f"({', '.join(validated['columns'])}) with {validated['model']}; "
            f"skipped {checked['rows_skipped']:,}, quarantined {checked['rows_quarantined']:,}; "
            f"run {checked['run_id']}")
