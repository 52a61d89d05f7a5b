"""The real entry points as subprocesses: `embed run` and `spark-submit jobs/embed.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, cosine_rows, demo_table, sorted_table, write_config

BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_source(spark, tmp_path_factory):
    return demo_table(spark, tmp_path_factory.mktemp("entry"), 120)


def test_spark_submit_and_an_in_process_run_write_the_same_table(spark, small_source,
                                                                  tmp_path):
    """spark-submit jobs/embed.py (its own JVM) vs run() in this session; the CLI's
    `embed run` is run as typed by the README test and the failure tests."""
    from pipeline.config import load_config
    from pipeline.run import run

    (tmp_path / "cli").mkdir()
    (tmp_path / "sub").mkdir()
    cli_cfg = write_config(tmp_path / "cli", small_source, str(tmp_path / "cli_out"))
    sub_cfg = write_config(tmp_path / "sub", small_source, str(tmp_path / "sub_out"))
    assert run(load_config(cli_cfg), spark=spark).rows_embedded == 120
    sub = _run([str(BIN / "spark-submit"), "--master", "local[2]", "jobs/embed.py",
                "--config", str(sub_cfg), "--json"])
    assert sub.returncode == 0, sub.stderr[-3000:]
    a = sorted_table(spark, str(tmp_path / "cli_out"))
    b = sorted_table(spark, str(tmp_path / "sub_out"))
    assert len(a) == len(b) == 120
    assert a["id"].tolist() == b["id"].tolist()
    assert a["content_hash"].tolist() == b["content_hash"].tolist()
    for col in ("emb_384", "emb_128", "emb_64"):
        cos = cosine_rows(np.stack(a[col]), np.stack(b[col]))
        assert cos.min() >= 0.99999, col
    assert a["run_id"].iloc[0] != b["run_id"].iloc[0]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "at org.apache" not in proc.stderr


def test_config_errors_are_one_line_without_stack_traces(small_source, tmp_path):
    cfg = write_config(tmp_path, small_source, str(tmp_path / "out"))
    embed = str(BIN / "embed")
    _one_line_error(_run([embed, "run", "--config", str(cfg), "--set", "model.polling=cls"]),
                    "model.polling", "did you mean 'pooling'")
    _one_line_error(_run([embed, "run", "--config", str(cfg), "--set", "outputs.0.dim=1024"]),
                    "outputs[0].dim", "output dimension 384")
    # needs the source's schema, so Spark starts: still one line, no JVM trace
    _one_line_error(_run([embed, "run", "--config", str(cfg),
                          "--set", "source.text_column=body"]),
                    "source.text_column", "'body'", "its columns are: id, name, summary, text, day")
    assert not (tmp_path / "out").exists()
