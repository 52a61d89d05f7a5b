"""`embed run` as a subprocess: what a user sees of a bad config is one line on stderr.

spark-submit jobs/embed.py writing what an in-process run writes is
tests/test_deploy.py's (on a standalone cluster, vectors compared with a local
run); the README test runs it on local[2] as typed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, demo_table, write_config

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
    # needs the source's schema, so Spark starts (and stops: the column is checked before
    # the model loads on any worker): still one line, no JVM trace
    _one_line_error(_run([embed, "run", "--config", str(cfg),
                          "--set", "source.text_column=body"]),
                    "source.text_column", "'body'", "its columns are: id, name, summary, text, day")
    assert not (tmp_path / "out").exists()
