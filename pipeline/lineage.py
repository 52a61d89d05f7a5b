"""Lineage: the runs table and OpenLineage run events.

The runs table is one Delta table of run records next to the output table.
Append-only (a ``running`` row when a run starts, a final ``succeeded`` or
``failed`` row when it ends): concurrent runs never conflict on it, and the
latest row per run id is the run's state. A run that dies without a final row
(SIGKILL) stays ``running`` with no end time, which is what happened.

OpenLineage events (START, COMPLETE, FAIL) go through the openlineage-python
client with the transport from the config (file, console, http); an emitter
that fails logs a warning and never fails the run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)
PRODUCER = "https://github.com/embed-pipeline/embed-pipeline"
EMBEDDING_FACET_SCHEMA = PRODUCER + "/blob/main/docs/EmbeddingRunFacet.json"

RUNS_SCHEMA = (
    "run_id string, status string, event_time timestamp, started_at timestamp, "
    "ended_at timestamp, output_path string, output_version long, source_path string, "
    "source_version long, model string, model_fingerprint string, runtime string, "
    "config_hash string, config_json string, mode string, partition string, "
    "rows_read long, rows_embedded long, rows_quarantined long, rows_skipped long, "
    "rows_deleted long, seconds double, stage_seconds string, versions string, error string, "
    "lineage_run_id string, source_files_hash string, canary string, drift_status string, "
    "drift string"
)


def runs_path(sink_path: str, configured: str | None) -> str:
    return sibling_table(sink_path, configured, "_embedding_runs")


def sibling_table(sink_path: str, configured: str | None, name: str) -> str:
    """A bookkeeping table next to the output: the configured path, else <parent>/<name>."""
    return configured or str(Path(sink_path).parent / name)


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "embed-pipeline-git": code_revision()}
    for pkg in ("embed-pipeline", "pyspark", "delta-spark", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


@functools.cache
def code_revision() -> str:
    """The git commit of the code that runs (``+dirty`` with local changes), or '-'."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "pipeline", "jobs"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return rev + ("+dirty" if dirty else "")


def record(spark, path: str, **fields) -> None:
    """Append one run event; missing fields are null."""
    from pyspark.sql.types import _parse_datatype_string

    schema = _parse_datatype_string(RUNS_SCHEMA)
    row = {name: fields.get(name) for name in schema.fieldNames()}
    row["event_time"] = datetime.now(UTC).replace(tzinfo=None)
    for key in ("stage_seconds", "versions", "canary", "drift"):
        if isinstance(row[key], dict):
            row[key] = json.dumps(row[key], sort_keys=True)
    for key in ("started_at", "ended_at"):
        if isinstance(row[key], datetime) and row[key].tzinfo is not None:
            row[key] = row[key].astimezone(UTC).replace(tzinfo=None)
    frame = spark.createDataFrame([row], schema)
    for attempt in range(3):  # appends never conflict, but two first writes can race
        try:
            # mergeSchema: runs tables of older releases gain the newer columns
            frame.write.format("delta").mode("append").option("mergeSchema", "true") \
                .option("userMetadata", fields.get("run_id") or "").save(path)
            return
        except Exception:
            if attempt == 2:
                raise


def latest_runs(spark, path: str, limit: int = 20, output_path: str | None = None):
    """The latest event per run id, newest runs first (a pandas frame)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(path)
    if output_path:
        df = df.filter(F.col("output_path") == output_path)
    w = Window.partitionBy("run_id").orderBy(F.col("event_time").desc())
    return (df.withColumn("_n", F.row_number().over(w)).filter("_n = 1").drop("_n")
            .orderBy(F.col("started_at").desc()).limit(limit).toPandas())


# --------------------------------------------------------------------------- OpenLineage


def dataset_name(path: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a table path: ``file`` + absolute path locally,
    ``scheme://authority`` + path for object stores and HDFS (the naming spec)."""
    if "://" in path and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        authority, _, name = rest.partition("/")
        return f"{scheme}://{authority}", "/" + name
    return "file", str(Path(path.removeprefix("file://")).resolve())


def _embedding_facet_class():
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class EmbeddingRunFacet(RunFacet):
        """What made the vectors: model, weights fingerprint, columns, runtime."""

        model: str
        modelFingerprint: str  # noqa: N815
        outputs: list
        embedRunId: str  # noqa: N815
        runtime: str | None = None
        canary: str | None = None
        drift: str | None = None

        @staticmethod
        def _get_schema() -> str:
            return EMBEDDING_FACET_SCHEMA

    return EmbeddingRunFacet


class Emitter:
    """OpenLineage events for one run; a no-op when ``lineage.transport`` is none."""

    def __init__(self, cfg, run_uuid: str, job_name: str):
        self.cfg, self.run_uuid, self.job_name = cfg, run_uuid, job_name
        self.client = None
        if cfg.lineage.transport == "none":
            return
        try:
            from openlineage.client import OpenLineageClient
        except ImportError:
            log.warning("lineage.transport is %s but openlineage-python is not installed "
                        "(pip install 'embed-pipeline[lineage]'); no events are sent",
                        cfg.lineage.transport)
            return
        lin = cfg.lineage
        transport: dict = {"type": lin.transport}
        if lin.transport == "file":
            Path(lin.path).parent.mkdir(parents=True, exist_ok=True)
            transport.update(log_file_path=lin.path, append=True)
        elif lin.transport == "http":
            transport.update(url=lin.url, endpoint=lin.endpoint)
            if lin.api_key_env and os.environ.get(lin.api_key_env):
                transport["auth"] = {"type": "api_key", "apiKey": os.environ[lin.api_key_env]}
        self.client = OpenLineageClient(config={"transport": transport})

    def emit(self, state: str, *, info=None, model_fp: str = "", embed_run_id: str = "",
             result=None, error: str | None = None, schemas: dict | None = None,
             nominal_time: datetime | None = None) -> None:
        if self.client is None:
            return
        try:
            self.client.emit(self._event(state, info, model_fp, embed_run_id, result, error,
                                         schemas or {}, nominal_time))
        except Exception as exc:  # lineage is observability: it never fails a run
            log.warning("OpenLineage %s event not sent: %s", state, exc)

    def _event(self, state, info, model_fp, embed_run_id, result, error, schemas, nominal_time):
        from importlib.metadata import version

        from openlineage.client.event_v2 import (
            InputDataset,
            Job,
            OutputDataset,
            Run,
            RunEvent,
            RunState,
        )
        from openlineage.client.facet_v2 import (
            dataset_version_dataset,
            error_message_run,
            job_type_job,
            nominal_time_run,
            output_statistics_output_dataset,
            processing_engine_run,
            schema_dataset,
        )

        from pipeline.outputs import describe

        cfg = self.cfg

        def schema_facet(key):
            fields = schemas.get(key)
            if not fields:
                return {}
            return {"schema": schema_dataset.SchemaDatasetFacet(fields=[
                schema_dataset.SchemaDatasetFacetFields(name=n, type=t) for n, t in fields])}

        def version_facet(value):
            if value is None:
                return {}
            return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=str(value))}

        src_ns, src_name = dataset_name(cfg.source.path)
        out_ns, out_name = dataset_name(cfg.sink.path)
        inputs = [InputDataset(namespace=src_ns, name=src_name, facets={
            **schema_facet("source"),
            **version_facet(result.source_version if result else None)})]
        out_facets = {**schema_facet("output"),
                      **version_facet(result.output_version if result else None)}
        if result is not None:
            out_facets["outputStatistics"] = \
                output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=result.rows_embedded)
        outputs = [OutputDataset(namespace=out_ns, name=out_name, facets=out_facets)]
        if result is not None and result.rows_quarantined:
            q_ns, q_name = dataset_name(cfg.sink.quarantine)
            outputs.append(OutputDataset(namespace=q_ns, name=q_name, facets={
                "outputStatistics":
                    output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                        rowCount=result.rows_quarantined)}))
        facet_cls = _embedding_facet_class()
        run_facets = {
            "embedding": facet_cls(
                model=info.name if info else cfg.model.name_or_path, modelFingerprint=model_fp,
                outputs=describe(cfg.outputs), embedRunId=embed_run_id,
                runtime=result.runtime if result else None,
                canary=result.canary_summary if result else None,
                drift=result.drift_summary if result else None, producer=PRODUCER),
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=version("pyspark"), name="spark",
                openlineageAdapterVersion=version("embed-pipeline"), producer=PRODUCER),
        }
        if nominal_time is not None:
            run_facets["nominalTime"] = nominal_time_run.NominalTimeRunFacet(
                nominalStartTime=nominal_time.isoformat(), producer=PRODUCER)
        if error:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=error, programmingLanguage="python", producer=PRODUCER)
        job_facets = {"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="EMBED", jobType="JOB", producer=PRODUCER)}
        return RunEvent(
            eventType=getattr(RunState, state), eventTime=datetime.now(UTC).isoformat(),
            run=Run(runId=self.run_uuid, facets=run_facets),
            job=Job(namespace=cfg.lineage.namespace, name=self.job_name, facets=job_facets),
            producer=PRODUCER, inputs=inputs, outputs=outputs)


def new_lineage_run_id() -> str:
    """A UUIDv7 (time-ordered), as OpenLineage recommends for run ids."""
    try:
        from openlineage.client.uuid import generate_new_uuid

        return str(generate_new_uuid())
    except ImportError:
        import uuid

        return str(uuid.uuid4())
