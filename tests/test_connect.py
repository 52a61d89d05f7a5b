"""Spark Connect and tables named through a catalog.

A Connect client: docs/deployment.md's block, as typed in a fresh shell, against Spark
Connect's own server (from the pip-installed pyspark, on 127.0.0.1, with a Hive
metastore over embedded Derby: one server per test run), with pyspark's classic entry
points made to raise in every client process (tests/connect_guard). Then a run killed
with -9 and re-run. A classic session: the suite's own, with its Hive metastore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.errors import ConfigError, SourceError
from tests.conftest import ROOT, cosine_rows, demo_table, write_config
from tests.output import tail
from tests.test_readme import block_script, fresh_shell_env, readme_blocks

CONNECT_BLOCK = ".venv/bin/embed connect-server start"
GUARD = ROOT / "tests" / "connect_guard"


def docs_block() -> list[str]:
    text = (ROOT / "docs" / "deployment.md").read_text()
    blocks = [b for b in readme_blocks(text) if b[0].startswith(CONNECT_BLOCK)]
    assert len(blocks) == 1, blocks
    return blocks[0]


def _ids(path: str) -> list[int]:
    from pipeline import deltars

    return sorted(deltars.dataset(path).to_table(columns=["id"]).column("id").to_pylist())


def _shell(work: Path, script: str, env: dict[str, str], timeout: int = 900
           ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-l", "-c", script], cwd=work, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_the_docs_connect_block_runs_as_a_client_with_classic_apis_refused_and_kill9(
        tmp_path, st_reference):
    """docs/deployment.md's commands as typed (a server, the demo source named in the
    catalog, a run by name, a recorded no-op re-run, runs, search, drift, a two-day
    backfill, maintain), every client process with the classic entry points made to
    raise: sentence-transformers' vectors land. Then a run into a new named table is
    killed -9 once its table exists, and re-run: every id once."""
    from pipeline import deltars

    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "conf", work / "conf")
    env = {**fresh_shell_env(), "PYTHONPATH": str(GUARD), "EMBED_TEST_REFUSE_CLASSIC": "1"}
    commands = docs_block()
    assert commands[-1] == ".venv/bin/embed connect-server stop"
    refused = _shell(work, "SPARK_REMOTE=sc://x:1 .venv/bin/python -c 'import pyspark.context"
                     " as c; c.SparkContext(\"local[1]\")'", env)
    assert "classic-only pyspark API" in refused.stderr, refused.stderr[-2000:]  # armed
    try:
        done = _shell(work, block_script(commands[:-1]), env)
        assert done.returncode == 0, (tail(done.stdout), tail(done.stderr))
        said = done.stdout + done.stderr
        assert "Traceback" not in said and "classic-only" not in said, tail(said)
        for expected in ("rows embedded      │ 100", "rows embedded      │ 0",
                         "compacted into", "backfill done: 2 partitions"):
            assert expected in said, (expected, tail(said))
        # the progress bar's last state, fed by the server's progress reports
        assert re.search(r"\b([1-9]\d*)/\1 tasks", said), tail(said)
        table = work / ".spark-connect" / "warehouse" / "lake.db" / "docstring_embeddings"
        rows = deltars.dataset(str(table)).to_table(columns=["id", "emb_384"]).to_pandas()
        rows = rows.sort_values("id")
        assert rows["id"].tolist() == list(range(100))
        cos = cosine_rows(np.stack(rows["emb_384"].to_numpy()).astype(np.float32),
                          st_reference[:100])
        assert cos.min() >= 0.9999, float(cos.min())
        remote = {**env, "SPARK_REMOTE": "sc://127.0.0.1:15002"}
        (work / "kind.py").write_text(
            "from pyspark.sql import SparkSession\n"
            "spark = SparkSession.builder.getOrCreate()\n"
            "rows = spark.sql('DESCRIBE TABLE EXTENDED lake.docstring_embeddings')\n"
            "print(rows.where(\"col_name = 'Type'\").first()[1])\n")
        kind = _shell(work, ".venv/bin/python kind.py", remote)
        assert kind.stdout.strip() == "MANAGED", (kind.stdout, kind.stderr[-2000:])
        _kill9_and_rerun(work, remote)
    finally:
        _shell(work, commands[-1], env, timeout=120)


def _kill9_and_rerun(work: Path, env: dict[str, str]) -> None:
    config = work / "conf" / "killed.yaml"
    config.write_text("""
source: {table: lake.docstrings}
outputs: [{name: emb_384, dim: 384}, {name: emb_64, dim: 64, dtype: int8}]
sink: {table: lake.killed}
model: {parity_check: false}
drift: {canary: {enabled: false}, distribution: {enabled: false}}
""")
    table = work / ".spark-connect" / "warehouse" / "lake.db" / "killed"
    run = [".venv/bin/embed", "run", "--config", str(config), "--no-progress"]
    killed = subprocess.Popen(run, cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (table / "_delta_log").is_dir():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    # The server may still run the killed client's commit: a re-run that meets it loses
    # the race in one line (exit 7, nothing written); the next one finds its rows there.
    for _ in range(3):
        again = subprocess.run(run, cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
        if again.returncode != 7:
            break
    assert again.returncode == 0, tail(again.stderr)
    assert _ids(str(table)) == list(range(100))  # every id exactly once


# --------------------------------------------------------------------------- classic


def test_tables_by_name_on_a_classic_session(spark, tmp_path):
    """source.table and sink.table on the suite's session (a Hive metastore): an external
    sink at sink.path (its runs table named beside it), then a second name for its
    location is the same table (a no-op), the DAG's validate and check tasks, `embed runs`
    and `search --hybrid` take names, bookkeeping names go where asked, and names the
    catalog lacks are one-line errors. (A managed sink: the Connect test's.)"""
    from pyspark.errors.exceptions import captured

    from pipeline import catalog
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.dag_tasks import check_run, start_date, validate_config
    from pipeline.run import run

    # Delta's conflict classes are what a Delta SQL command raises on this session
    # (the run's exit 7 for a lost race rests on it): installed when the session is made
    assert captured.convert_exception.__name__ == "convert_delta_exception"
    source = demo_table(spark, tmp_path, 40)
    catalog.register(spark, "names.src", source)
    external = str(tmp_path / "external")
    cfg = load_config(write_config(tmp_path, "unused", external, extra="""
source: {path: '', table: names.src}
sink: {table: names.external}
"""))
    first = run(cfg, spark)
    assert first.rows_embedded == 40 and first.output_path == external
    assert _table_type(spark, "names.external") == "EXTERNAL"
    # the DAG's own tasks (validate, check) on the config of names
    validated = validate_config(str(tmp_path / "run.yaml"), "2024-03-01",
                                start_date({"EMBED_START_DATE": "2024-01-01"}))
    assert validated["output"] == external
    assert check_run(str(tmp_path / "run.yaml"), "")["run_id"] == first.run_id
    runs = spark.table("names.embedding_runs").where(f"run_id = '{first.run_id}'")
    assert sorted(r.status for r in runs.collect()) == ["running", "succeeded"]

    catalog.register(spark, "names.alias", external)
    alias = load_config(write_config(tmp_path, "unused", "", extra="""
source: {path: '', table: names.src}
sink: {path: '', table: names.alias, bookkeeping_schema: ops}
"""))
    assert run(alias, spark).rows_embedded == 0  # one location, one table
    # sink.bookkeeping_schema: the same runs table, named in the schema asked for
    assert spark.table("ops.embedding_runs").where(f"run_id = '{first.run_id}'").count() == 2

    listed = CliRunner().invoke(main, ["runs", "--table", "names.alias"])
    assert listed.exit_code == 0 and "succeeded" in listed.output, listed.output
    # --hybrid takes a name too: one table's column fused with itself ranks alike
    fused = CliRunner().invoke(main, ["search", "--table", "names.external", "--column",
                                      "emb_64", "--hybrid", "names.alias:emb_64", "--k", "3",
                                      "--json", "read a zip file"])
    assert fused.exit_code == 0, fused.output
    hits = [json.loads(line) for line in fused.output.splitlines() if line.startswith("{")]
    assert len(hits) == 3 and all(h["ranks"][0] == h["ranks"][1] for h in hits), hits
    missing = CliRunner().invoke(main, ["runs", "--table", "names.nowhere"])
    assert missing.exit_code == 3 and "no table named names.nowhere" in missing.output

    with pytest.raises(SourceError, match="no table named names.nope"):
        run(load_config(write_config(tmp_path, "unused", external, extra="""
source: {path: '', table: names.nope}
""")), spark)
    with pytest.raises(ConfigError, match="names.external is at"):
        run(load_config(write_config(tmp_path, "unused", str(tmp_path / "elsewhere"),
                                     extra="sink: {table: names.external}")), spark)


def _table_type(spark, name: str) -> str:
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {name}").where("col_name = 'Type'").collect()
    return rows[0]["data_type"]
