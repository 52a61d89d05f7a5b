"""``reduce: pca`` columns: the projection (outputs.Projection), fitted once on the
first run's sample, stored in a side table by digest, reused by every later run
and by `embed search`; never silently replaced."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import projections
from pipeline.config import load_config
from pipeline.encoder.cuts import Projection
from pipeline.errors import PipelineError
from pipeline.run import run
from tests.conftest import write_config

OUTPUTS = ("[{name: emb_384, dim: 384}, {name: emb_32, dim: 32, reduce: pca}, "
           "{name: emb_32c, dim: 32, reduce: pca, center: true}, "
           "{name: emb_48q, dim: 48, reduce: pca, dtype: int8}]")


def test_projection_is_the_top_axes_of_the_second_moment():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) * np.r_[5.0, np.linspace(1, 0.1, 15)]  # axis 0 widest
    p = Projection.fit(x, 4)
    assert p.dims == (16, 4)
    assert np.allclose(p.matrix.T @ p.matrix, np.eye(4), atol=1e-5)
    assert abs(p.matrix[0, 0]) > 0.99  # the widest direction first
    again = Projection.fit(x, 4)
    assert again.digest == p.digest  # same sample, same matrix, same signs
    centred = Projection.fit(x + 5, 4, center=True)
    assert centred.mean is not None and centred.digest != Projection.fit(x + 5, 4).digest
    with pytest.raises(ValueError, match="at least 20 sample rows"):
        Projection.fit(x[:10], 20)


def _append(spark, path: str, rows: list[dict], mode: str = "append") -> None:
    spark.createDataFrame(pd.DataFrame(rows)[["id", "text"]], "id long, text string") \
        .coalesce(1).write.format("delta").mode(mode).save(path)


@pytest.fixture(scope="module")
def pca_table(spark, tmp_path_factory, demo_rows):
    tmp = tmp_path_factory.mktemp("pca")
    source = str(tmp / "src")
    _append(spark, source, demo_rows[:250], mode="overwrite")
    cfg_path = write_config(tmp, source, str(tmp / "out"), outputs=OUTPUTS,
                            extra="sink: {path: '%s', calibration: {size: 200}}\n"
                            % (tmp / "out"))
    first = run(load_config(cfg_path), spark=spark)
    return {"tmp": tmp, "source": source, "cfg_path": cfg_path, "first": first}


def _identity(spark, path: str) -> dict:
    from pipeline.tables.identity import TableIdentity

    return TableIdentity.read(spark, path) or TableIdentity()


def _rows(spark, path: str) -> pd.DataFrame:
    return spark.read.format("delta").load(path).toPandas().sort_values("id").reset_index(
        drop=True)


def test_first_run_fits_and_stores_one_projection_per_pca_column(spark, pca_table):
    path = load_config(pca_table["cfg_path"]).sink.path
    digests = json.loads(_identity(spark, path)["projections"])
    assert sorted(digests) == ["emb_32", "emb_32c", "emb_48q"]
    fitted = projections.load(path, digests)
    assert fitted["emb_32"].dims == (384, 32) and fitted["emb_32"].mean is None
    assert fitted["emb_32c"].mean is not None
    table = _rows(spark, path)
    vecs = np.stack(table["emb_32"]).astype(np.float32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    # the column is the projection of the row's normalized full vector, renormalized
    full = np.stack(table["emb_384"]).astype(np.float32)
    want = fitted["emb_32"].apply(full)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert (vecs * want).sum(axis=1).min() >= 0.9999
    assert len(table["emb_48q"][0]) == 48 and "calibration" in _identity(spark, path)


def test_same_source_and_config_give_the_same_projection_and_bytes(spark, pca_table,
                                                                   demo_rows):
    """A second table from the same rows and config: the seeded sample, hence the fit,
    hence every byte, is the same."""
    tmp = pca_table["tmp"]
    first = load_config(pca_table["cfg_path"]).sink.path
    _append(spark, str(tmp / "src_copy"), demo_rows[:250], mode="overwrite")
    twin = load_config(pca_table["cfg_path"], [f"sink.path={tmp / 'twin'}",
                                               f"source.path={tmp / 'src_copy'}"])
    run(twin, spark=spark)
    assert _identity(spark, twin.sink.path)["projections"] == _identity(
        spark, first)["projections"]
    left, right = _rows(spark, first), _rows(spark, twin.sink.path)
    for column in ("emb_32", "emb_32c", "emb_48q"):
        assert [list(v) for v in right[column]] == [list(v) for v in left[column]], column


def test_later_runs_reuse_the_projection(
        spark, pca_table, demo_rows):
    cfg = load_config(pca_table["cfg_path"])
    before = _identity(spark, cfg.sink.path)["projections"]
    original = _rows(spark, cfg.sink.path).set_index("id")
    changed = dict(demo_rows[3], text="a text that is not the docstring")
    # change a row, then change it back: the re-embedded original text is bit-identical
    _append(spark, pca_table["source"], [r if r["id"] != 3 else changed
                                         for r in demo_rows[:250]], mode="overwrite")
    assert run(cfg, spark=spark).rows_embedded == 1
    _append(spark, pca_table["source"], demo_rows[:260], mode="overwrite")
    again = run(cfg, spark=spark)
    assert again.rows_embedded == 11 and again.calibration == "table"
    assert _identity(spark, cfg.sink.path)["projections"] == before
    now = _rows(spark, cfg.sink.path).set_index("id")
    # re-embedded in another batch: float rounding of other batch shapes only (the
    # bit-for-bit check is below), through the same stored projection
    for column in ("emb_32", "emb_32c"):
        a, b = (np.asarray(t.loc[3, column], np.float32) for t in (now, original))
        assert float(a @ b) >= 0.99999, column
    levels = np.asarray(now.loc[3, "emb_48q"], np.int16) - np.asarray(
        original.loc[3, "emb_48q"], np.int16)
    assert np.abs(levels).max() <= 1


def test_search_projects_the_query_with_the_tables_projection(spark, pca_table):
    from pipeline.search import SearchOptions, encode_query, open_table, query_encoder, search

    path = load_config(pca_table["cfg_path"]).sink.path
    info = open_table(path)
    query = encode_query(query_encoder(info, [info.specs["emb_32"]], None, None),
                         "parse command line arguments", info)["emb_32"]
    table = _rows(spark, path)
    vecs = np.stack(table["emb_32"]).astype(np.float32)
    want = table["id"].to_numpy()[np.argsort(-(vecs @ query))[:5]].tolist()
    assert [h.id for h in search(path, "emb_32", "parse command line arguments",
                                        SearchOptions(k=5)).hits] == want


def test_a_missing_projection_fails_and_overwrite_refits(spark, pca_table, demo_rows):
    import shutil

    cfg = load_config(pca_table["cfg_path"])
    side = projections.table_path(cfg.sink.path)
    backup = str(pca_table["tmp"] / "projections_backup")
    shutil.copytree(side, backup)
    before = _identity(spark, cfg.sink.path)["projections"]
    try:
        shutil.rmtree(side)
        _append(spark, pca_table["source"], demo_rows[:270], mode="overwrite")
        with pytest.raises(PipelineError, match="is not in .*_embedding_projections"):
            run(cfg, spark=spark)
    finally:
        shutil.rmtree(side, ignore_errors=True)
        shutil.copytree(backup, side)
    _append(spark, pca_table["source"], demo_rows[100:400], mode="overwrite")
    refit = run(load_config(pca_table["cfg_path"], ["sink.mode=overwrite"]), spark=spark)
    assert refit.calibration == "fit"
    after = _identity(spark, cfg.sink.path)["projections"]
    assert after != before  # another sample, another projection, named by the identity
    assert projections.load(cfg.sink.path, json.loads(after))
