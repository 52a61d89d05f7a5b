"""Where the tables of one output table live: one naming scheme for all of them.

Next to the output (``<parent>/<name>``) unless the config names a path:

    output          sink.path
    quarantine      sink.quarantine_path, else <sink.path>_quarantine
    runs            sink.runs_path, else <parent>/_embedding_runs
    drift           drift.path, else <parent>/_embedding_drift
    canary          drift.canary_path, else <parent>/_embedding_canary
    samples         <parent>/_embedding_samples/<output name> (one per output: their columns)
    projections     <parent>/_embedding_projections
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def is_remote(path: str) -> bool:
    """An object store or HDFS path (``s3://``, ``abfss://`` ...): not a local folder to
    look into (``file://`` and plain paths are local)."""
    return "://" in path and not path.startswith("file://")


def _parent(path: str) -> str:
    """The folder holding ``path`` (string arithmetic: ``s3://bucket/x`` keeps its //)."""
    head, _, _ = path.rstrip("/").rpartition("/")
    return head or "."


def _name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


@dataclass(frozen=True)
class TablePaths:
    output: str
    quarantine: str
    runs: str
    drift: str
    canary: str
    samples: str
    projections: str

    @classmethod
    def of(cls, cfg: RunConfig) -> TablePaths:
        return cls.beside(cfg.sink.path, quarantine=cfg.sink.quarantine_path,
                          runs=cfg.sink.runs_path, drift=cfg.drift.path,
                          canary=cfg.drift.canary_path)

    @classmethod
    def beside(cls, output: str, *, quarantine: str | None = None, runs: str | None = None,
               drift: str | None = None, canary: str | None = None) -> TablePaths:
        """The tables of ``output``: the paths given, the rest by the naming scheme."""
        parent = _parent(output)
        return cls(output=output,
                   quarantine=quarantine or output.rstrip("/") + "_quarantine",
                   runs=runs or f"{parent}/_embedding_runs",
                   drift=drift or f"{parent}/_embedding_drift",
                   canary=canary or f"{parent}/_embedding_canary",
                   samples=f"{parent}/_embedding_samples/{_name(output)}",
                   projections=f"{parent}/_embedding_projections")
