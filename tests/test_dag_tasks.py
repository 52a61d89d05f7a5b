"""The DAG's date rules, without Airflow (the real DAG runs in test_deploy.py)."""

from __future__ import annotations

import pytest

from pipeline.dag_tasks import check_logical_date, maintenance_due, start_date
from pipeline.errors import ConfigError


def test_start_date_comes_from_the_environment_and_bad_values_name_the_variable():
    assert str(start_date({}).date()) == "2026-01-01"
    assert str(start_date({"EMBED_START_DATE": "2024-01-01"}).date()) == "2024-01-01"
    with pytest.raises(ConfigError, match="EMBED_START_DATE.*'2024-13-01' is not a date"):
        start_date({"EMBED_START_DATE": "2024-13-01"})


def test_a_date_before_start_fails_naming_both_dates():
    start = start_date({"EMBED_START_DATE": "2024-01-01"})
    check_logical_date("2024-01-01", start)
    check_logical_date("2024-01-02T00:00:00+00:00", start)
    with pytest.raises(ConfigError, match="2023-12-31 is before the DAG's start_date 2024-01-01"):
        check_logical_date("2023-12-31", start)


def test_maintenance_runs_weekly_on_sundays_by_default():
    assert [maintenance_due(f"2024-01-0{d}", "weekly") for d in range(1, 8)] == \
        [False] * 6 + [True]  # 2024-01-07 is a Sunday
    assert maintenance_due("2024-01-03", "daily") and not maintenance_due("2024-01-07", "never")
    with pytest.raises(ConfigError, match="EMBED_MAINTAIN"):
        maintenance_due("2024-01-07", "monthly")


def test_a_date_with_no_rows_is_a_success_that_says_so(spark, tmp_path):
    """The DAG's check and summary after a run of a date the source has no rows for
    (the tasks' own functions on a real run; test_deploy.py runs the DAG itself)."""
    from pipeline import backfill
    from pipeline.config import load_config
    from pipeline.dag_tasks import check_run, summary_line, validate_config
    from pipeline.preflight import preflight
    from pipeline.run import run
    from tests.conftest import demo_table, write_config

    cfg_path = write_config(tmp_path, demo_table(spark, tmp_path, 20), str(tmp_path / "out"),
                            outputs="[{name: emb, dim: 32}]",
                            extra="source: {partition_column: day}")
    cfg = load_config(cfg_path)
    day = backfill.partition(cfg, preflight(cfg).fingerprint, "2024-03-01")
    result = run(cfg, spark=spark, partition=day)  # what jobs/embed.py --partition runs
    assert (result.status, result.rows_read, result.rows_embedded) == ("succeeded", 0, 0)
    validated = validate_config(str(cfg_path), "2024-03-01",
                                start_date({"EMBED_START_DATE": "2024-01-01"}))
    checked = check_run(str(cfg_path), validated["partition"])
    assert checked["run_id"] == result.run_id and checked["rows_read"] == 0
    assert summary_line(validated, checked).startswith(
        "partition 2024-03-01 has no rows in the source: embedded 0 rows into ")
