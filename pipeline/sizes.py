"""``embed sizes``: bytes per row of each output column, against float32 at the model's
full output width (after its Dense head). Pure: the preflight's resolved config and
model info in, rows out; the CLI prints them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.encoder.codec import row_bytes
from pipeline.encoder.engine import resolve_layer
from pipeline.preflight import Preflight


@dataclass(frozen=True)
class ColumnSize:
    name: str
    dim: int
    layer: int
    reduce: str
    dtype: str
    bytes_per_row: int


@dataclass(frozen=True)
class Sizes:
    model: str
    hidden: int
    layers: int
    full_dim: int  # the model's output width (after its Dense head)
    columns: tuple[ColumnSize, ...]

    @property
    def full_bytes(self) -> int:
        return 4 * self.full_dim

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes_per_row for c in self.columns)


def column_sizes(checked: Preflight) -> Sizes:
    info, cfg = checked.info, checked.cfg
    columns = tuple(ColumnSize(name=s.name, dim=s.dim,
                               layer=resolve_layer(s.layer, info.num_layers), reduce=s.reduce,
                               dtype=s.dtype, bytes_per_row=row_bytes(s)) for s in cfg.outputs)
    return Sizes(model=info.name, hidden=info.hidden_size, layers=info.num_layers,
                 full_dim=info.output_dim(cfg.model.pooling), columns=columns)
