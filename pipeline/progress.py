"""A rich progress bar of the encode job's tasks: fed by Spark's status tracker on a
classic session, by the server's progress reports on a Spark Connect client."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@contextlib.contextmanager
def spark_task_progress(spark: SparkSession, label: str, job_group: str = "embed-encode",
                        poll: float = 0.5) -> Iterator[None]:
    """Show completed / total tasks of the running job group until the block exits."""
    from pipeline.session import Capabilities

    progress = _bar()
    task = progress.add_task(label, total=None)
    with progress:
        feed = (_tracker_feed(spark, progress, task, job_group, poll)
                if Capabilities.of(spark).classic else _connect_feed(spark, progress, task))
        with feed:
            yield
        current = progress.tasks[0]
        if current.total:
            progress.update(task, completed=current.total)


def _bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("tasks"), TimeElapsedColumn(),
                    transient=False)


@contextlib.contextmanager
def _connect_feed(spark: SparkSession, progress: Any, task: Any) -> Iterator[None]:
    """The Connect server's progress reports (tasks of each stage of each operation)."""
    seen: dict[tuple[str | None, int], tuple[int, int]] = {}

    def handler(stages: Any, inflight_tasks: int, operation_id: str | None,
                done: bool) -> None:
        for stage in stages or ():
            seen[(operation_id, stage.stage_id)] = (stage.num_completed_tasks, stage.num_tasks)
        total = sum(t for _, t in seen.values())
        if total:
            progress.update(task, completed=sum(c for c, _ in seen.values()), total=total)

    spark.registerProgressHandler(cast(Any, handler))
    try:
        yield
    finally:
        spark.removeProgressHandler(cast(Any, handler))


@contextlib.contextmanager
def _tracker_feed(spark: SparkSession, progress: Any, task: Any, job_group: str,
                  poll: float) -> Iterator[None]:
    """The status tracker's view of the job group, polled."""
    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()

    def poll_loop() -> None:
        while not stop.wait(poll):
            done = total = 0
            for job_id in tracker.getJobIdsForGroup(job_group):
                job = tracker.getJobInfo(job_id)
                for stage_id in job.stageIds if job else ():
                    stage = tracker.getStageInfo(stage_id)
                    if stage and stage.numTasks:
                        done += stage.numCompletedTasks
                        total += stage.numTasks
            if total:
                progress.update(task, completed=done, total=total)

    thread = threading.Thread(target=poll_loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
