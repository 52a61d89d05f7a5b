"""The package as a user installs it: a wheel, in a clean venv, with its runtime
dependencies only (no dev extra: no pytest, no moto, no boto3), runs `embed run` on a
local table and on an S3 table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.s3 import environment


def _uv() -> list[str]:
    """uv as scripts/bootstrap.sh runs it (installed into the system Python there)."""
    found = shutil.which("uv")
    if found:
        return [found]
    for python in ("python3.11", "python3"):
        if shutil.which(python) and subprocess.run([python, "-m", "uv", "--version"],
                                                   capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    pytest.fail("uv is not installed (scripts/bootstrap.sh installs it)")


@pytest.mark.slow
def test_a_wheel_in_a_clean_venv_runs_on_a_local_and_an_s3_table(s3_server, tmp_path):
    uv = _uv()
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run([*uv, "build", "--wheel", "-q", "-o", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    wheels = list(dist.glob("embed_pipeline-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True,
                   capture_output=True, timeout=300)
    installed = subprocess.run([*uv, "pip", "install", "-q", "--python",
                                str(venv / "bin" / "python"), str(wheels[0])],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    python = str(venv / "bin" / "python")
    dev_only = subprocess.run([python, "-c", "import moto"], capture_output=True)
    assert dev_only.returncode != 0  # runtime dependencies only

    bucket = s3_server.bucket("wheel")
    env = {"HOME": os.environ["HOME"], "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
           "LANG": "C.UTF-8", **environment(s3_server.endpoint)}
    embed = str(venv / "bin" / "embed")
    runs = []
    for name, where in (("local", str(tmp_path / "lake")), ("s3", f"{bucket}/lake")):
        made = subprocess.run([embed, "demo-data", "--out", f"{where}/src", "--limit", "40"],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert made.returncode == 0, made.stderr[-3000:]
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"source: {{path: '{where}/src'}}\n"
                          "outputs: [{name: emb, dim: 64}]\n"
                          f"sink: {{path: '{where}/out'}}\n"
                          "model: {parity_check: false}\n"
                          "spark: {master: 'local[1]'}\n"
                          "drift: {canary: {enabled: false}, distribution: {enabled: false}}\n")
        # the two at once (two users of one fresh install): the first resolution of
        # Delta's jars is shared, not raced (pipeline/jars.py locks it)
        runs.append(subprocess.Popen([embed, "run", "--config", str(config), "--json",
                                      "--no-progress"], cwd=tmp_path, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for name, proc in zip(("local", "s3"), runs, strict=True):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (name, out[-2000:], err[-3000:])
        assert json.loads(out.strip().splitlines()[-1])["rows_embedded"] == 40, name
