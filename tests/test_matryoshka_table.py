"""Compressed and per-layer columns through real Spark + Delta: natural Spark types,
calibration stored once with the table and reused by later runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline.config import load_config
from pipeline.run import run
from tests.conftest import write_config

OUTPUTS = ("[{name: f, dim: 384}, {name: q, dim: 256, dtype: int8},"
           " {name: u, dim: 64, dtype: uint8}, {name: b, dim: 128, dtype: ubinary},"
           " {name: h, dim: 32, dtype: float16}, {name: shallow, dim: 64, layer: 2}]")


def test_types_calibration_and_reuse(spark, tmp_path, demo_rows):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    first_rows = pd.DataFrame(demo_rows[:60])[["id", "text"]]
    spark.createDataFrame(first_rows).write.format("delta").save(src)
    cfg = load_config(write_config(tmp_path, src, out, outputs=OUTPUTS),
                      ["sink.calibration.size=40", "sink.calibration.seed=7"])
    first = run(cfg, spark=spark)
    assert first.rows_embedded == 60

    df = spark.read.format("delta").load(out)
    types = dict(df.dtypes)
    assert (types["f"], types["q"], types["u"], types["b"], types["h"], types["shallow"]) == (
        "array<float>", "array<tinyint>", "binary", "binary", "binary", "array<float>")
    row = df.filter("id = 3").collect()[0]
    assert (len(row.f), len(row.q), len(row.u), len(row.b), len(row.h)) == (384, 256, 64, 16, 64)

    from delta.tables import DeltaTable

    props = DeltaTable.forPath(spark, out).detail().collect()[0]["properties"]
    stored = json.loads(props["embed.calibration"])
    assert set(stored) == {"q", "u"} and len(stored["q"]["min"]) == 256

    # Second run: new rows, one repeating an old text under a new id. The stored
    # ranges are reused (not refitted on the new data), so the same text gets the
    # same codes. Not bit for bit: the text sits in another batch (other padding,
    # other BLAS summation order), floats move by ~1e-7, and a value right on a
    # bucket edge may land one level over; refitting would move every code.
    second_rows = pd.DataFrame({"id": [1000, 1001], "text": [demo_rows[3]["text"],
                                                            "An entirely new text " * 40]})
    spark.createDataFrame(pd.concat([first_rows, second_rows])).write.format("delta") \
        .mode("overwrite").save(src)
    second = run(cfg, spark=spark)
    assert (second.rows_embedded, second.rows_skipped) == (2, 60)
    props2 = DeltaTable.forPath(spark, out).detail().collect()[0]["properties"]
    assert props2["embed.calibration"] == props["embed.calibration"]
    again = spark.read.format("delta").load(out).filter("id = 1000").collect()[0]
    for col in ("q", "u"):
        a, b = (np.frombuffer(bytes(x), np.uint8).astype(int) if col == "u" else np.array(x)
                for x in (again[col], row[col]))
        assert np.abs(a - b).max() <= 1 and (a == b).mean() >= 0.98, col
    bits = np.unpackbits(np.frombuffer(bytes(again.b), np.uint8)) == np.unpackbits(
        np.frombuffer(bytes(row.b), np.uint8))
    assert bits.mean() >= 0.98
    assert np.allclose(again.f, row.f, atol=1e-5)
