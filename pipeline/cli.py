"""``embed``: the click command line. Thin: parse, call pipeline.run, print.

Exit codes: 0 ok (a partition already committed is a recorded skip, also 0);
1 other pipeline error; 2 bad config / usage; 3 source; 4 model; 5 output table
made by another model or spec; 6 row counts do not reconcile; 7 another run
committed to the table while this one was writing; 8 the canary says the model
changed (nothing written); 9 drift breach with ``on_breach: fail`` (rows
committed).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.backfill import PartitionPlan
    from pipeline.config import RunConfig, SparkConfig
    from pipeline.encoder.parity import ParityResult
    from pipeline.preflight import Preflight
    from pipeline.results import RunResult


def _fail(err: PipelineError) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code)


def print_summary(result: RunResult, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embed run {result.run_id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output table", result.output_path)
    table.add_row("rows read", f"{result.rows_read:,}")
    table.add_row("rows embedded", f"{result.rows_embedded:,}")
    table.add_row("rows quarantined", f"{result.rows_quarantined:,}"
                  + (f"  -> {result.quarantine_path}" if result.rows_quarantined else ""))
    table.add_row("rows skipped", f"{result.rows_skipped:,} (already embedded)")
    if result.rows_deleted:
        table.add_row("rows deleted", f"{result.rows_deleted:,} (gone from the source)")
    if result.chunks_written or result.chunks_deleted:
        table.add_row("passages", f"{result.chunks_written:,} written, {result.chunks_deleted:,} "
                      "replaced or deleted (rows are documents; the table has a row per "
                      "passage)")
    table.add_row("plan", f"{result.plan_path}: {result.plan_note}" if result.plan_note
                  else result.plan_path)
    table.add_row("columns", ", ".join(result.columns))
    table.add_row("model", f"{result.model} (sha256 {result.model_fingerprint[:12]})")
    table.add_row("runtime", result.runtime)
    if result.placement:
        table.add_row("placement", result.placement)
    if result.gpus:
        table.add_row("gpus", result.gpus)
    table.add_row("Delta version", str(result.output_version))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("texts/s", f"{result.texts_per_second:,.0f}")
    table.add_row("padding efficiency", f"{result.padding_efficiency:.3f}")
    table.add_row("canary", result.canary_summary)
    table.add_row("drift", result.drift_summary)
    if result.parity:
        table.add_row("parity", result.parity)
    for warning in result.warnings:
        table.add_row("warning", warning, style="yellow")
    Console(stderr=False).print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batch embedding pipeline: text tables -> Spark -> transformer -> Delta."""


config_option = click.option("--config", "config_path", required=True,
                             type=click.Path(dir_okay=False, path_type=Path),
                             help="YAML run config (see conf/).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key, e.g. --set model.max_length=128 "
                               "(repeatable; values parse as YAML).")


@main.command("run")
@config_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--partition", default=None,
              help="Only this value of source.partition_column, committed exactly once "
                   "(as one backfill partition); empty = the whole source.")
@click.option("--full-refresh", is_flag=True,
              help="Compare the whole source with the table, even where the source's "
                   "Change Data Feed could say what changed.")
def run_cmd(config_path: Path, overrides: tuple[str, ...], as_json: bool, progress: bool,
            partition: str | None, full_refresh: bool) -> None:
    """Embed the configured source table into its Delta output table."""
    from pipeline import backfill, catalog
    from pipeline.config import load_config
    from pipeline.errors import DriftBreach
    from pipeline.preflight import preflight
    from pipeline.run import run

    try:
        cfg, spark = catalog.located(load_config(config_path, overrides))
        reporter = None
        if progress and not as_json:
            from pipeline.progress import spark_task_progress

            reporter = spark_task_progress
        part = backfill.partition(cfg, preflight(cfg).fingerprint, partition) \
            if partition else None
        result = run(cfg, spark, progress=reporter, partition=part, full_refresh=full_refresh)
    except DriftBreach as breach:  # the rows are committed: show them, then exit 9
        if breach.result is not None:
            print_summary(breach.result, as_json)
        _fail(breach)
    except PipelineError as err:
        _fail(err)
    if result.status == "skipped" and not as_json:
        click.echo(f"nothing to do: {result.message} (run {result.run_id}, recorded as skipped)")
        return
    print_summary(result, as_json)


@main.command("backfill")
@config_option
@set_option
@click.option("--from", "start", default=None, help="First partition value (inclusive).")
@click.option("--to", "end", default=None, help="Last partition value (inclusive).")
@click.option("--dry-run", is_flag=True, help="Print the plan; embed nothing.")
@click.option("--parallelism", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Partitions run at once.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip partitions already committed (--no-resume starts a new backfill "
                   "id; unchanged rows are still skipped by content hash).")
def backfill_cmd(config_path: Path, overrides: tuple[str, ...], start: str | None,
                 end: str | None, dry_run: bool,
                 parallelism: int, resume: bool) -> None:
    """Embed source partitions in [--from, --to], each committed exactly once."""
    import uuid

    from rich.console import Console

    from pipeline import backfill, catalog
    from pipeline.config import load_config
    from pipeline.preflight import preflight
    from pipeline.spark import get_session

    console = Console()
    try:
        cfg, spark = catalog.located(load_config(config_path, overrides))
        checked = preflight(cfg)
        salt = "" if resume else uuid.uuid4().hex
        # a dry run reads the tables' logs with delta-rs where it can: no JVM to start
        plans = (backfill.plan_without_spark(cfg, checked.fingerprint, start, end, salt)
                 if dry_run else None)
        if plans is not None:
            _print_plan(console, cfg, plans)
            return
        spark = spark or get_session(cfg.spark, _stores(cfg.source.path, cfg.sink.path))
        plans = backfill.plan(spark, cfg, checked.fingerprint, start, end, salt)
        _print_plan(console, cfg, plans)
        if not dry_run:
            _run_partitions(console, spark, cfg, plans, parallelism)
    except PipelineError as err:
        _fail(err)


def _print_plan(console: Any, cfg: RunConfig, plans: list[PartitionPlan]) -> None:
    from rich.table import Table

    table = Table(title=f"backfill of {cfg.sink.path} by {cfg.source.partition_column}")
    for col in ("partition", "rows", "status"):
        table.add_column(col)
    for p in plans:
        table.add_row(p.value, f"{p.rows:,}", "committed (skip)" if p.committed else "to do")
    console.print(table)
    todo = sum(not p.committed for p in plans)
    console.print(f"{len(plans)} partitions, {todo} to do, {len(plans) - todo} already committed")


def _run_partitions(console: Any, spark: SparkSession, cfg: RunConfig,
                    plans: list[PartitionPlan], parallelism: int) -> None:
    """The pending partitions with a progress bar; a failure (drift breach included)
    stops the backfill with its exit code."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from pipeline import backfill

    todo = [p for p in plans if not p.committed]
    if not todo:
        return
    started = time.perf_counter()
    with Progress(TextColumn("[bold]backfill"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=console) as progress:
        bar = progress.add_task("", total=len(todo))

        def done(p: PartitionPlan, result: RunResult) -> None:
            note = (f"{p.value}: {result.rows_embedded:,} embedded, "
                    f"{result.rows_skipped:,} skipped" if result.status == "succeeded"
                    else f"{p.value}: already committed")
            progress.update(bar, advance=1, description=note)

        results = backfill.run_backfill(spark, cfg, plans, parallelism, on_done=done)
    embedded = sum(r.rows_embedded for r in results)
    console.print(f"backfill done: {len(todo)} partitions, {embedded:,} rows embedded in "
                  f"{time.perf_counter() - started:.1f} s")


# The session a table name is looked up in: the last --config given, else the default
# (SPARK_REMOTE, set by --remote too, else a local classic session).
_CATALOG_SPARK: list[SparkConfig] = []


def _set_remote(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        os.environ["SPARK_REMOTE"] = value


def _set_catalog_config(ctx: click.Context, param: click.Parameter,
                        value: Path | None) -> None:
    if value is not None:
        from pipeline.config import load_config

        _CATALOG_SPARK.append(load_config(value).spark)


def catalog_options(f: Any) -> Any:
    """--remote and --config: where a table given by name is looked up."""
    f = click.option("--remote", default=None, expose_value=False, callback=_set_remote,
                     help="A Spark Connect server (sc://host:port) to work through, whose "
                          "catalog names the table (default: SPARK_REMOTE).")(f)
    return click.option("--config", "catalog_config", default=None, expose_value=False,
                        type=click.Path(path_type=Path, exists=True, dir_okay=False),
                        callback=_set_catalog_config,
                        help="A run config whose spark section reaches the catalog that "
                             "names the table (spark.remote, or a metastore's confs).")(f)


@main.command("runs")
@click.option("--table", "table_path", required=True,
              help="Output table: a path, a URI or a catalog name.")
@catalog_options
@click.option("--runs-path", default=None, help="Runs table (default: next to the table).")
@click.option("--limit", type=int, default=20, show_default=True)
def runs_cmd(table_path: str, runs_path: str | None, limit: int) -> None:
    """List the latest runs that wrote an output table, with their lineage."""
    from rich.table import Table

    from pipeline import maintain
    from pipeline.config import SparkConfig
    from pipeline.spark import get_session
    from pipeline.tables import runs as runs_table
    from pipeline.tables.delta import is_delta_table
    from pipeline.tables.paths import TablePaths

    table_path = _location(table_path)
    path = TablePaths.beside(table_path, runs=_location(runs_path)).runs
    if not is_delta_table(path):
        click.echo(f"error: no runs table at {path}", err=True)
        sys.exit(3)
    # delta-rs reads both tables here, local or remote (no JVM start); Spark only where
    # it cannot
    runs = runs_table.latest(path, limit, output_path=table_path)
    layout = "no table yet"
    if is_delta_table(table_path):
        found = maintain.log_layout(table_path) or maintain.layout(
            get_session(SparkConfig(app_name="embed-runs"), _stores(table_path)), table_path)
        layout = found.summary()
    out = Table(title=f"runs of {table_path}", caption=f"table now: {layout} "
                      "(embed maintain --optimize compacts)")
    for col in ("run_id", "status", "started_at", "partition", "read", "embedded",
                "quarantined", "skipped", "version", "source", "plan", "model", "runtime",
                "code", "canary", "drift", "error / note"):
        out.add_column(col)
    r: Any
    for r in runs.itertuples():
        versions = json.loads(r.versions) if r.versions else {}
        source_ref = (f"v{int(r.source_version)}" if r.source_version == r.source_version
                      and r.source_version is not None
                      else (getattr(r, "source_files_hash", None) or "")[:12])
        canary = json.loads(r.canary) if getattr(r, "canary", None) else {}
        out.add_row(r.run_id, r.status, str(r.started_at), r.partition or "",
                    *(("" if v != v or v is None else f"{int(v):,}") for v in (
                        r.rows_read, r.rows_embedded, r.rows_quarantined, r.rows_skipped,
                        r.output_version)), source_ref, getattr(r, "plan_path", None) or "",
                    f"{r.model} {(r.model_fingerprint or '')[:12]}", r.runtime or "",
                    str(versions.get("embed-pipeline-git", "-"))[:12],
                    canary.get("verdict", ""), getattr(r, "drift_status", None) or "",
                    (r.error or getattr(r, "message", None) or "")[:80])
    _console().print(out)


@main.command("maintain")
@click.option("--table", "table_path", required=True,
              help="Output table: a path, a URI or a catalog name.")
@catalog_options
@click.option("--optimize", is_flag=True, help="Compact small files (Delta OPTIMIZE).")
@click.option("--vacuum", "vacuum_hours", type=click.FloatRange(min=0), default=None,
              metavar="HOURS", help="Delete files no version of the last HOURS needs "
                                    "(Delta VACUUM; at least the table's retention, 168).")
def maintain_cmd(table_path: str, optimize: bool, vacuum_hours: float | None) -> None:
    """Show an output table's files; compact them and delete unneeded old ones."""
    from pipeline import maintain
    from pipeline.config import SparkConfig
    from pipeline.spark import check_conditional_writes, get_session

    table_path = _location(table_path)
    try:
        spark = get_session(SparkConfig(app_name="embed-maintain"), _stores(table_path))
        check_conditional_writes(spark, table_path)
        maintain.check_table(spark, table_path)
        click.echo(f"{table_path}: {maintain.layout(spark, table_path).summary()}")
        if optimize:
            tag = maintain.maintenance_id()
            metrics = maintain.optimize(spark, table_path, tag)
            click.echo(f"optimized ({tag}): {metrics.get('numFilesRemoved', '?')} files "
                       f"compacted into {metrics.get('numFilesAdded', '?')}")
        if vacuum_hours is not None:
            maintain.vacuum(spark, table_path, vacuum_hours)
            click.echo(f"vacuumed: files older than {vacuum_hours:g} hours no version needs")
        if optimize or vacuum_hours is not None:
            click.echo(f"now: {maintain.layout(spark, table_path).summary()}")
    except PipelineError as err:
        _fail(err)


@main.command("drift")
@click.option("--table", "table_path", required=True,
              help="Output table: a path, a URI or a catalog name.")
@catalog_options
@click.option("--run", "run_id", default=None, help="Run id (default: the latest checked run).")
@click.option("--drift-path", default=None, help="Drift table (default: next to the table).")
@click.option("--out", default=None,
              help="HTML report, a local path or an object-store URI (default: "
                   "<table parent>/_drift_reports/<run>.html; for a table in an object "
                   "store, _drift_reports/<run>.html here).")
@click.option("--sample", type=int, default=2000, show_default=True,
              help="Rows per side to plot.")
@click.option("--fail-on-breach", is_flag=True, help="Exit 9 when the run's drift breached.")
def drift_cmd(table_path: str, run_id: str | None, drift_path: str | None, out: str | None,
              sample: int, fail_on_breach: bool) -> None:
    """Print a run's drift checks (canary + distribution) and write an HTML report."""
    from rich.table import Table

    from pipeline import drift
    from pipeline.errors import DriftBreach, SourceError
    from pipeline.report import write_report
    from pipeline.tables.delta import is_delta_table
    from pipeline.tables.paths import TablePaths

    table_path = _location(table_path)
    path = TablePaths.beside(table_path, drift=_location(drift_path)).drift
    if not is_delta_table(path):
        _fail(SourceError(f"no drift table at {path} (runs record it once they have embedded "
                          "rows; --drift-path names another)"))
    # delta-rs reads the drift, samples and identity of the table, local or remote; Spark
    # only for what it cannot (an older release's runs that stored no sample)
    rows, written = write_report(None, table_path, path, run_id, out, sample=sample)
    if written is None:
        _fail(SourceError(f"no drift results for {table_path}"
                          + (f" run {run_id}" if run_id else "")))
    run = rows["run_id"].iloc[0]
    status = rows["status"].iloc[0]
    table = Table(title=f"drift of run {run}: {status}")
    for col in ("column", "canary", "canary min cos", "centroid dist", "MMD p",
                "drifted share", "tokens (ref)", "truncated (ref)", "flags"):
        table.add_column(col)
    for r in rows.itertuples():
        table.add_row(r.column, r.canary_verdict or "-", _num(r.canary_min_cosine, ".6f"),
                      _num(r.centroid_distance, ".4f"), _num(r.mmd_p_value, ".3f"),
                      _num(r.drifted_share, ".3f"),
                      f"{_num(r.mean_tokens, '.1f')} ({_num(r.ref_mean_tokens, '.1f')})",
                      f"{_num(r.truncation_rate, '.3f')} ({_num(r.ref_truncation_rate, '.3f')})",
                      "; ".join(json.loads(r.flags or "[]")))
    _console().print(table)
    click.echo(f"report: {written}")
    if fail_on_breach and status == "breach":
        _fail(DriftBreach(f"run {run} drifted: {'; '.join(drift.stored_flags(rows))} "
                          f"(see {written})"))


def _location(given: str | None) -> Any:
    """A table argument in its one spelling: a local path (relative to here) or an
    object-store URI (``s3://`` is ``s3a://``), never resolved as a local path; or a
    catalog name (schema.table, no such folder here): its location, from the catalog
    of the session --remote or --config names (else SPARK_REMOTE, else a local one)."""
    from pipeline import catalog, storage

    if not given:
        return None
    if not catalog.is_name(given) or Path(given).exists():
        return storage.normalize(given)
    from pipeline.config import SparkConfig
    from pipeline.spark import get_session

    spark_cfg = _CATALOG_SPARK[-1] if _CATALOG_SPARK else SparkConfig(app_name="embed-catalog")
    try:
        return catalog.location_of(get_session(spark_cfg), given)
    except PipelineError as err:
        _fail(err)


def _resolved(config_path: Path, overrides: tuple[str, ...]) -> RunConfig:
    """The config, its catalog names (source.table, sink.table) resolved to locations."""
    from pipeline import catalog
    from pipeline.config import load_config

    return catalog.located(load_config(config_path, overrides))[0]


def _stores(*locations: str) -> set[str]:
    from pipeline import storage

    return storage.kinds(locations)


def _console() -> Any:
    """A rich console; off a terminal (logs, Airflow, pipes) wide enough not to cut cells."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


@main.group("cluster")
def cluster_group() -> None:
    """A standalone Spark cluster on 127.0.0.1 (master + workers) to try jobs on."""


def _state_dir_option(default: str, what: str) -> Any:
    return click.option("--state-dir", type=click.Path(path_type=Path), default=Path(default),
                        show_default=True, help=what)


state_option = _state_dir_option(".spark-cluster", "Where pid files and logs go.")


@cluster_group.command("start")
@state_option
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--cores", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Cores per worker.")
@click.option("--memory", default="2g", show_default=True, help="Memory per worker.")
@click.option("--gpus", type=click.IntRange(0, 64), default=0, show_default=True,
              help="GPUs each worker advertises (addresses 0..N-1, real or not): tries "
                   "Spark's GPU scheduling on any machine.")
@click.option("--port", type=click.IntRange(1, 65535), default=7077, show_default=True,
              help="The master's port.")
@click.option("--webui-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--isolated", is_flag=True,
              help="Each worker gets its own HOME, temp and scratch folders (nodes that "
                   "share no disk): models from an object store are copied per worker.")
def cluster_start(state_dir: Path, workers: int, cores: int, memory: str, gpus: int,
                  port: int, webui_port: int, isolated: bool) -> None:
    """Start a master and N workers; prints the master URL for spark-submit --master."""
    from pipeline.cluster import Cluster

    _echo_started(lambda: Cluster(state_dir.resolve(), port=port, webui_port=webui_port).start(
        workers, cores, memory, gpus=gpus, isolated=isolated).master_url)


def _echo_started(start: Callable[[], str]) -> None:
    """Start a local service; print its URL, or its error in one line (exit 1)."""
    try:
        url = start()
    except RuntimeError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    click.echo(url)


def _echo_stopped(pids: list[int]) -> None:
    click.echo(f"stopped {len(pids)} processes" if pids else "nothing to stop")


@cluster_group.command("stop")
@state_option
def cluster_stop(state_dir: Path) -> None:
    """Stop the master and workers started from this state dir, by their pids."""
    from pipeline.cluster import Cluster

    _echo_stopped(Cluster(state_dir.resolve()).stop())


@main.group("connect-server")
def connect_group() -> None:
    """A Spark Connect server on 127.0.0.1 (Delta, a Hive metastore) to run jobs as its
    client: spark.remote: sc://127.0.0.1:PORT in a config, or SPARK_REMOTE."""


connect_state = _state_dir_option(".spark-connect",
                                  "Where its pid file, log, metastore and warehouse go.")


@connect_group.command("start")
@connect_state
@click.option("--port", type=click.IntRange(1, 65535), default=15002, show_default=True)
@click.option("--master", default="local[*]", show_default=True,
              help="Where the server runs its jobs (e.g. spark://127.0.0.1:7077).")
def connect_start(state_dir: Path, port: int, master: str) -> None:
    """Start the server; prints its URL (sc://127.0.0.1:PORT)."""
    from pipeline.cluster import ConnectServer

    _echo_started(lambda: ConnectServer(state_dir.resolve(), port=port, master=master)
                  .start().url)


@connect_group.command("stop")
@connect_state
def connect_stop(state_dir: Path) -> None:
    """Stop the server started from this state dir, by its pid."""
    from pipeline.cluster import ConnectServer

    _echo_stopped(ConnectServer(state_dir.resolve()).stop())


@main.command("demo-data")
@click.option("--out", required=True,
              help="Where to write the Delta source table: a local path or an object-store "
                   "URI (s3://bucket/docstrings).")
@click.option("--limit", type=int, default=None, help="Only the first N docstrings.")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Repeat the corpus N times (new ids) for larger runs.")
@click.option("--change-feed/--no-change-feed", default=True, show_default=True,
              help="Delta Change Data Feed on: re-runs read only the changes.")
@click.option("--table", "name", default=None,
              help="Also name it in the catalog (schema.table, the schema made if absent): "
                   "through the Spark Connect server SPARK_REMOTE names, else a local "
                   "session.")
def demo_data_cmd(out: str, limit: int | None, repeat: int, change_feed: bool,
                  name: str | None) -> None:
    """Write the demo source: the Python standard library's docstrings, as Delta
    (by delta-rs: no JVM start)."""
    from pipeline import storage
    from pipeline.demo import write_demo_delta

    where = storage.normalize(out)
    n = write_demo_delta(where, limit=limit, repeat=repeat, change_feed=change_feed)
    click.echo(f"wrote {n:,} docstrings to {where}")
    if name:
        from pipeline import catalog
        from pipeline.config import SparkConfig
        from pipeline.spark import get_session

        try:
            catalog.register(get_session(SparkConfig(app_name="embed-demo-data"),
                                         _stores(where)), name, where)
        except PipelineError as err:
            _fail(err)
        click.echo(f"named it {name}")


@main.command("demo-sparse-model")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Where to write the SparseEncoder directory.")
def demo_sparse_model_cmd(out: Path) -> None:
    """Write the sparse demo's SparseEncoder: all-MiniLM-L6-v2's backbone under a masked-LM
    head seeded at random (a real SPLADE's compute and layout, not its quality)."""
    from pipeline.demo import sparse_demo_model

    click.echo(f"wrote a SparseEncoder to {sparse_demo_model(out.resolve())}")


@main.command("setup-spark")
@click.option("--storage", "storages", multiple=True, type=click.Choice(["s3", "azure", "gcs"]),
              help="Also put this object store's connector on every spark-submit's "
                   "classpath (resolved from Maven Central once; repeatable; kept by later "
                   "setup-spark runs).")
def setup_spark_cmd(storages: tuple[str, ...]) -> None:
    """Write spark-defaults.conf (Delta jars, this Python) into the installed pyspark."""
    from pipeline.spark import set_up_storages, write_spark_defaults

    try:
        written = write_spark_defaults(storages=storages)
    except PipelineError as err:
        _fail(err)
    kinds = set_up_storages()
    click.echo(f"wrote {written}" + (f" (connectors: {', '.join(kinds)})" if kinds else ""))


@main.command("sizes")
@config_option
@set_option
@click.option("--rows", type=int, default=1_000_000, show_default=True,
              help="Rows to size the whole table for.")
def sizes_cmd(config_path: Path, overrides: tuple[str, ...], rows: int) -> None:
    """Bytes per row of each output column, against float32 at the model's full dim."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.preflight import preflight
    from pipeline.sizes import column_sizes

    try:
        sizes = column_sizes(preflight(_resolved(config_path, overrides)))
    except PipelineError as err:
        _fail(err)
    full = sizes.full_bytes
    table = Table(title=f"{sizes.model}: hidden {sizes.hidden}, {sizes.layers} layers, "
                        f"output {sizes.full_dim}; {rows:,} rows")
    for col in ("column", "dim", "layer", "reduce", "dtype", "bytes/row", "vs float32 full",
                "table"):
        table.add_column(col, justify="left" if col in ("column", "reduce", "dtype")
                         else "right")
    for c in sizes.columns:
        dim = f"~{c.dim:,.1f} active" if c.sparse else str(c.dim)
        table.add_row(c.name, dim, str(c.layer), c.reduce, c.dtype + " sparse" * c.sparse,
                      f"{c.bytes_per_row:,}", f"{c.bytes_per_row / full:.1%}",
                      _human(c.bytes_per_row * rows))
    total = sizes.total_bytes
    table.add_row("all columns", "", "", "", "", f"{total:,}", f"{total / full:.1%}",
                  _human(total * rows), style="bold")
    table.add_row(f"float32 x {sizes.full_dim}", "", "", "", "", f"{full:,}", "100.0%",
                  _human(full * rows), style="dim")
    if any(c.sparse for c in sizes.columns):  # the same backbone's dense vector, stored
        for dtype, width in (("int8", sizes.full_dim), ("binary", sizes.full_dim // 8)):
            table.add_row(f"{dtype} x {sizes.full_dim} (dense)", "", "", "", "", f"{width:,}",
                          f"{width / full:.1%}", _human(width * rows), style="dim")
    Console().print(table)
    if any(c.sparse for c in sizes.columns):
        click.echo("sparse columns: active dimensions measured on the 32 canary texts of the "
                   "parity check (a row stores each as an int32 id and its weight).")
    click.echo("reduce: truncate keeps the first dim components (Matryoshka-trained models); "
               "pca projects onto dim axes fitted once per table, which keeps more quality "
               "at small dims for models not trained for truncation (docs/outputs.md: Truncate or "
               "project).")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


@main.command("search")
@click.option("--table", "table_path", required=True,
              help="Output table: a path, a URI or a catalog name.")
@catalog_options
@click.option("--column", required=True, help="Embedding column to search.")
@click.option("--k", type=int, default=10, show_default=True, help="Hits to return.")
@click.option("--prompt", default=None,
              help="Query prompt (default: the model's own query prompt, as "
                   "sentence-transformers' encode_query applies it).")
@click.option("--prompt-name", default=None,
              help="One of the model's named prompts for the query (e.g. query).")
@click.option("--model", "model_path", default=None,
              help="Model directory (default: where the table's model was; its fingerprint "
                   "must match).")
@click.option("--reader", type=click.Choice(["auto", "delta-rs", "spark"]), default="auto",
              show_default=True, help="auto: delta-rs up to 4 GiB of data files, else Spark.")
@click.option("--rescore-factor", type=click.IntRange(min=1), default=4, show_default=True,
              help="Binary columns: rescore the best k x this by a float column.")
@click.option("--hybrid", "hybrid", default=None, metavar="TABLE:COLUMN",
              help="Also rank another table (a path, a URI or a catalog name) of the same "
                   "ids (e.g. a dense one) and fuse the two rankings by reciprocal rank "
                   "fusion (k = 60).")
@click.option("--explain", is_flag=True,
              help="Sparse columns: print the query's top tokens and each hit's matching "
                   "tokens with their weights.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit.")
@click.argument("query")
def search_cmd(table_path: str, column: str, k: int, prompt: str | None,
               prompt_name: str | None, model_path: str | None, reader: str,
               rescore_factor: int, hybrid: str | None, explain: bool, as_json: bool,
               query: str) -> None:
    """Exact top-k rows of a table's column for QUERY, encoded as the rows were."""
    from rich.table import Table

    from pipeline.search import SearchOptions, search

    options = SearchOptions(k=k, prompt=prompt, prompt_name=prompt_name, model=model_path,
                            reader=reader, rescore_factor=rescore_factor,
                            snippets=not as_json)
    table_path = _location(table_path)
    if hybrid:
        _hybrid_cmd(table_path, column, _target_located(hybrid), query, options, as_json)
        return
    try:
        result = search(table_path, column, query, options)
        why = _explained(table_path, column, query, result.hits, options) if explain else None
    except PipelineError as err:
        _fail(err)
    if as_json:
        for hit in result.hits:
            click.echo(json.dumps(hit.to_dict(), default=str))
        return
    how = "Hamming, rescored by cosine on " + result.rescored_with if result.rescored_with \
        else result.scored_by
    out = Table(title=f"{query!r} in {column}",
                caption=f"{how}, top {k} of {result.rows:,} rows, read with {result.reader} "
                        f"in {result.seconds:.1f} s" + "".join(f"; {n}" for n in result.notes))
    for col in ("#", "id", "score", "text"):
        out.add_column(col, justify="right" if col in ("#", "score") else "left")
    for rank, hit in enumerate(result.hits, 1):
        ident = str(hit.id) + (f" #{hit.chunk_index}" if hit.chunk_index is not None else "")
        out.add_row(str(rank), ident, f"{hit.score:.4f}", hit.snippet or "")
    _console().print(out)
    if why is not None:
        _console().print(why)


def _explained(table: str, column: str, query: str, hits: list, options: Any) -> Any:
    """``--explain``: the query's top tokens and each hit's matching ones, as a rich table."""
    from rich.table import Table

    from pipeline.hybrid import explain

    found = explain(table, column, query, hits, options)
    out = Table(title="query tokens: " + ", ".join(f"{t} {w:.3f}" for t, w in found.query_tokens))
    for col in ("#", "id", "matching tokens (query x row weight)"):
        out.add_column(col)
    for rank, hit in enumerate(hits, 1):
        shared = found.matches.get((hit.id, hit.chunk_index), [])
        out.add_row(str(rank), str(hit.id), ", ".join(f"{t} {c:.3f}" for t, c in shared))
    return out


def _target_located(target: str) -> str:
    """``--hybrid``'s TABLE:COLUMN with its table as a location (a name looked up)."""
    from pipeline.hybrid import parse_target

    try:
        table, column = parse_target(target)
    except PipelineError as err:
        _fail(err)
    return f"{_location(table)}:{column}"


def _hybrid_cmd(table: str, column: str, other: str, query: str, options: Any,
                as_json: bool) -> None:
    """``--hybrid``: both rankings fused by reciprocal rank fusion, with each hit's ranks."""
    from rich.table import Table

    from pipeline.hybrid import RRF_K, hybrid_search, parse_target

    try:
        fused, first, second = hybrid_search(table, column, other, query, options)
    except PipelineError as err:
        _fail(err)
    if as_json:
        for hit in fused:
            click.echo(json.dumps(hit.to_dict(), default=str))
        return
    other_column = parse_target(other)[1]
    out = Table(title=f"{query!r}: {column} + {other_column}",
                caption=f"reciprocal rank fusion (k = {RRF_K}) of the top {len(first.hits)} "
                        f"of {first.rows:,} rows ({first.scored_by}) and the top "
                        f"{len(second.hits)} of {second.rows:,} ({second.scored_by})")
    for col in ("#", "id", "rrf", f"rank {column}", f"rank {other_column}", "text"):
        out.add_column(col, justify="left" if col in ("id", "text") else "right")
    for rank, hit in enumerate(fused, 1):
        ident = str(hit.id) + (f" #{hit.chunk_index}" if hit.chunk_index is not None else "")
        a, b = (str(r) if r is not None else "-" for r in hit.ranks)
        out.add_row(str(rank), ident, f"{hit.score:.5f}", a, b, hit.snippet or "")
    _console().print(out)


@main.command("validate")
@config_option
@set_option
@click.option("--parity", is_flag=True,
              help="Also encode 32 canary texts through the engine and through "
                   "sentence-transformers itself, here (no Spark, no table), and compare.")
def validate_cmd(config_path: Path, overrides: tuple[str, ...], parity: bool) -> None:
    """Check a config (keys, model, output dims, source path) without starting Spark (a
    config that names catalog tables asks the catalog for their locations), and print
    the model stack as the engine will run it."""
    from pipeline.preflight import preflight

    try:
        checked = preflight(_resolved(config_path, overrides))
        result = _local_parity(checked) if parity else None
    except PipelineError as err:
        _fail(err)
    cfg, info = checked.cfg, checked.info
    c = cfg.chunking
    passages = (f", passages: {c.mode} {c.max_tokens} tokens / {c.overlap_tokens} overlap"
                if c.enabled else "")
    for line in checked.stack_lines():
        click.echo(f"  {line}")
    if result is not None:
        click.echo(f"  parity: {result.summary()}")
    click.echo(f"ok: {config_path} ({info.model_type}, hidden {info.hidden_size}, "
               f"{len(cfg.outputs)} output columns{passages})")


def _local_parity(checked: Preflight) -> ParityResult:
    """``embed validate --parity``: the parity check in this process, on the CPU."""
    import dataclasses

    from pipeline.drift import canary_texts
    from pipeline.encoder import parity

    model = dataclasses.replace(checked.cfg.model, device="cpu")
    texts = parity.canary_slice(canary_texts(checked.cfg.drift.canary.texts))
    result = parity.check_model(model, texts)
    parity.enforce(result, checked.info.name)
    return result


if __name__ == "__main__":
    main()
