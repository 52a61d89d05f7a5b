"""A rich progress bar fed by Spark's status tracker (tasks of the encode job)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@contextlib.contextmanager
def spark_task_progress(spark: SparkSession, label: str, job_group: str = "embed-encode",
                        poll: float = 0.5) -> Iterator[None]:
    """Show completed / total tasks of the running job group until the block exits."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("tasks"), TimeElapsedColumn(),
                        transient=False)
    task = progress.add_task(label, total=None)

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

    with progress:
        thread = threading.Thread(target=poll_loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            current = progress.tasks[0]
            if current.total:
                progress.update(task, completed=current.total)
