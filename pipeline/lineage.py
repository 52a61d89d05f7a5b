"""Lineage: the runs table and OpenLineage run events.

The runs table (:mod:`pipeline.tables.runs`) gets a ``running`` row when a run
starts and a final ``succeeded`` or ``failed`` row when it ends; a run that dies
without a final row (SIGKILL) stays ``running`` with no end time, which is what
happened. A partition found already committed is one ``skipped`` row (no
``running`` row, no OpenLineage event: nothing ran).

OpenLineage events (START, COMPLETE, FAIL) go through the openlineage-python
client with the transport from the config (file, console, http); an emitter
that fails logs a warning and never fails the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.tables import runs
from pipeline.tables.paths import TablePaths

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.config import RunConfig
    from pipeline.encoder.model import ModelInfo
    from pipeline.results import RunResult

log = logging.getLogger(__name__)
REPO = "https://github.com/embed-pipeline/embed-pipeline"
# The custom run facet: key {prefix}_{name} and class {Prefix}{Name}RunFacet, as the
# spec's custom-facet naming asks; its JSON schema ships in the package, and the
# _schemaURL names it at this release's tag (immutable, as the spec asks).
EMBEDDING_FACET_KEY = "embedPipeline_embedding"
EMBEDDING_FACET_FILE = "pipeline/data/EmbedPipelineEmbeddingRunFacet.json"


@functools.cache
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embed-pipeline")
    except PackageNotFoundError:
        return "0+unknown"


@functools.cache
def producer() -> str:
    """OpenLineage ``producer``: this project at this release's tag."""
    return f"{REPO}/tree/v{package_version()}"


def embedding_facet_schema_url() -> str:
    raw = REPO.replace("https://github.com/", "https://raw.githubusercontent.com/")
    return (f"{raw}/v{package_version()}/{EMBEDDING_FACET_FILE}"
            "#/$defs/EmbedPipelineEmbeddingRunFacet")



def job_name(sink_path: str) -> str:
    """The OpenLineage job name: one job per output table."""
    return "embed." + storage.name(sink_path)


def nominal_time(partition: str | None) -> datetime | None:
    """A partition value that is a date is the run's nominal (scheduled) time."""
    if not partition:
        return None
    try:
        return datetime.fromisoformat(partition).replace(tzinfo=UTC)
    except ValueError:
        return None


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


@dataclass(frozen=True)
class RunMeta:
    """Who a run is, for its records and events: fixed when it starts."""

    run_id: str
    started_at: datetime
    info: ModelInfo | None
    model_fp: str
    partition: str | None = None

    @property
    def nominal_time(self) -> datetime | None:
        return nominal_time(self.partition)


class RunRecorder:
    """One run's records: the runs table (``running`` -> ``succeeded`` | ``failed``, or a
    lone ``skipped``) and its OpenLineage events (START -> COMPLETE | FAIL)."""

    def __init__(self, spark: SparkSession | None, cfg: RunConfig, meta: RunMeta):
        self.spark, self.cfg, self.meta = spark, cfg, meta
        self.path = TablePaths.of(cfg).runs
        self.lineage_run_id = new_lineage_run_id()
        self.emitter = Emitter(cfg, self.lineage_run_id, job_name(cfg.sink.path))
        self.base: dict[str, Any] = {
            "run_id": meta.run_id, "started_at": meta.started_at,
            "output_path": cfg.sink.path, "source_path": cfg.source.path,
            "model": meta.info.name if meta.info else cfg.model.name_or_path,
            "model_fingerprint": meta.model_fp, "config_hash": cfg.config_hash(),
            "mode": cfg.sink.mode, "partition": meta.partition,
            "config_json": json.dumps(cfg.to_dict(), sort_keys=True, default=str),
            "versions": software_versions(), "lineage_run_id": self.lineage_run_id,
        }

    def start(self) -> None:
        runs.append(self.spark, self.path, {"status": "running", **self.base})
        self.emitter.emit("START", self.meta)

    def fail(self, exc: BaseException, stage_seconds: dict[str, float]) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        error = f"{type(exc).__name__}: {message}"[:4000]
        seconds = sum(stage_seconds.values())
        runs.append(self.spark, self.path, {
            "status": "failed", "ended_at": datetime.now(UTC), "seconds": seconds,
            "stage_seconds": stage_seconds, "error": error, **self.base})
        self.emitter.emit("FAIL", self.meta, error=error)

    def succeed(self, result: RunResult) -> None:
        runs.append(self.spark, self.path, {"status": "succeeded", "ended_at": datetime.now(UTC),
                                            **_result_fields(result), **self.base})
        self.emitter.emit("COMPLETE", self.meta, result=result)

    def skip(self, result: RunResult) -> None:
        runs.append(self.spark, self.path, {"status": "skipped", "ended_at": datetime.now(UTC),
                                            **_result_fields(result), **self.base})


def _result_fields(result: RunResult) -> dict:
    return {
        "output_version": result.output_version, "source_version": result.source_version,
        "runtime": result.runtime, "placement": result.placement or None,
        "rows_read": result.rows_read,
        "rows_embedded": result.rows_embedded, "rows_quarantined": result.rows_quarantined,
        "rows_skipped": result.rows_skipped, "rows_deleted": result.rows_deleted,
        "chunks_written": result.chunks_written, "chunks_deleted": result.chunks_deleted,
        "seconds": result.seconds, "stage_seconds": result.stage_seconds,
        "source_files_hash": result.source_files_hash, "message": result.message or None,
        "plan_path": result.plan_path, "plan_note": result.plan_note or None,
        "canary": result.canary.to_dict() if result.canary else None,
        "drift_status": result.drift_status,
        "drift": result.drift.to_dict() if result.drift else None,
        "parity": result.parity or None,
        "warnings": json.dumps(result.warnings) if result.warnings else None,
    }


# --------------------------------------------------------------------------- OpenLineage


def dataset_name(path: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a table path, as the naming spec has them:
    ``file`` + the absolute path locally; ``s3://bucket`` + the object key for S3 (s3a
    is the connector's name, not the store's), ``gs://bucket`` and
    ``abfss://container@account...`` + the path inside; ``hdfs://host:port`` + the
    absolute path."""
    path = storage.normalize(path)
    if storage.is_local(path):
        return "file", path
    shown = storage.display(path)
    authority, key = storage.bucket_and_key(shown)
    namespace = f"{shown.split('://', 1)[0]}://{authority}"
    return namespace, "/" + key if storage.scheme(path) == "hdfs" else key


def _embedding_facet_class() -> Any:
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class EmbedPipelineEmbeddingRunFacet(RunFacet):
        """What made the vectors: model, weights fingerprint, columns, runtime."""

        model: str
        modelFingerprint: str  # noqa: N815
        outputs: list
        embedRunId: str  # noqa: N815
        runtime: str | None = None
        canary: str | None = None
        drift: str | None = None
        chunking: dict | None = None
        passagesWritten: int | None = None  # noqa: N815

        @staticmethod
        def _get_schema() -> str:
            return embedding_facet_schema_url()

    return EmbedPipelineEmbeddingRunFacet


class Emitter:
    """OpenLineage events for one run; a no-op when ``lineage.transport`` is none."""

    def __init__(self, cfg: RunConfig, run_uuid: str, job_name: str):
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
        if lin.transport == "file" and lin.path:  # (config validation requires the path)
            Path(lin.path).parent.mkdir(parents=True, exist_ok=True)
            transport.update(log_file_path=lin.path, append=True)
        elif lin.transport == "http":
            transport.update(url=lin.url, endpoint=lin.endpoint)
            if lin.api_key_env and os.environ.get(lin.api_key_env):
                transport["auth"] = {"type": "api_key", "apiKey": os.environ[lin.api_key_env]}
        self.client = OpenLineageClient(config={"transport": transport})

    def emit(self, state: str, meta: RunMeta, result: RunResult | None = None,
             error: str | None = None) -> None:
        if self.client is None:
            return
        try:
            self.client.emit(self.event(state, meta, result, error))
        except Exception as exc:  # lineage is observability: it never fails a run
            log.warning("OpenLineage %s event not sent: %s", state, exc)

    def event(self, state: str, meta: RunMeta, result: RunResult | None = None,
              error: str | None = None) -> Any:
        """The RunEvent of ``state`` (START, COMPLETE with the run's result, FAIL)."""
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
        from openlineage.client.facet_v2 import JobFacet, job_type_job

        inputs, outputs = _datasets(self.cfg, result, result.schemas if result else {})
        run_facets = _run_facets(self.cfg, meta, result, error)
        job_facets: dict[str, JobFacet] = {"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="EMBED", jobType="JOB", producer=producer())}
        return RunEvent(
            eventType=getattr(RunState, state), eventTime=datetime.now(UTC).isoformat(),
            run=Run(runId=self.run_uuid, facets=run_facets),
            job=Job(namespace=self.cfg.lineage.namespace, name=self.job_name,
                    facets=job_facets),
            producer=producer(), inputs=inputs, outputs=outputs)


def _datasets(cfg: RunConfig, result: RunResult | None, schemas: dict) -> tuple[list, list]:
    """The event's input (the source) and outputs (the table; the quarantine table when
    rows went there), with schema and version facets; row counts are output facets."""
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import (
        DatasetFacet,
        OutputDatasetFacet,
        dataset_version_dataset,
        output_statistics_output_dataset,
        schema_dataset,
    )

    def facets(schema_key: str, version: int | None) -> dict[str, DatasetFacet]:
        out: dict[str, DatasetFacet] = {}
        if schemas.get(schema_key):
            out["schema"] = schema_dataset.SchemaDatasetFacet(fields=[
                schema_dataset.SchemaDatasetFacetFields(name=n, type=t)
                for n, t in schemas[schema_key]])
        if version is not None:
            out["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=str(version))
        return out

    def rows(count: int) -> dict[str, OutputDatasetFacet]:
        return {"outputStatistics":
                output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=count)}

    src_ns, src_name = dataset_name(cfg.source.path)
    out_ns, out_name = dataset_name(cfg.sink.path)
    inputs = [InputDataset(namespace=src_ns, name=src_name, facets=facets(
        "source", result.source_version if result else None))]
    outputs = [OutputDataset(namespace=out_ns, name=out_name,
                             facets=facets("output", result.output_version if result else None),
                             outputFacets=rows(result.chunks_written if cfg.chunking.enabled
                                               else result.rows_embedded) if result else {})]
    if result is not None and result.rows_quarantined:
        q_ns, q_name = dataset_name(TablePaths.of(cfg).quarantine)
        outputs.append(OutputDataset(namespace=q_ns, name=q_name,
                                     outputFacets=rows(result.rows_quarantined)))
    return inputs, outputs


def _run_facets(cfg: RunConfig, meta: RunMeta, result: RunResult | None,
                error: str | None) -> dict[str, Any]:
    from importlib.metadata import version

    from openlineage.client.facet_v2 import (
        RunFacet,
        error_message_run,
        nominal_time_run,
        processing_engine_run,
    )

    from pipeline.outputs import describe

    info, nominal = meta.info, meta.nominal_time
    facets: dict[str, RunFacet] = {
        EMBEDDING_FACET_KEY: _embedding_facet_class()(
            model=info.name if info else cfg.model.name_or_path, modelFingerprint=meta.model_fp,
            outputs=describe(cfg.outputs), embedRunId=meta.run_id,
            runtime=result.runtime if result else None,
            canary=result.canary_summary if result else None,
            drift=result.drift_summary if result else None,
            chunking=dataclasses.asdict(cfg.chunking) if cfg.chunking.enabled else None,
            passagesWritten=result.chunks_written if result and cfg.chunking.enabled
            else None, producer=producer()),
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=version("pyspark"), name="spark",
            openlineageAdapterVersion=package_version(), producer=producer()),
    }
    if nominal is not None:
        facets["nominalTime"] = nominal_time_run.NominalTimeRunFacet(
            nominalStartTime=nominal.isoformat(), producer=producer())
    if error:
        facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=error, programmingLanguage="python", producer=producer())
    return facets


def new_lineage_run_id() -> str:
    """A UUIDv7 (time-ordered), as OpenLineage recommends for run ids."""
    try:
        from openlineage.client.uuid import generate_new_uuid

        return str(generate_new_uuid())
    except ImportError:
        import uuid

        return str(uuid.uuid4())
