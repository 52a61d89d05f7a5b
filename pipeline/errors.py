"""One small hierarchy of errors. Each message is one line that names the problem.

Entry points (CLI, spark-submit job, Airflow) print ``str(err)`` and exit with
``err.exit_code``; no Spark or Python stack trace is shown for these.
"""

from __future__ import annotations

import re
from typing import Any


class PipelineError(Exception):
    """Base class: an error the user can act on, with a one-line message."""

    exit_code = 1


class ConfigError(PipelineError):
    """Bad configuration. ``key`` is the dotted config key at fault."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


class StorageError(PipelineError):
    """An object store cannot be used as configured: its connector is missing and cannot
    be resolved, or it ignores conditional writes (commits could be lost)."""

    exit_code = 2


class SourceError(PipelineError):
    """The source table is missing, unreadable or lacks a configured column."""

    exit_code = 3


class ModelError(PipelineError):
    """The model directory is missing, unreadable or unsafe to load."""

    exit_code = 4


class SinkConflictError(PipelineError):
    """The output table was made with another model or other output specs."""

    exit_code = 5


class ReconciliationError(PipelineError):
    """Rows read != rows embedded + quarantined + skipped."""

    exit_code = 6


class ConcurrentRunError(PipelineError):
    """Another run committed to the output table while this one was writing."""

    exit_code = 7


class AlreadyCommitted(PipelineError):
    """The backfill partition a run was writing was committed by another run meanwhile
    (Delta skipped this run's write for its txn id). ``run()`` records it as a skip."""

    exit_code = 0


class CanaryError(PipelineError):
    """The canary texts embed differently from the table's stored canary: the model
    or its weights changed. Raised before anything is written."""

    exit_code = 8


class DriftBreach(PipelineError):
    """Distribution drift over the configured thresholds with on_breach: fail.
    The run's rows are committed (drift is measured on what landed); ``result`` is
    the run's result, for entry points that print it."""

    exit_code = 9

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


# Exit codes a retry cannot mend (the same config, table and model fail the same way);
# the DAG fails such a task at once. 1 (anything else) and 7 (another run committed
# first: re-run) may pass on a retry.
NON_TRANSIENT_EXITS = {ConfigError.exit_code: "config error",
                       SourceError.exit_code: "source error",
                       ModelError.exit_code: "model error",
                       SinkConflictError.exit_code: "the output table was made otherwise",
                       ReconciliationError.exit_code: "counts do not reconcile",
                       CanaryError.exit_code: "the canary says the model changed",
                       DriftBreach.exit_code: "drift breach"}

_WORKER_ERROR = re.compile(r"pipeline\.errors\.(\w+): (.+)")
_CONFIG_MESSAGE = re.compile(r"config error at '([^']+)': (.+)")


def raised_on_worker(exc: BaseException) -> PipelineError | None:
    """The PipelineError a Spark task raised on an executor (Spark hands the driver a
    PythonException, or a Py4J error, holding the worker's traceback as text), rebuilt
    so that entry points print its one line and exit with its code; None otherwise.
    Example: ``device: cuda`` on workers without CUDA."""
    found = _WORKER_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    kind = globals().get(name)
    if not (isinstance(kind, type) and issubclass(kind, PipelineError)):
        return None
    if kind is ConfigError:
        parts = _CONFIG_MESSAGE.match(message.strip())
        key, text = parts.groups() if parts else ("?", message)
        return ConfigError(key, f"{text.strip()} (raised on an executor)")
    if kind is DriftBreach:
        return None
    return kind(f"{message.strip()} (raised on an executor)")
