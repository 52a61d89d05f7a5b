"""What the Airflow DAG's Python tasks do; the DAG file only wires these together."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.config import load_config
from pipeline.errors import NON_TRANSIENT_EXITS, ConfigError
from pipeline.preflight import preflight

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.config import RunConfig


DEFAULT_START_DATE = "2026-01-01"
MAINTAIN_EVERY = ("weekly", "daily", "never")


def start_date(env: Mapping[str, str] = os.environ) -> datetime:
    """The DAG's start_date: EMBED_START_DATE (YYYY-MM-DD), the first partition a
    deployment embeds; Airflow creates no task for an earlier logical date."""
    text = env.get("EMBED_START_DATE") or DEFAULT_START_DATE
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ConfigError("EMBED_START_DATE", f"{text!r} is not a date (YYYY-MM-DD)") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def check_logical_date(logical_date: str, start: datetime) -> None:
    """Fail loudly for a logical date before start_date.

    Airflow 3 creates no task instance for a logical date before a task's
    start_date and then marks the run a success with nothing done; the DAG's
    ``start_date_guard`` (whose own start_date is the epoch, so it always exists)
    and ``validate`` raise instead.
    """
    if date.fromisoformat(logical_date[:10]) < start.date():
        raise ConfigError("EMBED_START_DATE", (
            f"logical date {logical_date[:10]} is before the DAG's start_date "
            f"{start:%Y-%m-%d}: Airflow would run no task for it and report success; "
            "set EMBED_START_DATE to the first partition to embed"))


def run_config(config_path: str) -> RunConfig:
    """The task's config; its ``storage:`` section is what this process's clients use."""
    from pipeline import catalog

    cfg = load_config(config_path)
    storage.activate(cfg.storage)
    return catalog.located(cfg)[0]


def maintenance_due(logical_date: str, every: str) -> bool:
    """weekly: on logical dates that are Sundays; daily: every run; never."""
    if every not in MAINTAIN_EVERY:
        raise ConfigError("EMBED_MAINTAIN", f"{every!r} is not one of {', '.join(MAINTAIN_EVERY)}")
    if every == "weekly":
        return date.fromisoformat(logical_date[:10]).isoweekday() == 7
    return every == "daily"


def maintain_table(config_path: str, logical_date: str, every: str,
                   spark: SparkSession | None = None) -> dict:
    """OPTIMIZE, then VACUUM at the table's retention, when maintenance is due."""
    from pipeline import maintain
    from pipeline.config import SparkConfig
    from pipeline.spark import check_conditional_writes, get_session
    from pipeline.tables.delta import is_delta_table

    cfg = run_config(config_path)
    if not maintenance_due(logical_date, every) or not is_delta_table(cfg.sink.path):
        return {"maintained": False, "every": every}
    spark = spark or get_session(SparkConfig(master="local[1]", app_name="embed-dag-maintain"),
                                 storage.kinds([cfg.sink.path]))
    check_conditional_writes(spark, cfg.sink.path)
    before = maintain.layout(spark, cfg.sink.path)
    maintain.optimize(spark, cfg.sink.path, maintain.maintenance_id())
    maintain.vacuum(spark, cfg.sink.path, maintain.retention_hours(spark, cfg.sink.path))
    after = maintain.layout(spark, cfg.sink.path)
    return {"maintained": True, "every": every, "files_before": before.files,
            "files_after": after.files}


def validate_config(config_path: str, logical_date: str,
                    start: datetime | None = None) -> dict:
    """Check the date, config, model and source path (no Spark); decide the partition."""
    check_logical_date(logical_date, start or start_date())
    cfg = run_config(config_path)
    info = preflight(cfg).info
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
    """The run that spark-submit just made must have succeeded and reconciled.

    A partition found already committed (an Airflow retry, a second backfill
    over the same dates) is a recorded skip, not a failure: the run that
    committed the partition is reported (its drift is what the drift task
    checks), with ``skipped_by`` naming the run that found it done. The runs
    table is read with delta-rs (pipeline.tables.runs): no JVM for a check.
    """
    from pipeline.tables import runs as runs_table
    from pipeline.tables.paths import TablePaths

    cfg = run_config(config_path)
    path = TablePaths.of(cfg).runs
    runs = runs_table.latest(path, 1, cfg.sink.path)
    if runs.empty:
        raise RuntimeError(f"no run of {cfg.sink.path} is recorded")
    last = _plain(runs.iloc[0].to_dict())
    if partition and last.get("partition") not in (partition, None):
        raise RuntimeError(f"the latest run is for partition {last.get('partition')}, "
                           f"not {partition}")
    skipped_by = None
    if last["status"] == "skipped":
        skipped_by = last["run_id"]
        done = runs_table.latest(path, 1, cfg.sink.path, partition or None, "succeeded")
        if not done.empty:
            last = _plain(done.iloc[0].to_dict())
    elif last["status"] != "succeeded":
        raise RuntimeError(f"run {last['run_id']} is {last['status']}: {last.get('error')}")
    counts = {k: int(last[k] or 0) for k in ("rows_read", "rows_embedded", "rows_quarantined",
                                             "rows_skipped")}
    if counts["rows_read"] != (counts["rows_embedded"] + counts["rows_quarantined"]
                               + counts["rows_skipped"]):
        raise RuntimeError(f"run {last['run_id']} does not reconcile: {counts}")
    version = last.get("output_version")
    return {"run_id": last["run_id"], "output_version": None if version is None else int(version),
            "skipped_by": skipped_by, **counts}


def _plain(record: dict) -> dict:
    """A runs-table row from pandas, with NaN (a null number) as None: XCom is JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def check_drift(config_path: str, run_id: str) -> dict:
    """The run's drift results (canary + distribution). The config's policy decides, as
    it does for ``embed run``: with ``drift.distribution.on_breach: fail`` a breach
    fails the task (:class:`~pipeline.errors.DriftBreach`, naming the checks that
    tripped and the command that draws the report), so publish does not run; with
    ``warn`` it is reported. (A breach with ``fail`` already failed the embed task,
    exit 9, which Airflow does not retry; this covers a partition found committed by
    a run that breached.) Read with delta-rs, like check_run.
    """
    from pipeline import drift
    from pipeline.errors import DriftBreach
    from pipeline.tables.delta import is_delta_table
    from pipeline.tables.paths import TablePaths

    cfg = run_config(config_path)
    path = TablePaths.of(cfg).drift
    if not is_delta_table(path):
        return {"status": "none", "canary": "-", "flags": []}
    rows = drift.latest(None, path, cfg.sink.path, run_id)
    if rows.empty:
        return {"status": "none", "canary": "-", "flags": []}
    status = str(rows["status"].iloc[0])
    flags = drift.stored_flags(rows)
    out = {"status": status, "canary": str(rows["canary_verdict"].iloc[0]), "flags": flags}
    if status == "breach" and cfg.drift.distribution.on_breach == "fail":
        raise DriftBreach(f"run {run_id} drifted: {'; '.join(flags)} (report: embed drift "
                          f"--table {cfg.sink.path} --run {run_id})")
    return out


_EXIT_CODE = re.compile(r"Error code is: (\d+)")


def submit_failure(message: str) -> str | None:
    """For a failed spark-submit (the Spark provider's error text, which names the exit
    code): a one-line reason when the exit is not transient (pipeline.errors), so the
    task fails without retries; None when a retry may help."""
    found = _EXIT_CODE.search(message)
    if not found:
        return None
    code = int(found.group(1))
    if code not in NON_TRANSIENT_EXITS:
        return None
    return (f"jobs/embed.py exited {code} ({NON_TRANSIENT_EXITS[code]}): not transient, so "
            "not retried; the embed task's log has the one-line error")


def summary_line(validated: dict, checked: dict, drifted: dict | None = None) -> str:
    line = (f"embedded {checked['rows_embedded']:,} rows into {validated['output']} "
            f"({', '.join(validated['columns'])}) with {validated['model']}; "
            f"skipped {checked['rows_skipped']:,}, quarantined {checked['rows_quarantined']:,}; "
            f"run {checked['run_id']}")
    if validated["partition"] and checked["rows_read"] == 0:
        line = (f"partition {validated['partition']} has no rows in the source: embedded 0 "
                f"rows into {validated['output']}; run {checked['run_id']}")
    if checked.get("skipped_by"):
        line = (f"partition {validated['partition']} was already committed by run "
                f"{checked['run_id']} ({checked['rows_embedded']:,} rows); nothing to do "
                f"(run {checked['skipped_by']} recorded the skip)")
    if drifted:
        line += f"; canary {drifted['canary']}, drift {drifted['status']}"
    return line
