"""``embed sizes``: bytes per row of each output column, against float32 at the model's
full output width (after its Dense head). Dense columns: pure, the preflight's resolved
config and model info in, rows out. Sparse columns store as many (id, weight) pairs as
a row has active dimensions, which only encoding tells: they are measured on the 32
canary texts the parity check uses (the engine, on this machine's CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.encoder.codec import row_bytes
from pipeline.encoder.engine import resolve_layer
from pipeline.preflight import Preflight


@dataclass(frozen=True)
class ColumnSize:
    name: str
    dim: float  # sparse: the mean active dimensions measured
    layer: int
    reduce: str
    dtype: str
    bytes_per_row: int
    sparse: bool = False


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
    active = _measured_active(checked)
    columns = tuple(
        ColumnSize(name=s.name, dim=active[s.name], layer=info.num_layers, reduce="-",
                   dtype=s.dtype, sparse=True,
                   bytes_per_row=round(active[s.name] * (4 + (2 if s.dtype == "float16" else 4))))
        if s.kind == "sparse" else
        ColumnSize(name=s.name, dim=s.dim, layer=resolve_layer(s.layer, info.num_layers),
                   reduce=s.reduce, dtype=s.dtype, bytes_per_row=row_bytes(s))
        for s in cfg.outputs)
    return Sizes(model=info.name, hidden=info.hidden_size, layers=info.num_layers,
                 full_dim=info.output_dim(cfg.model.pooling), columns=columns)


def _measured_active(checked: Preflight) -> dict[str, float]:
    """Mean active dimensions of each sparse column on the parity check's canary slice."""
    import dataclasses

    from pipeline.drift import canary_texts
    from pipeline.encoder import Encoder, parity
    from pipeline.encoder.splade import from_arrow

    cfg = checked.cfg
    sparse = [s for s in cfg.outputs if s.kind == "sparse"]
    if not sparse:
        return {}
    texts = parity.canary_slice(canary_texts(cfg.drift.canary.texts))
    encoder = Encoder(dataclasses.replace(cfg.model, device="cpu"), sparse)
    columns = encoder.encode(texts).columns
    return {s.name: float(from_arrow(columns[s.name], s.dtype, 0).active().mean())
            for s in sparse}
