"""Where the tables of one output table live: one naming scheme for all of them.

Next to the output (``<parent>/<name>``, a local folder or an object-store prefix alike:
pipeline.storage joins them) unless the config names a path:

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

from pipeline import storage

if TYPE_CHECKING:
    from pipeline.config import RunConfig


@dataclass(frozen=True)
class TablePaths:
    output: str
    quarantine: str
    runs: str
    drift: str
    canary: str
    samples: str
    projections: str

    def all(self) -> tuple[str, ...]:
        return (self.output, self.quarantine, self.runs, self.drift, self.canary,
                self.samples, self.projections)

    @classmethod
    def of(cls, cfg: RunConfig) -> TablePaths:
        return cls.beside(cfg.sink.path, quarantine=cfg.sink.quarantine_path,
                          runs=cfg.sink.runs_path, drift=cfg.drift.path,
                          canary=cfg.drift.canary_path)

    @classmethod
    def beside(cls, output: str, *, quarantine: str | None = None, runs: str | None = None,
               drift: str | None = None, canary: str | None = None) -> TablePaths:
        """The tables of ``output``: the paths given, the rest by the naming scheme."""
        parent = storage.parent(output)
        return cls(output=output,
                   quarantine=quarantine or output.rstrip("/") + "_quarantine",
                   runs=runs or storage.join(parent, "_embedding_runs"),
                   drift=drift or storage.join(parent, "_embedding_drift"),
                   canary=canary or storage.join(parent, "_embedding_canary"),
                   samples=storage.join(parent, "_embedding_samples", storage.name(output)),
                   projections=storage.join(parent, "_embedding_projections"))
