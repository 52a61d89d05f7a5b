"""Airflow DAG: validate -> embed (spark-submit jobs/embed.py) -> check run -> drift -> publish.

Thin wiring only: the Python tasks call pipeline.dag_tasks, the embed task is a
SparkSubmitOperator running jobs/embed.py. Configure with environment variables
or params:

- EMBED_CONFIG (param ``config``): the run config, default conf/demo.yaml
- the run config's ``drift.distribution.on_breach`` is the one drift policy, as for
  ``embed run``: ``fail`` makes a breach fail the embed task (exit 9), ``warn``
  records it and the run goes on to publish. Exits that are not transient (2 config,
  3 source, 4 model, 5 identity, 6 reconcile, 8 canary, 9 breach) fail the embed
  task without retries; others (a lost executor, exit 7: another run committed
  first) are retried
- EMBED_SCHEDULE: cron or preset, default @daily
- EMBED_START_DATE (YYYY-MM-DD, default 2026-01-01): the first logical date,
  i.e. the first partition; a run for an earlier date fails in
  ``start_date_guard`` (Airflow itself would create no task and call the run a
  success)
- EMBED_CATCHUP=1: with source.partition_column, catchup backfills one logical
  date per run, each committed exactly once
- EMBED_MAINTAIN: weekly (default: OPTIMIZE + VACUUM after Sunday's run),
  daily or never
- the ``spark_default`` connection: master (local[2], spark://host:7077, yarn, k8s://...)

The run's logical date (``ds``) is the partition when the config names
source.partition_column; otherwise each run is incremental over the whole source.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param, dag, task

from pipeline.dag_tasks import start_date, submit_failure

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = os.environ.get("EMBED_CONFIG", str(ROOT / "conf" / "demo.yaml"))
START_DATE = start_date()
MAINTAIN = os.environ.get("EMBED_MAINTAIN", "weekly")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EmbedSubmit(SparkSubmitOperator):
    """spark-submit jobs/embed.py; an exit the pipeline calls non-transient (bad config,
    identity, canary, drift breach ...) fails the task for good: no retry re-runs it."""

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as exc:
            final = submit_failure(str(exc))
            if final is not None:
                raise AirflowFailException(final) from exc
            raise


@dag(
    dag_id="embed_pipeline",
    schedule=os.environ.get("EMBED_SCHEDULE", "@daily"),
    start_date=START_DATE,
    catchup=os.environ.get("EMBED_CATCHUP", "0") == "1",
    max_active_runs=1,  # one writer per output table
    params={"config": Param(DEFAULT_CONFIG, type="string", description="run config path")},
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1),
                  "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=30)},
    tags=["embeddings"],
)
def embed_pipeline():
    @task(retries=0)  # a bad config or date is not transient
    def validate(params=None, ds=None) -> dict:
        from pipeline.dag_tasks import validate_config

        return validate_config(params["config"], ds, START_DATE)

    @task(retries=0)
    def start_date_guard(ds=None) -> str:
        from pipeline.dag_tasks import check_logical_date

        check_logical_date(ds, START_DATE)
        return ds

    # Airflow creates no task instance for a logical date before a task's start_date
    # and then calls the run a success (apache/airflow#26865); a DAG clamps its tasks'
    # start_date to its own. Set after that clamp, the guard exists for every date,
    # and as a leaf its failure fails the run (validate checks the date again for
    # backfill runs, which create every task whatever its start_date).
    start_date_guard().operator.start_date = EPOCH  # type: ignore[attr-defined]  # PlainXComArg
    validated = validate()
    embed = EmbedSubmit(
        task_id="embed",
        application=str(ROOT / "jobs" / "embed.py"),
        application_args=[
            "--config", "{{ params.config }}", "--json",
            "--partition", "{{ ti.xcom_pull(task_ids='validate')['partition'] }}",
        ],
        conn_id="spark_default",
        name="embed-{{ ds }}",
        env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable},
    )

    @task
    def check(validated: dict) -> dict:
        from pipeline.dag_tasks import check_run

        return check_run(validated["config"], validated["partition"])

    @task(retries=0)  # a breach is a finding, not a transient failure
    def drift(validated: dict, checked: dict) -> dict:
        from pipeline.dag_tasks import check_drift

        return check_drift(validated["config"], checked["run_id"])

    @task
    def publish(validated: dict, checked: dict, drifted: dict) -> str:
        from pipeline.dag_tasks import summary_line

        line = summary_line(validated, checked, drifted)
        print(line)
        return line

    @task
    def maintain(validated: dict, published: str, ds=None) -> dict:
        from pipeline.dag_tasks import maintain_table

        return maintain_table(validated["config"], ds, MAINTAIN)

    # TaskFlow calls take XComArgs where the task bodies get dicts; Airflow's typing
    # cannot say so without its (unshipped) mypy plugin: apache/airflow#39514.
    checked = check(validated)  # type: ignore[arg-type]
    validated >> embed >> checked
    published = publish(validated, checked, drift(validated, checked))  # type: ignore[arg-type]
    maintain(validated, published)  # type: ignore[arg-type]


embed_pipeline()
